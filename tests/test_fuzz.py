"""Campaigns: silent on correct kernels, killing every mutant, keeping what they find, bounded as they say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.mutants import BASE, MUTANTS
from verify import checks, fuzz
from verify.case import Case
from verify.findings import Finding
from verify.targets import TargetSpec, adapter_for, load

ROOT = Path(__file__).resolve().parents[1]


def _settings(tmp_path: Path, **kw) -> fuzz.Settings:
    return fuzz.Settings(database=None, repro_dir=tmp_path / "findings", **kw)


def _replays(f: Finding) -> bool:
    """The saved case, replayed on the target its file names, shows the same category of the same output."""
    case = Case.load(f.case_file)
    meta = case.meta
    adapter = TargetSpec.from_meta(meta["target"]).load()
    out = checks.run_case(adapter, case, checks=tuple(meta["checks"]), policy=meta["policy"])
    return any((g.category, g.output) == (f.category, f.output) for g in out.findings)


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_default_campaign_kills_each_mutant(name, tmp_path):
    m = MUTANTS[name]
    adapter = adapter_for(m.fn, m.info())
    camp = fuzz.run(adapter, _settings(tmp_path, max_findings=1))
    assert camp.findings, f"mutant {name} ({m.kind}) survived {camp.examples} examples"
    f = camp.findings[0]
    replay = Case.load(f.case_file)  # the shrunk reproducer is a plain case file that still fails
    assert replay.dims == f.dims
    out = checks.run_case(adapter, replay, checks=tuple(replay.meta["checks"]))
    assert (f.category, f.output) in {(g.category, g.output) for g in out.findings}


@pytest.mark.parametrize("target", ["clean", "chunked-torch"])
def test_correct_kernels_give_no_findings(target, tmp_path):
    adapter = adapter_for(BASE.fn, BASE.info()) if target == "clean" else load(target)
    camp = fuzz.run(adapter, _settings(tmp_path, max_examples=60, seed=7))
    assert camp.findings == [], "\n\n".join(f.message() for f in camp.findings)
    assert camp.examples == {"bf16": 60, "fp16": 60, "fp32": 60}
    assert camp.coverage == {"bf16": "max_examples", "fp16": "max_examples", "fp32": "max_examples"}


def test_distinct_bugs_are_reported_separately(tmp_path):
    """A target with two bugs (a crash on causal calls, wrong values otherwise) yields both categories."""
    camp = fuzz.run(load("tests.fixture_targets:two_bugs"), _settings(tmp_path, dtypes=("fp32",), checks=("forward",)))
    assert {f.category for f in camp.findings} == {"crash", "forward"}
    crash = next(f for f in camp.findings if f.category == "crash")
    assert "RuntimeError: causal path not implemented" in crash.detail


def test_each_finding_has_its_own_case_file_that_replays_it(tmp_path):
    """A package.module:function target (dots in its name) over two dtypes: no file is shared or overwritten."""
    camp = fuzz.run(load("tests.fixture_targets:two_bugs"),
                    _settings(tmp_path, dtypes=("fp32", "bf16"), checks=("forward",)))
    assert len(camp.findings) == 4
    files = [f.case_file for f in camp.findings]
    assert len(set(files)) == 4 and all(Path(p).exists() for p in files)
    assert sorted(p.name for p in (tmp_path / "findings").iterdir()) == sorted(
        Path(p).name for f in files for p in (f, f.replace(".npz", ".json")))  # nothing else left behind
    for f in camp.findings:
        assert _replays(f), f.message()


@pytest.mark.parametrize("name", ["mykernels.attn:attention_wrong_scale", "a/b:c", "x" * 200, ":", "ünï.cödé:f"])
def test_slugs_are_safe_and_unique(name):
    case = Case.load(ROOT / "reports" / "findings" / "chunked-jax" / "chunked-jax-overflow-dk-fp16")
    f = Finding("forward", "forward", name, "fp32", "normal", "none", "")
    stem = fuzz.slug(f, case)
    assert "/" not in stem and "." not in stem and ":" not in stem and len(stem) < 100
    other = fuzz.slug(Finding("forward", "forward", name + "2", "fp32", "normal", "none", ""), case)
    assert stem != other
    assert fuzz.slug(f, case.with_(key_chunk_size=2)) != stem  # a different case, a different file


def test_a_non_finite_finding_is_strict_json_and_round_trips():
    """A target's -inf or NaN result stays readable by strict JSON parsers (the report embeds findings)."""
    f = Finding("overflow", "grad", "t", "fp16", "big-values", "none", "", output="dk", index=(0, 1), got=-np.inf,
                exact=-5002.07, ratio=np.nan, allowance=np.inf)
    text = json.dumps(f.to_json(), allow_nan=False)
    back = Finding.from_json(json.loads(text))
    assert back.got == -np.inf and back.exact == -5002.07 and np.isnan(back.ratio) and back.allowance == np.inf
    assert back.index == (0, 1) and back.message() == f.message()


def test_a_campaign_with_a_non_finite_worst_ratio_is_strict_json_and_round_trips():
    """A finite result against an infinite exact value makes an infinite ratio; the JSON stays strict."""
    camp = fuzz.Campaign(target="t", settings={}, checks=["forward"], unexercised=[])
    camp.worst_ratio = {"fp32": {"out": np.inf, "lse": 0.25, "dq": None}}
    text = json.dumps(camp.to_json(), allow_nan=False)
    back = fuzz.Campaign.from_json(json.loads(text))
    assert back.worst_ratio == {"fp32": {"out": np.inf, "lse": 0.25, "dq": None}}


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


def test_max_examples_caps_target_runs_shrinking_included(tmp_path):
    camp = fuzz.run(load("tests.fixture_targets:two_bugs"), _settings(tmp_path, dtypes=("fp32",), max_examples=7))
    assert camp.examples == {"fp32": 7}
    assert camp.findings, "a finding whose shrinking is cut short by the cap is still reported"


def test_budget_is_split_over_the_dtypes_and_runs_until_spent(tmp_path):
    sett = _settings(tmp_path, budget=3.0, checks=("forward",))
    assert sett.examples_cap() is None  # a budget without max_examples means until the budget
    t0 = time.monotonic()
    camp = fuzz.run(load("tests.fixture_targets:reference"), sett)
    assert time.monotonic() - t0 < 3.0 + 2.0
    assert all(n > 0 for n in camp.examples.values()) and set(camp.examples) == {"bf16", "fp16", "fp32"}
    assert set(camp.coverage.values()) == {"budget"}
    assert camp.incomplete == []
    assert fuzz.Settings().examples_cap() == fuzz.DEFAULT_MAX_EXAMPLES


def test_after_a_timeout_later_calls_get_a_short_limit(tmp_path):
    """A target hanging on long inputs: the first hang waits the full limit, later ones a limit scaled to the case."""
    camp = fuzz.run(load("tests.fixture_targets:hangs_on_long"),
                    _settings(tmp_path, dtypes=("fp32",), checks=("forward",), max_examples=25, timeout=5.0))
    assert [f.category for f in camp.findings] == ["timeout"]
    assert len(camp.timeouts) >= 3 and camp.timeouts[0] == 5.0, camp.timeouts
    assert all(limit == fuzz.SHORT_TIMEOUT_MIN for limit in camp.timeouts[1:]), camp.timeouts  # tiny cases: the floor


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "verify.commands", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fuzz", "--target", "no-such-target"], "unknown target 'no-such-target'"),
        (["fuzz", "--target", "no_such_module:attention", "--framework", "torch"], "cannot import module"),
        (["fuzz", "--target", "tests.fixture_targets:nothing_here"], "has no attribute"),
        (["fuzz", "--target", "chunked-torch", "--max-examples", "lots"], "invalid int value"),
        (["fuzz", "--target", "chunked-torch", "--max-examples", "0"], "--max-examples must be >= 1"),
        (["fuzz", "--target", "chunked-torch", "--budget", "-5"], "--budget must be positive"),
        (["fuzz", "--target", "chunked-torch", "--dtypes", "fp8"], "unsupported dtype"),
        (["fuzz", "--target", "chunked-torch", "--checks", "speed"], "unknown check 'speed'"),
        (["fuzz", "--target", "chunked-torch", "--families", "weird"], "unknown families weird"),
        (["fuzz", "--target", "chunked-torch", "--framework", "jax"], "chunked-torch is bundled"),
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
    assert data["target"] == "tests.fixture_targets:masked_rows_nan" and data["checks"] == ["forward"]
    assert data["examples"]["fp32"] >= 1 and data["interrupted"] is False
    f = data["findings"][0]
    assert f["category"] == "masked-row" and f["dtype"] == "fp32"
    for key in ("check", "family", "dims", "chunks", "ratio", "case_file", "reference"):
        assert key in f
    rep = _cli("repro", f["case_file"])
    assert rep.returncode == 1 and rep.stdout.count("FAIL masked-row") == 1, rep.stdout + rep.stderr
    assert "still reproduces" in rep.stdout and rep.stdout.count(f["describe"]) == 1
    clean = _cli("repro", f["case_file"], "--target", "tests.fixture_targets:reference")
    assert clean.returncode == 0 and "no longer reproduces" in clean.stdout, clean.stdout + clean.stderr


def test_cli_header_and_summary_say_what_ran(tmp_path):
    res = _cli("fuzz", "--target", "tests.fixture_targets:all_nan", "--dtypes", "fp32,fp64", "--max-examples", "5",
               "--no-database", "--repro-dir", str(tmp_path), "--quiet")
    assert res.returncode == 1, res.stdout + res.stderr
    head = res.stdout.splitlines()[0]
    assert "checks forward, 5 target runs per dtype" in head  # a forward-only target: no grad check claimed
    assert "dtypes fp32" in head and "not run (the target does not declare them): dtypes fp64" in res.stdout
    assert "worst error in allowances, fp32: out - (no finite result)" in res.stdout
    assert "FAIL nan" in res.stdout and "NaN where the exact value is finite" in res.stdout


def test_cli_fuzz_clean_target_exits_0(tmp_path):
    res = _cli("fuzz", "--target", "tests.fixture_targets:reference", "--dtypes", "fp32", "--families",
               "normal,uniform", "--max-examples", "30", "--no-database", "--repro-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 finding(s)" in res.stdout and "each dtype ended by: fp32 max_examples" in res.stdout


def test_sigterm_leaves_the_json_whole_and_marked_interrupted(tmp_path):
    js = tmp_path / "camp.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "verify.commands", "fuzz", "--target", "tests.fixture_targets:slow",
                             "--max-examples", "5000", "--no-database", "--repro-dir", str(tmp_path), "--json",
                             str(js), "--quiet"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(8.0)  # start-up, then a few examples of 50 ms
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    data = json.loads(js.read_text())
    assert data["interrupted"] is True and sum(data["examples"].values()) > 0
    assert "interrupted (SIGTERM)" in err
