"""Campaigns: silent on correct kernels, killing every mutant of the zoo, and keeping what they find."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutants import BASE, MUTANTS
from verify import fuzz
from verify.case import Case
from verify.targets import adapter_for, load

ROOT = Path(__file__).resolve().parents[1]


def _settings(tmp_path: Path, **kw) -> fuzz.Settings:
    return fuzz.Settings(database=None, repro_dir=tmp_path / "findings", **kw)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_default_campaign_kills_each_mutant(name, tmp_path):
    m = MUTANTS[name]
    camp = fuzz.run(adapter_for(m.fn, m.info()), _settings(tmp_path, max_findings=1))
    assert camp.findings, f"mutant {name} ({m.kind}) survived {camp.examples} examples"
    f = camp.findings[0]
    replay = Case.load(f.case_file)  # the shrunk reproducer is a plain case file
    assert replay.dims == f.dims


@pytest.mark.parametrize("target", ["clean", "chunked-torch"])
def test_correct_kernels_give_no_findings(target, tmp_path):
    adapter = adapter_for(BASE.fn, BASE.info()) if target == "clean" else load(target)
    camp = fuzz.run(adapter, _settings(tmp_path, max_examples=60, seed=7))
    assert camp.findings == [], "\n\n".join(f.message() for f in camp.findings)
    assert sum(camp.examples.values()) == 180


def test_distinct_bugs_are_reported_separately(tmp_path):
    """A target with two bugs (crash on causal, wrong values otherwise) yields both categories."""
    m = MUTANTS["gqa_modulo"]
    camp = fuzz.run(adapter_for(m.fn, m.info()), _settings(tmp_path, dtypes=("fp32", "bf16"), max_examples=80))
    keys = {(f.category, f.dtype) for f in camp.findings}
    assert ("forward", "fp32") in keys and ("forward", "bf16") in keys


def test_database_replays_earlier_failures_first(tmp_path):
    m = MUTANTS["dbias_scaled"]
    sett = fuzz.Settings(database=tmp_path / "db", repro_dir=tmp_path / "f", max_findings=1, dtypes=("fp32",))
    first = fuzz.run(adapter_for(m.fn, m.info()), sett)
    second = fuzz.run(adapter_for(m.fn, m.info()), sett)
    assert first.findings and second.findings
    assert second.examples["fp32"] < first.examples["fp32"]
    assert second.examples["fp32"] <= 3  # the saved example comes first


def test_interrupt_keeps_findings(tmp_path):
    m = MUTANTS["causal_strict"]
    out = tmp_path / "camp.json"

    def stop(_finding):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fuzz.run(adapter_for(m.fn, m.info()), _settings(tmp_path), on_finding=stop, json_path=out)
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    assert data["findings"] and Path(data["findings"][0]["case_file"]).exists()


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "verify.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fuzz", "--target", "no-such-target"], "unknown target 'no-such-target'"),
        (["fuzz", "--target", "no_such_module:attention", "--framework", "torch"], "cannot import module"),
        (["fuzz", "--target", "tests.fixture_targets:nothing_here"], "has no attribute"),
        (["fuzz", "--target", "chunked-torch", "--max-examples", "lots"], "invalid int value"),
        (["fuzz", "--target", "chunked-torch", "--dtypes", "fp8"], "unsupported dtype"),
        (["fuzz", "--target", "chunked-torch", "--checks", "speed"], "unknown check 'speed'"),
        (["fuzz", "--target", "chunked-torch", "--families", "weird"], "unknown families weird"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, message):
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_cli_fuzz_writes_json_and_repro_replays(tmp_path):
    js = tmp_path / "out.json"
    res = _cli("fuzz", "--target", "tests.fixture_targets:masked_rows_nan", "--dtypes", "fp32", "--checks",
               "forward", "--max-examples", "100", "--no-database", "--repro-dir", str(tmp_path / "f"),
               "--json", str(js))
    assert res.returncode == 1, res.stdout + res.stderr
    data = json.loads(js.read_text())
    assert data["target"] == "tests.fixture_targets:masked_rows_nan"
    assert data["examples"]["fp32"] >= 1
    f = data["findings"][0]
    assert f["category"] == "masked-row" and f["dtype"] == "fp32"
    for key in ("check", "family", "dims", "chunks", "ratio", "case_file"):
        assert key in f
    rep = _cli("repro", f["case_file"])
    assert rep.returncode == 1 and "FAIL masked-row" in rep.stdout, rep.stdout + rep.stderr
    clean = _cli("repro", f["case_file"], "--target", "tests.fixture_targets:reference")
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_cli_fuzz_clean_target_exits_0(tmp_path):
    res = _cli("fuzz", "--target", "tests.fixture_targets:reference", "--dtypes", "fp32", "--families",
               "normal,uniform", "--max-examples", "30", "--no-database", "--repro-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 finding(s)" in res.stdout


def test_pytest_plugin_gates_a_buggy_kernel(tmp_path):
    (tmp_path / "buggy.py").write_text(
        "from tests.mutants import MUTANTS\n"
        "attention = MUTANTS['causal_strict'].fn\n"
        "attention.attnverify = {'framework': 'torch', 'features': ['mask', 'causal', 'chunks']}\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    junit = tmp_path / "junit.xml"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "--attnverify-target=buggy:attention",
         "--attnverify-dtypes=fp32", "--attnverify-checks=forward", "--attnverify-max-examples=100",
         f"--attnverify-repro-dir={tmp_path / 'f'}", f"--junitxml={junit}", "-q", "-p", "no:cacheprovider",
         str(tmp_path)],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL forward" in res.stdout and "attnverify repro" in res.stdout
    assert 'failures="1"' in junit.read_text()
