"""``attnverify bundled``: the main job (``./dev run``); exit 1 when its gate fails."""

from __future__ import annotations

import argparse
from pathlib import Path

from verify import bundled
from verify.commands.common import csv, default
from verify.targets import BUNDLED


def add_parser(sub: argparse._SubParsersAction) -> None:
    S = bundled.Settings
    p = sub.add_parser("bundled", help="the main job: fuzz, reports and gate for the bundled targets")
    p.add_argument("--out", default=str(default(S, "out")))
    p.add_argument("--targets", type=csv, help=f"subset of {','.join(BUNDLED)}")
    p.add_argument("--max-examples", type=int, default=default(S, "max_examples"), help="fuzz target runs per dtype")
    p.add_argument("--workers", type=int, default=default(S, "workers"), help="report worker processes")
    p.add_argument("--max-regression", type=float, default=default(S, "max_regression"))


def run(args: argparse.Namespace) -> int:
    sett = bundled.Settings(out=Path(args.out), targets=tuple(args.targets or BUNDLED),
                            max_examples=args.max_examples, workers=args.workers, max_regression=args.max_regression)
    return bundled.run(sett)
