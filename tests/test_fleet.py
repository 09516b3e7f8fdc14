"""Distributed fuzzing (verify.fleet): Dask and local workers, merged findings, the command line, interruption."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from verify import checks, fleet, fleet_merge, fuzz
from verify.case import Case
from verify.commands import main
from verify.findings import Finding
from verify.targets import TargetSpec, load

ROOT = Path(__file__).resolve().parents[1]
TWO_BUGS = "tests.fixture_targets:two_bugs"  # raises on causal calls, wrong values otherwise (numpy, cheap)
SMALL = {"dtypes": ("fp32",), "checks": ("forward",), "max_examples": 30, "max_len": 64, "max_dim": 16}
SMALL_FLAGS = ["--dtypes", "fp32", "--checks", "forward", "--max-examples", "30", "--max-len", "64", "--max-dim", "16",
               "--quiet"]


def _replays(f: Finding) -> bool:
    """The kept case file, replayed on the target it names, shows the finding's category and output again."""
    case = Case.load(f.case_file)
    out = checks.run_case(TargetSpec.from_meta(case.meta["target"]).load(), case, checks=tuple(case.meta["checks"]))
    return (f.category, f.output) in {(g.category, g.output) for g in out.findings}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A two-worker Dask cluster whose workers may start processes (the target's own): its scheduler address."""
    distributed = pytest.importorskip("distributed")
    import dask

    with dask.config.set({"distributed.worker.daemon": False}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as lc:
            yield lc.scheduler_address


def test_two_dask_workers_find_what_one_does_and_merge_duplicates(cluster: str, tmp_path: Path) -> None:
    adapter = load(TWO_BUGS)
    one_sett = fuzz.Settings(database=None, repro_dir=tmp_path / "one", **SMALL)
    two_sett = fuzz.Settings(database=tmp_path / "db", repro_dir=tmp_path / "two", **SMALL)
    one = fleet.run(adapter, one_sett, workers=1, scheduler=cluster)
    two = fleet.run(adapter, two_sett, scheduler=cluster, json_path=tmp_path / "two.json")
    assert len(two.rows) == 2 and not one.failed and not two.failed
    merged = two.campaign()
    categories = {f.category for f in merged.findings}
    assert categories == {f.category for f in one.campaign().findings} == {"crash", "forward"}
    assert len(merged.findings) == len({f.key for f in merged.findings})
    assert two.raw > len(merged.findings), "the second worker (sharing the database) saw the same bugs again"
    assert all(_replays(f) for f in merged.findings)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        Path(f.case_file).with_suffix(ext).name for f in merged.findings for ext in (".npz", ".json"))
    data = json.loads((tmp_path / "two.json").read_text())
    rows = data["fleet"]["rows"]
    assert data["examples"] == {"fp32": sum(r["examples"]["fp32"] for r in rows)} == {"fp32": 60}
    assert data["fleet"]["duplicates"] == two.raw - len(merged.findings) and data["incomplete"] == []
    # worker 0 runs the campaign's own seed: without a database it draws what a plain campaign draws
    plain = fuzz.run(adapter, fuzz.Settings(database=None, repro_dir=tmp_path / "plain", isolate=False, **SMALL))
    assert one.rows[0].campaign.case_sequence == plain.case_sequence


def test_an_interrupted_dask_fleet_stops_its_workers_and_keeps_what_they_ran(cluster: str, tmp_path: Path) -> None:
    js = tmp_path / "c.json"
    sett = fuzz.Settings(dtypes=("fp32",), checks=("forward",), budget=120, max_len=64, max_dim=16, database=None,
                         repro_dir=tmp_path / "f")

    def ctrl_c_once_both_ran(fl: fleet.Fleet) -> None:
        if not fl.interrupted and all(r.campaign for r in fl.rows):
            raise KeyboardInterrupt

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fleet.run(load("tests.fixture_targets:reference"), sett, scheduler=cluster, on_progress=ctrl_c_once_both_ran,
                  json_path=js)
    assert time.monotonic() - t0 < 60, "the workers were told to stop, not left to run their budget"
    data = json.loads(js.read_text())
    assert data["interrupted"] is True and data["coverage"] == {"fp32": "interrupted"}
    rows = data["fleet"]["rows"]
    assert all(r["interrupted"] and r["error"] is None and r["examples"]["fp32"] > 0 for r in rows)
    assert data["examples"]["fp32"] == sum(r["examples"]["fp32"] for r in rows)


def test_local_workers_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    js = tmp_path / "c.json"
    assert main(["fuzz", "--target", TWO_BUGS, *SMALL_FLAGS, "--workers", "2", "--seed", "3", "--json", str(js),
                 "--database", str(tmp_path / "db"), "--repro-dir", str(tmp_path / "f")]) == 1
    out = capsys.readouterr().out
    assert "2 campaigns in local processes" in out and "duplicate(s) merged" in out
    data = json.loads(js.read_text())
    rows = data["fleet"]["rows"]
    assert [r["seed"] for r in rows] == [3, fleet.worker_seed(3, 1)] and rows[1]["seed"] != 3
    assert data["examples"]["fp32"] == sum(r["examples"]["fp32"] for r in rows) == 60
    keys = [(f["category"], f["dtype"], f["output"]) for f in data["findings"]]
    assert sorted(keys) == [("crash", "fp32", "out"), ("forward", "fp32", "out")]
    assert all(Path(f["case_file"]).exists() for f in data["findings"])
    assert fuzz.Campaign.from_json(data).to_json() == {k: v for k, v in data.items() if k != "fleet"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags", [["--workers", "0"], ["--scheduler", "tcp://127.0.0.1:{port}"]])
def test_bad_fleet_flags_are_one_line_errors(flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    monkeypatch.setattr(fleet, "CONNECT_TIMEOUT", 1.0)
    flags = [f.format(port=_closed_port()) for f in flags]
    assert main(["fuzz", "--target", TWO_BUGS, *SMALL_FLAGS, *flags, "--no-database",
                 "--repro-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = "--workers must be >= 1, got 0" if "0" in flags else f"cannot reach the Dask scheduler {flags[1]}"
    assert len(err) == 1 and want in err[0], err


def test_sigterm_stops_the_workers_and_keeps_what_they_ran(tmp_path: Path) -> None:
    js = tmp_path / "c.json"
    cmd = ["fuzz", "--target", "tests.fixture_targets:reference", "--dtypes", "fp32,bf16", "--checks", "forward",
           "--max-len", "64", "--max-dim", "16", "--budget", "120", "--workers", "2", "--json", str(js), "--quiet",
           "--database", str(tmp_path / "db"), "--repro-dir", str(tmp_path / "f")]
    proc = subprocess.Popen([sys.executable, "-m", "verify.commands", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    data = json.loads(js.read_text())
    assert data["interrupted"] is True and data["findings"] == []  # stopping is never a crash finding
    assert set(data["coverage"].values()) == {"interrupted"}
    assert all(r["interrupted"] and r["error"] is None for r in data["fleet"]["rows"])
    assert sum(r["examples"].get("fp32", 0) for r in data["fleet"]["rows"]) == data["examples"]["fp32"] > 0


def _message(worker: int, f: Finding, tmp: Path) -> dict:
    stem = tmp / f"w{worker}" / f"x-{f.category}-{f.dims['Lq']}"
    f.case_file = str(stem) + ".npz"
    return {"kind": "finding", "worker": worker, "finding": f.to_json(),
            "files": {stem.name + ".npz": b"npz", stem.name + ".json": b"{}"}}


def test_the_smallest_reproducer_of_a_key_is_kept_and_the_others_removed(tmp_path: Path) -> None:
    adapter = load(TWO_BUGS)
    sett = fuzz.Settings(repro_dir=tmp_path / "kept", **SMALL)
    fl = fleet_merge.Fleet(adapter.info, sett, "test", [fleet_merge.Row(0, 0), fleet_merge.Row(1, 1)])

    def finding(lq: int, describe: str = "case") -> Finding:
        dims = {"B": 1, "Lq": lq, "Lk": 4, "Hq": 1, "Hkv": 1, "Dk": 2, "Dv": 2}
        return Finding("forward", "forward", adapter.info.name, "fp32", "normal", "none", describe, dims=dims)

    seen = []
    for worker, f in ((0, finding(8)), (1, finding(2)), (0, finding(2, "a longer description")), (1, finding(5))):
        fl.receive(_message(worker, f, tmp_path), lambda f, old: seen.append((f.dims["Lq"], old and old.dims["Lq"])))
    assert seen == [(8, None), (2, 8)] and fl.raw == 4
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["x-forward-2.json", "x-forward-2.npz"]
    assert fl.origin == {("forward", "fp32", "out"): 1}
    assert fleet_merge.reproducer_size(finding(2)) < fleet_merge.reproducer_size(finding(2, "a longer description"))


def test_worker_seeds_are_distinct_and_worker_zero_keeps_the_campaign_seed() -> None:
    seeds = [fleet.worker_seed(7, i) for i in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8 and seeds == [fleet.worker_seed(7, i) for i in range(8)]
    assert fleet.worker_seed(None, 3) is None  # random stays random
