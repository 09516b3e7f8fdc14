"""``attnverify bundled``: the main job, the gate and the reports for every bundled target.

For each bundled target that can run here: a fuzz campaign (the CI profile: seed 0, all checks,
bf16/fp16/fp32), an accuracy sweep (``verify.report``, re-measured from scratch) gated against the
committed ``report.json`` when one exists, and memory against length (``verify.memory``) for
``MEMORY_TARGETS`` with their dense references. Everything
goes to ``--out`` (``reports/`` by default), with ``README.md`` summarising it.

Exit status 1 when the job's gate fails: a finding on one of *our* implementations
(``OURS``: the corrected chunked kernels), or an accuracy regression of any target against its
committed baseline. Findings on third-party targets are the point of reporting them, not a failure.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from verify import fuzz, memory, report
from verify.targets import BUNDLED, Unavailable, load

OURS = ("chunked-jax", "chunked-torch")
MEMORY_TARGETS = ("chunked-jax", "paper-jax")


def _fuzz(name: str, out: Path, max_examples: int) -> dict:
    adapter = load(name)
    sett = fuzz.Settings(max_examples=max_examples, database=None, repro_dir=out / "findings")
    camp = fuzz.run(adapter, sett, json_path=out / "fuzz.json")
    cats = Counter(f"{f.category}/{f.dtype}" for f in camp.findings)
    return {"examples": sum(camp.examples.values()), "seconds": camp.seconds["total"],
            "findings": len(camp.findings), "by_category": dict(sorted(cats.items()))}


def _report(name: str, out: Path, workers: int, max_regression: float) -> dict:
    committed = out / "report.json"
    baseline = json.loads(committed.read_text()) if committed.exists() else None
    rep = report.sweep(report.TargetSpec(name), report.Settings(), out, workers=workers, fresh=True,
                       progress=False)
    summary = {"cells": len(rep["cells"]), "seconds": rep["run"]["seconds"], "regressions": None}
    if baseline is not None:
        rep["gate"] = {"baseline": str(committed), **report.gate(rep, baseline, max_regression)}
        summary["regressions"] = len(rep["gate"]["regressions"])
    report.write(rep, out)
    return summary


def run(args: argparse.Namespace) -> int:
    """Run every stage for every target; print and write the summary; return the gate's status."""
    out = Path(args.out)
    names = args.targets or list(BUNDLED)
    rows, failures = [], []
    for name in names:
        if name not in BUNDLED:
            raise ValueError(f"unknown bundled target {name!r}; known: {', '.join(BUNDLED)}")
        try:
            load(name)
        except Unavailable as exc:
            rows.append({"target": name, "unavailable": str(exc)})
            print(f"{name}: skipped, {exc}", flush=True)
            continue
        tdir = out / name
        t0 = time.perf_counter()
        print(f"{name}: fuzzing ({args.max_examples} examples per dtype)", flush=True)
        fz = _fuzz(name, tdir, args.max_examples)
        print(f"{name}: {fz['findings']} finding(s) in {fz['examples']} examples; accuracy sweep", flush=True)
        rp = _report(name, tdir, args.workers, args.max_regression)
        rows.append({"target": name, "fuzz": fz, "report": rp, "seconds": time.perf_counter() - t0})
        if name in OURS and fz["findings"]:
            failures.append(f"{name}: {fz['findings']} finding(s), see {tdir / 'fuzz.json'}")
        if rp["regressions"]:
            failures.append(f"{name}: {rp['regressions']} accuracy regression(s), see {tdir / 'report.md'}")
    for name in MEMORY_TARGETS:
        if name in names and not any(r["target"] == name and "unavailable" in r for r in rows):
            print(f"{name}: memory against length", flush=True)
            margs = memory.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
                ["--target", name, "--out", str(out / name / "memory")])
            memory.run(margs)
    (out / "summary.json").write_text(json.dumps({"targets": rows, "failures": failures}, indent=2) + "\n")
    (out / "README.md").write_text(_markdown(rows, failures))
    print(_markdown(rows, failures))
    return 1 if failures else 0


def _markdown(rows: list[dict], failures: list[str]) -> str:
    lines = ["# attnverify: bundled targets", "",
             "Made by `./dev run` (`attnverify bundled`). Per target: the fuzz campaign's findings "
             "(`<target>/fuzz.json`, case files in `<target>/findings/`, replay with `attnverify repro`) and "
             "the accuracy report (`<target>/report.md`, `<target>/index.html`); memory against length in "
             "`<target>/memory/memory.md` for chunked-jax and paper-jax.", "",
             "| target | fuzz examples | findings | by category/dtype | report cells | vs committed baseline |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['target']} | unavailable: {r['unavailable']} | | | | |")
            continue
        fz, rp = r["fuzz"], r["report"]
        cats = ", ".join(f"{k} ×{v}" for k, v in fz["by_category"].items()) or "-"
        gate = "no baseline" if rp["regressions"] is None else (
            "pass" if rp["regressions"] == 0 else f"{rp['regressions']} regression(s)")
        lines.append(f"| [{r['target']}]({r['target']}/report.md) | {fz['examples']} | {fz['findings']} | {cats} "
                     f"| {rp['cells']} | {gate} |")
    lines += ["", "Gate: " + ("FAIL\n\n" + "\n".join(f"- {f}" for f in failures) if failures else "pass"), ""]
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``attnverify bundled`` to the CLI's subparsers."""
    from verify.cli import _csv

    p = subparsers.add_parser("bundled", help="the main job: fuzz, reports and gate for the bundled targets")
    p.add_argument("--out", default="reports")
    p.add_argument("--targets", type=_csv, help=f"subset of {','.join(BUNDLED)}")
    p.add_argument("--max-examples", type=int, default=100, help="fuzz examples per dtype")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-regression", type=float, default=report.DEFAULT_MAX_REGRESSION)
    return p
