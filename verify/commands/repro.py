"""``attnverify repro FILE``: replay a saved case without Hypothesis; exit 1 if it still shows findings."""

from __future__ import annotations

import argparse

from verify import checks
from verify.case import Case, case_files
from verify.commands.common import UsageError, add_target_arguments, case_target, default, target_spec
from verify.fuzz import Settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repro", help="replay a saved case")
    p.add_argument("file", help="a case file (.npz or .json) written by a campaign")
    add_target_arguments(p, required=False)
    p.add_argument("--timeout", type=float, default=default(Settings, "timeout"), help="seconds per target call")


def run(args: argparse.Namespace) -> int:
    npz, js = case_files(args.file)
    if not js.exists() or not npz.exists():
        raise UsageError(f"no case file {js if not js.exists() else npz}")
    case = Case.load(args.file)
    meta = case.meta
    target = target_spec(args) if args.target else case_target(meta, args.file)
    adapter = target.load()
    out = checks.run_case(adapter, case, checks=tuple(meta.get("checks", checks.CHECKS)),
                          policy=meta.get("policy", "bound"), timeout=args.timeout)
    print(f"repro {args.file} on {adapter.info.name}")
    expected = meta.get("finding")
    if expected:
        print(f"  saved finding: {expected['category']} of {expected['output']} ({expected['check']} pass)")
    if out.findings:
        print()
        for f in out.findings:
            print(f.message() + "\n")
    else:
        print(f"  {case.describe()}")
    worst = ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} - (no finite result)" for k, v in out.ratios.items())
    still = ""
    if expected:
        same = any(f.category == expected["category"] and f.output == expected["output"] for f in out.findings)
        still = "; the saved finding " + ("still reproduces" if same else "no longer reproduces")
    print(f"{len(out.findings)} finding(s); worst error in allowances: {worst or '-'}{still}")
    return 1 if out.findings else 0
