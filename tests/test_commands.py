"""Every subcommand answers --help and does one small real run; the main job's outputs do not change on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from verify import bundled
from verify.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: attnverify {command}")


def test_no_command_is_a_one_line_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert capsys.readouterr().err.strip() == "attnverify: error: give a command: " + ", ".join(COMMANDS)


def test_small_real_runs(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["demo"]) == 0
    assert main(["targets", "--target", "tests.fixture_targets:reference"]) == 0
    js = tmp_path / "camp.json"
    assert main(["fuzz", "--target", "tests.fixture_targets:two_bugs", "--dtypes", "fp32", "--checks", "forward",
                 "--max-examples", "30", "--no-database", "--repro-dir", str(tmp_path / "f"), "--json", str(js),
                 "--quiet"]) == 1
    case = json.loads(js.read_text())["findings"][0]["case_file"]
    assert main(["repro", case]) == 1
    assert main(["report", "--target", "chunked-torch", "--out", str(tmp_path / "r"), "--dtypes", "fp32",
                 "--lengths", "8", "--query-chunks", "8", "--key-chunks", "4", "--families", "normal", "--masks",
                 "none", "--seeds", "1", "--workers", "1", "--findings", str(js), "--quiet"]) == 0
    assert "Findings of the fuzz campaign" in (tmp_path / "r" / "report.md").read_text()
    assert main(["memory", "--target", "chunked-jax", "--lengths", "256", "--policies", "64x64", "--reference",
                 "none", "--query-chunks", "64", "--key-chunks", "32,64,128,256", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "FAIL crash" in out and "report chunked-torch" in out and "memory.md" in out


def test_bundled_writes_reproducible_outputs(tmp_path: Path) -> None:
    """Rerun with its own outputs committed (as on a fresh clone), the main job changes only timings.json."""
    out = tmp_path / "reports"
    sett = bundled.Settings(out=out, targets=("chunked-torch",), max_examples=4, workers=2)

    def files() -> dict[str, bytes]:
        paths = (p for p in out.rglob("*") if p.is_file() and "cells" not in p.parts)
        return {str(p.relative_to(out)): p.read_bytes() for p in paths}

    assert bundled.run(sett) == 0  # the first outputs: what a repository commits
    assert bundled.run(sett) == 0  # gated against them
    before = files()
    assert bundled.run(sett) == 0
    after = files()
    assert sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p)) == ["timings.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"][0]["report"]["baseline"] == "gated" and summary["failures"] == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-len", "0"], "--max-len must be >= 1, got 0"),
    (["--max-dim", "3000"], "--max-dim 3000: head dims are drawn up to 256"),
    (["--tiles", "128", "--max-len", "100"], "max_len (--max-len) 100 does not exceed the tile of 128"),
    (["--tiles", "64,x"], "argument --tiles: expected comma-separated integers"),
])
def test_bad_limits_are_one_line_errors(flags: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["fuzz", "--target", "tests.fixture_targets:reference", *flags, "--max-examples", "2",
                 "--no-database", "--repro-dir", str(tmp_path), "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_undeclared_constraint_is_a_counted_decline_and_a_declared_one_is_never_drawn(tmp_path: Path) -> None:
    def campaign(*flags: str) -> dict:
        js = tmp_path / f"c{len(flags)}.json"
        assert main(["fuzz", "--target", "tests.fixture_targets:equal_head_dims_only", *flags, "--dtypes", "fp32",
                     "--max-examples", "25", "--no-database", "--repro-dir", str(tmp_path), "--in-process", "--quiet",
                     "--json", str(js)]) == 0
        return json.loads(js.read_text())

    undeclared = campaign()
    assert undeclared["findings"] == [] and undeclared["declined"]["fp32"]["equal_head_dims_only needs Dk == Dv"] > 0
    declared = campaign("--constraints", "dk=dv")
    assert declared["findings"] == [] and declared["declined"] == {}


def test_a_format_1_case_file_replays_on_the_target_it_names(capsys: pytest.CaptureFixture) -> None:
    """Case files written before TargetSpec metadata (format 1) name their target as a string."""
    committed = Path(__file__).resolve().parents[1] / "reports/findings/mea-torch/mea-torch-shape-out-fp32.npz"
    assert json.loads(committed.with_suffix(".json").read_text())["format"] == 1
    assert main(["repro", str(committed)]) == 1
    out = capsys.readouterr().out
    assert "FAIL shape · mea-torch · fp32 · out" in out and "FAIL crash · mea-torch · fp32 · grad pass" in out


def test_a_value_our_checks_reject_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["fuzz", "--target", "chunked-torch", "--max-len", "0", "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnverify: error: ") and "Traceback" not in err


def test_a_harness_bug_is_an_internal_error_with_its_traceback(capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError from inside numpy (or any other exception) escaping a command is attnverify's bug:
    exit 4 and the traceback, never the one-line usage error (2) or Python's 1, which reads as findings."""
    import numpy as np

    from verify.commands import demo

    monkeypatch.setattr(demo, "run", lambda args: np.zeros(2).reshape(3))
    assert main(["demo"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and "attnverify: internal error (ValueError: cannot reshape" in err
    monkeypatch.setattr(demo, "run", lambda args: {}["missing"])
    assert main(["demo"]) == 4
    assert "internal error (KeyError" in capsys.readouterr().err
