"""The main job (``attnverify bundled``, ``./dev run``): fuzz, accuracy reports and gate for every bundled target.

For each bundled target that can run here: a fuzz campaign (the CI profile: seed 0, all checks,
bf16/fp16/fp32), an accuracy sweep (re-measured from scratch) gated against the committed
``report.json`` when one of the same schema exists, and memory against length for
``MEMORY_TARGETS`` with their dense references. Everything goes to ``out`` (``reports/``), with
``README.md`` summarising it.

The committed outputs are reproducible: seeded campaigns, deterministic figures, no timings in
them. Every second measured goes to one file meant to change, ``timings.json``; the job reads the
previous one to say up front how long it will take, and prints progress while it runs.

Exit status 1 when the gate fails: a finding on one of *our* implementations (``OURS``: the
corrected chunked kernels), or an accuracy regression of any target against its committed baseline.
Findings on third-party targets are the point of reporting them, not a failure.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from verify import accuracy, fuzz, memory
from verify.targets import BUNDLED, TargetSpec, Unavailable

OURS = ("chunked-jax", "chunked-torch")
MEMORY_TARGETS = ("chunked-jax", "paper-jax")


@dataclass(frozen=True)
class Settings:
    """The main job's knobs (the command line's defaults come from here)."""

    out: Path = Path("reports")
    targets: tuple[str, ...] = tuple(BUNDLED)
    max_examples: int = 100  # fuzz target runs per dtype
    workers: int = 2
    max_regression: float = accuracy.DEFAULT_MAX_REGRESSION


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fuzz(name: str, out: Path, max_examples: int, timings: dict) -> tuple[dict, list[dict]]:
    findings_dir = out / "findings"
    shutil.rmtree(findings_dir, ignore_errors=True)  # only this run's case files stay
    sett = fuzz.Settings(max_examples=max_examples, database=None, repro_dir=findings_dir)
    last = [time.monotonic()]

    def progress(camp: fuzz.Campaign, dtype: str) -> None:
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            _say(f"  ... {name}: fuzzing {dtype}, {sum(camp.examples.values())} examples, "
                 f"{len(camp.findings)} finding(s)")

    camp = fuzz.run(TargetSpec(name).load(), sett, on_progress=progress)
    data = camp.to_json()
    timings["fuzz"] = data.pop("seconds")
    (out / "fuzz.json").write_text(json.dumps(data, indent=2) + "\n")
    cats = Counter(f"{f.category}/{f.dtype}" for f in camp.findings)
    return {"examples": sum(camp.examples.values()), "findings": len(camp.findings),
            "by_category": dict(sorted(cats.items()))}, data["findings"]


def _report(name: str, out: Path, findings: list[dict], sett: Settings, timings: dict) -> dict:
    committed = out / "report.json"
    baseline = json.loads(committed.read_text()) if committed.exists() else None
    rep = accuracy.sweep(TargetSpec(name), accuracy.Settings(), out, workers=sett.workers, fresh=True,
                         progress=accuracy.progress_printer(name))
    rep["findings"] = findings
    summary = {"cells": len(rep["cells"]), "regressions": None, "baseline": "none committed"}
    if baseline is not None and baseline.get("schema_version") != accuracy.SCHEMA_VERSION:
        summary["baseline"] = f"schema {baseline.get('schema_version')} (this job writes {accuracy.SCHEMA_VERSION}): " \
                              "regenerated, not gated"
    elif baseline is not None:
        rep["gate"] = {"baseline": str(committed), **accuracy.gate(rep, baseline, sett.max_regression)}
        summary["regressions"] = len(rep["gate"]["regressions"])
        summary["baseline"] = "gated"
    timings["report"] = rep["run"]["seconds"]
    accuracy.write(rep, out, timings=False)
    return summary


def run(sett: Settings) -> int:
    """Run every stage for every target; write the summary and ``timings.json``; return the gate's status."""
    out = sett.out
    unknown = [n for n in sett.targets if n not in BUNDLED]
    if unknown:
        raise ValueError(f"unknown bundled target {unknown[0]!r}; known: {', '.join(BUNDLED)}")
    previous = _read(out / "timings.json")
    if previous.get("total"):
        _say(f"bundled: the last run took {previous['total'] / 60:.1f} min ({out / 'timings.json'})")
    rows, failures, timings = [], [], {}
    t_start = time.perf_counter()
    for name in sett.targets:
        try:
            TargetSpec(name).load()
        except Unavailable as exc:
            rows.append({"target": name, "unavailable": str(exc)})
            _say(f"{name}: skipped, {exc}")
            continue
        tdir = out / name
        tdir.mkdir(parents=True, exist_ok=True)
        t = timings[name] = {}
        _say(f"{name}: fuzzing ({sett.max_examples} examples per dtype)")
        fz, found = _fuzz(name, tdir, sett.max_examples, t)
        _say(f"{name}: {fz['findings']} finding(s) in {fz['examples']} examples; accuracy sweep")
        rp = _report(name, tdir, found, sett, t)
        rows.append({"target": name, "fuzz": fz, "report": rp})
        if name in OURS and fz["findings"]:
            failures.append(f"{name}: {fz['findings']} finding(s), see {tdir / 'fuzz.json'}")
        if rp["regressions"]:
            failures.append(f"{name}: {rp['regressions']} accuracy regression(s), see {tdir / 'report.md'}")
        if name in MEMORY_TARGETS:
            _say(f"{name}: memory against length")
            t0 = time.perf_counter()
            memory.run(TargetSpec(name), memory.Settings(), tdir / "memory")
            t["memory"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps({"targets": rows, "failures": failures}, indent=2) + "\n")
    (out / "timings.json").write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
    text = _markdown(rows, failures)
    (out / "README.md").write_text(text)
    print(text)
    print(f"bundled: {timings['total'] / 60:.1f} min; timings in {out / 'timings.json'}")
    return 1 if failures else 0


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _markdown(rows: list[dict], failures: list[str]) -> str:
    lines = ["# attnverify: bundled targets", "",
             "Made by `./dev run` (`attnverify bundled`). Per target: the fuzz campaign's findings "
             "(`<target>/fuzz.json`, case files in `<target>/findings/`, replay with `attnverify repro`) and "
             "the accuracy report (`<target>/report.md`, `<target>/index.html`); memory against length in "
             f"`<target>/memory/memory.md` for {' and '.join(MEMORY_TARGETS)}. Seeded and deterministic: "
             "rerunning it changes only `timings.json`.", "",
             "| target | fuzz examples | findings | by category/dtype | report cells | committed baseline |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['target']} | unavailable: {r['unavailable']} | | | | |")
            continue
        fz, rp = r["fuzz"], r["report"]
        cats = ", ".join(f"{k} ×{v}" for k, v in fz["by_category"].items()) or "-"
        gate = rp["baseline"] if rp["regressions"] is None else (
            "pass" if rp["regressions"] == 0 else f"{rp['regressions']} regression(s)")
        lines.append(f"| [{r['target']}]({r['target']}/report.md) | {fz['examples']} | {fz['findings']} | {cats} "
                     f"| {rp['cells']} | {gate} |")
    lines += ["", "Gate: " + ("FAIL\n\n" + "\n".join(f"- {f}" for f in failures) if failures else "pass"), ""]
    return "\n".join(lines)
