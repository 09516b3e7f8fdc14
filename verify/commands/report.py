"""``attnverify report``: an accuracy sweep into a directory, optionally gated against a baseline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verify import accuracy
from verify.commands.common import add_target_arguments, csv, default, ints, target_spec


def add_parser(sub: argparse._SubParsersAction) -> None:
    S = accuracy.Settings
    p = sub.add_parser("report", help="accuracy sweep: tables, plots, baseline gate")
    add_target_arguments(p)
    p.add_argument("--out", required=True, help="output directory (cells/ inside makes reruns resume)")
    p.add_argument("--dtypes", type=csv, default=list(default(S, "dtypes")))
    p.add_argument("--lengths", type=ints, default=list(default(S, "lengths")), help="Lq = Lk values")
    p.add_argument("--query-chunks", type=csv, default=list(default(S, "query_chunks")), help="numbers or L")
    p.add_argument("--key-chunks", type=csv, default=list(default(S, "key_chunks")), help="numbers or L")
    p.add_argument("--families", type=csv, default=list(default(S, "families")))
    p.add_argument("--masks", type=csv, default=list(default(S, "masks")), help="mask kinds")
    p.add_argument("--softcaps", type=csv, default=list(default(S, "softcaps")),
                   help="softcaps c > 0 (logits c·tanh(s/c)) or none, e.g. none,5,30,50; only none for a target "
                        "without the softcap feature (the rest listed as skipped)")
    p.add_argument("--windows", type=csv, default=list(default(S, "windows")),
                   help="sliding windows LEFT:RIGHT (query i sees keys i-LEFT..i+RIGHT; an empty side is unbounded) "
                        "or none, e.g. none,16:0,:4,64:64; only none for a target without the window feature")
    p.add_argument("--seeds", type=int, default=default(S, "seeds"), help="cases per cell")
    p.add_argument("--seed", type=int, default=default(S, "seed"), help="base seed of the inputs")
    p.add_argument("--batch", type=int, default=default(S, "batch"))
    p.add_argument("--heads", type=int, default=default(S, "heads"))
    p.add_argument("--head-dim", type=int, default=default(S, "head_dim"))
    p.add_argument("--mp-max-len", type=int, default=default(S, "mp_max_len"),
                   help="exact mp oracle up to this L, certified float64 naive reference above")
    p.add_argument("--max-chunks", type=int, default=default(S, "max_chunks"),
                   help="skip chunk sizes splitting L into more chunks")
    p.add_argument("--timeout", type=float, default=default(S, "timeout"), help="seconds per target call")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (1: in this process)")
    p.add_argument("--scheduler", help="Dask distributed scheduler address: run the sweep on that cluster")
    p.add_argument("--fresh", action="store_true", help="recompute every cell, ignoring OUT/cells")
    p.add_argument("--baseline", help="a previous report.json: exit 1 on cells whose error grew")
    p.add_argument("--max-regression", type=float, default=accuracy.DEFAULT_MAX_REGRESSION,
                   help="allowed growth factor of a cell's max error against the baseline")
    p.add_argument("--findings", help="a fuzz campaign's --json file: its findings go into the report")
    p.add_argument("--image-base", help="URL prefix for report.md's images (links that work in a PR comment)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _read_json(path: str, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Sweep, write the outputs, gate against a baseline; returns the exit status."""
    sett = accuracy.Settings(
        dtypes=tuple(args.dtypes), lengths=tuple(args.lengths), query_chunks=tuple(args.query_chunks),
        key_chunks=tuple(args.key_chunks), families=tuple(args.families), masks=tuple(args.masks),
        softcaps=tuple(args.softcaps), windows=tuple(args.windows), seeds=args.seeds,
        seed=args.seed, batch=args.batch, heads=args.heads, head_dim=args.head_dim, mp_max_len=args.mp_max_len,
        max_chunks=args.max_chunks, timeout=args.timeout)
    baseline = _read_json(args.baseline, "baseline") if args.baseline else None
    findings = _read_json(args.findings, "campaign")["findings"] if args.findings else None
    out = Path(args.out)
    target = target_spec(args)
    try:
        report = accuracy.sweep(target, sett, out, workers=args.workers, scheduler=args.scheduler, fresh=args.fresh,
                                progress=accuracy.progress_printer(target.name, not args.quiet))
    except KeyboardInterrupt:
        n = len(list((out / "cells").glob("*.json")))
        print(f"interrupted: {n} finished cells are in {out / 'cells'}; run the same command to resume",
              file=sys.stderr)
        return 130
    if findings is not None:
        report["findings"] = findings
    if baseline is not None:
        report["gate"] = {"baseline": str(args.baseline), **accuracy.gate(report, baseline, args.max_regression)}
    accuracy.write(report, out, args.image_base)
    r = report["run"]
    print(f"report {report['target']['name']}: {len(report['cells'])} cells ({r['computed']} computed, "
          f"{r['reused']} reused) in {r['seconds']:.1f} s -> {out / 'report.md'}, {out / 'index.html'}")
    if baseline is None:
        return 0
    g = report["gate"]
    print(f"baseline gate: {accuracy.verdict(g)}")
    for line in accuracy.regression_lines(g):
        print("  " + line)
    return 1 if g["regressions"] else 0
