"""``attnverify export FILE``: a saved finding as a standalone pytest file (for a bug report upstream)."""

from __future__ import annotations

import argparse
from pathlib import Path

from verify import checks
from verify.case import Case, case_files
from verify.commands.common import UsageError, add_target_arguments, case_target, target_spec
from verify.export import export


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a standalone pytest file that reproduces one finding")
    p.add_argument("file", help="a case file (.npz or .json) written by a campaign")
    p.add_argument("--out", help="the test file to write (default: test_<case file stem>.py here)")
    add_target_arguments(p, required=False)


def run(args: argparse.Namespace) -> int:
    npz, js = case_files(args.file)
    if not js.exists() or not npz.exists():
        raise UsageError(f"no case file {js if not js.exists() else npz}")
    case = Case.load(args.file)
    target = target_spec(args) if args.target else case_target(case.meta, args.file)
    adapter = target.load()
    found = checks.run_case(adapter, case, checks=("forward", "grad")).findings
    message = "\n".join(f.message() for f in found) or f"(no finding on {adapter.info.name} now)"
    out = Path(args.out or f"test_{npz.stem.replace('-', '_').replace('.', '_')}.py")
    out.write_text(export(adapter, case, message))
    print(f"wrote {out}: pytest {out} fails while the finding stands ({len(found)} finding(s) now)")
    return 0
