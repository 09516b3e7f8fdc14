"""The pytest plugin as a kernel repository uses it, and one seed drawing the same cases on every entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from verify import fuzz
from verify.targets import load

ROOT = Path(__file__).resolve().parents[1]
BUGGY = (
    "from tests.mutants import MUTANTS\n"
    "attention = MUTANTS['causal_strict'].fn\n"
    "attention.attnverify = {'framework': 'torch', 'features': ['mask', 'causal', 'chunks']}\n"
)


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # attnverify's own tests package; NOT the kernel's directory
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd, env=env,
                          text=True, capture_output=True, timeout=600)


def test_plugin_gates_a_kernel_in_the_repository_root(tmp_path):
    (tmp_path / "mykernels.py").write_text(BUGGY)
    junit = tmp_path / "junit.xml"
    res = _pytest(tmp_path, "--attnverify-target=mykernels:attention", "--attnverify-dtypes=fp32,bf16",
                  "--attnverify-checks=forward", "--attnverify-max-examples=100",
                  f"--attnverify-repro-dir={tmp_path / 'f'}", f"--junitxml={junit}")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "collected 2 items" in res.stdout  # one check, two dtypes
    assert "FAIL forward" in res.stdout and "attnverify repro" in res.stdout
    assert 'failures="2"' in junit.read_text() and 'tests="2"' in junit.read_text()


def test_plugin_items_are_selectable_and_listed(tmp_path):
    (tmp_path / "mykernels.py").write_text(BUGGY)
    res = _pytest(tmp_path, "--attnverify-target=mykernels:attention", "--collect-only", "-q", "-k", "fp16")
    assert res.returncode == 0, res.stdout + res.stderr
    listed = [line for line in res.stdout.splitlines() if "::" in line]
    assert listed == [f"attnverify[mykernels:attention]::fp16-{c}" for c in ("forward", "grad", "determinism")]


def test_plugin_import_error_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_package_anywhere\n")
    res = _pytest(tmp_path, "--attnverify-target=broken:attention", "--attnverify-framework=torch")
    assert res.returncode == 4, res.stdout + res.stderr
    out = (res.stdout + res.stderr).strip().splitlines()
    errors = [line for line in out if "cannot import module 'broken'" in line]
    assert len(errors) == 1 and "ModuleNotFoundError: No module named 'no_such_package_anywhere'" in errors[0], out
    assert len(out) < 12 and not any("Traceback" in line for line in out), out  # pytest's header and that line


def test_plugin_takes_the_declaration_flags(tmp_path):
    """--attnverify-accumulate merges into the function's metadata (its features stay)."""
    (tmp_path / "mykernels.py").write_text(BUGGY)
    res = _pytest(tmp_path, "--attnverify-target=mykernels:attention", "--attnverify-accumulate=input",
                  "--attnverify-no-round-probs", "--attnverify-dtypes=fp32", "--attnverify-checks=forward",
                  "--attnverify-max-examples=50", f"--attnverify-json={tmp_path / 'js'}",
                  f"--attnverify-repro-dir={tmp_path / 'f'}")
    assert res.returncode == 1, res.stdout + res.stderr
    case = json.loads((tmp_path / "js" / "fp32-forward.json").read_text())["findings"][0]["case_file"]
    target = json.loads(Path(case).with_suffix(".json").read_text())["meta"]["target"]
    assert target["accumulate"] == "input" and target["round_probs"] is False
    assert target["features"] == ["causal", "chunks", "mask"]  # from the function's metadata


def test_one_seed_draws_the_same_cases_on_every_entry_point(tmp_path):
    """fuzz.run (after importing the report and memory modules), the command line and the plugin agree."""
    import verify.accuracy  # noqa: F401 - imported on purpose: it must not change what is generated
    import verify.memory  # noqa: F401

    common = {"dtypes": ("fp32",), "checks": ("forward",), "max_examples": 60, "seed": 5}
    camp = fuzz.run(load("tests.fixture_targets:reference"),
                    fuzz.Settings(database=None, repro_dir=tmp_path / "a", **common))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cli = subprocess.run([sys.executable, "-m", "verify.commands", "fuzz", "--target",
                          "tests.fixture_targets:reference", "--dtypes", "fp32", "--checks", "forward",
                          "--max-examples", "60", "--seed", "5", "--no-database", "--repro-dir", str(tmp_path / "b"),
                          "--json", str(tmp_path / "cli.json"), "--quiet"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=600)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    plug = _pytest(ROOT, "--attnverify-target=tests.fixture_targets:reference", "--attnverify-dtypes=fp32",
                   "--attnverify-checks=forward", "--attnverify-max-examples=60", "--attnverify-seed=5",
                   "--attnverify-database=", f"--attnverify-json={tmp_path / 'plugin'}",
                   f"--attnverify-repro-dir={tmp_path / 'c'}", "-k", "attnverify",
                   str(ROOT / "tests" / "test_plugin.py"))
    assert plug.returncode == 0, plug.stdout + plug.stderr
    sequences = {camp.case_sequence,
                 json.loads((tmp_path / "cli.json").read_text())["case_sequence"],
                 json.loads((tmp_path / "plugin" / "fp32-forward.json").read_text())["case_sequence"]}
    assert len(sequences) == 1 and camp.examples == {"fp32": 60}


def test_a_device_that_is_absent_skips_cleanly_and_the_tiles_flag_is_taken(tmp_path):
    import torch

    (tmp_path / "mykernels.py").write_text(BUGGY)
    res = _pytest(tmp_path, "--attnverify-target=mykernels:attention", "--attnverify-device=cuda",
                  "--attnverify-dtypes=fp32", "--attnverify-checks=forward", "--attnverify-max-examples=5", "-rs",
                  "--attnverify-tiles=64,128", f"--attnverify-repro-dir={tmp_path / 'f'}")
    if torch.cuda.is_available():
        assert res.returncode in (0, 1) and "skipped" not in res.stdout, res.stdout + res.stderr  # it runs there
    else:
        assert res.returncode == 0 and "1 skipped" in res.stdout, res.stdout + res.stderr
        assert "sees no CUDA device" in res.stdout
    bad = _pytest(tmp_path, "--attnverify-target=mykernels:attention", "--attnverify-tiles=64,x")
    assert bad.returncode == 4 and "expected comma-separated integers" in bad.stdout + bad.stderr
