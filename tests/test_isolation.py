"""A gate that survives real kernels: segfaults, aborts, hangs and races are findings; the campaign goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verify import checks, fuzz
from verify.case import Case
from verify.isolation import Worker
from verify.targets import load

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "verify.commands", "fuzz", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.parametrize(("name", "category", "detail", "examples"), [
    ("segfaults", "crash", "killed by SIGSEGV (signal 11)", 12),
    ("aborts", "crash", "killed by SIGABRT (signal 6)", 12),
    ("hangs", "timeout", "call ran past 1 s (worker killed)", 4),  # every call hangs: each costs a restart
    ("nondeterministic", "nondeterministic", "differs bitwise", 12),
])
def test_each_failure_of_the_process_is_a_finding_and_the_campaign_completes(name, category, detail, examples,
                                                                             tmp_path):
    js = tmp_path / "camp.json"
    res = _cli("--target", f"tests.fixture_targets:{name}", "--max-examples", str(examples), "--timeout", "1",
               "--no-database",
               "--repro-dir", str(tmp_path / "f"), "--json", str(js), "--quiet")
    assert res.returncode == 1, res.stdout + res.stderr
    data = json.loads(js.read_text())
    assert data["interrupted"] is False and data["incomplete"] == []
    assert set(data["examples"]) == {"bf16", "fp16", "fp32"} and all(n > 0 for n in data["examples"].values())
    found = [f for f in data["findings"] if f["category"] == category]
    assert found and detail in found[0]["detail"], res.stdout
    assert "Traceback" not in res.stdout + res.stderr


def test_a_crash_is_replayable_and_the_worker_restarts(tmp_path):
    adapter = load("tests.fixture_targets:segfaults")
    worker = Worker(adapter.target, adapter.info)
    try:
        camp = fuzz.run(worker, fuzz.Settings(dtypes=("fp32",), checks=("forward",), max_examples=20, database=None,
                                              repro_dir=tmp_path))
        assert [f.category for f in camp.findings] == ["crash"] and worker.starts >= 2
        case = Case.load(camp.findings[0].case_file)
        again = checks.run_case(worker, case, checks=("forward",))
        assert [f.category for f in again.findings] == ["crash"]
        fine = checks.run_case(worker, case.with_(k=case.k[:, :3], v=case.v[:, :3], bias=None, mask=None),
                               checks=("forward",))
        assert fine.findings == []
    finally:
        worker.close()


def test_in_process_mode_and_declared_nondeterminism(tmp_path):
    camp = fuzz.run(load("tests.fixture_targets:nondeterministic", nondeterministic=True),
                    fuzz.Settings(dtypes=("fp32",), max_examples=15, database=None, repro_dir=tmp_path,
                                  isolate=False))
    assert camp.findings == []  # differences of an ulp are within the allowance of a declared nondeterministic target
    assert camp.stats.to_json()["counts"]["passes"] == {"forward+forward#2": 15}


def test_the_case_is_on_disk_while_the_target_runs(tmp_path):
    seen = []

    class Spy(Worker):
        def submit(self, case, passes):
            seen.append(sorted(p.name for p in tmp_path.iterdir()))
            super().submit(case, passes)

    adapter = load("tests.fixture_targets:reference")
    spy = Spy(adapter.target, adapter.info)
    try:
        fuzz.run(spy, fuzz.Settings(dtypes=("fp32",), max_examples=3, database=None, repro_dir=tmp_path))
    finally:
        spy.close()
    stem = ".in-flight-tests_fixture_targets_reference"
    assert seen and all(names == [f"{stem}.json", f"{stem}.npz"] for names in seen)
    assert not list(tmp_path.iterdir())  # removed when the campaign ends


def test_a_recycled_worker_is_never_a_finding(tmp_path):
    adapter = load("tests.fixture_targets:reference")
    worker = Worker(adapter.target, adapter.info, max_maps=1)  # every case leaves more than one mapping
    try:
        camp = fuzz.run(worker, fuzz.Settings(dtypes=("fp32",), checks=("forward",), max_examples=4, database=None,
                                              repro_dir=tmp_path))
    finally:
        worker.close()
    assert camp.findings == [] and camp.examples["fp32"] == 4
    assert worker.recycled >= 3 and worker.starts >= worker.recycled  # a fresh worker after each recycle
