"""``attnverify``: the command line, one module per subcommand (each ``add_parser`` + ``run``).

    attnverify demo                       one case: mp oracle vs naive reference
    attnverify targets [--target T ...]   what can run here, with features, policy and contract
    attnverify fuzz --target T [...]      a campaign; exit 0 clean, 1 findings, 3 incomplete
    attnverify repro FILE                 replay a saved finding without Hypothesis
    attnverify export FILE                the finding as a standalone pytest file, for a bug report
    attnverify report --target T --out D  accuracy sweep: tables, plots, baseline gate
    attnverify memory --target T          temporary memory against length per chunk policy
    attnverify bundled [--out reports]    the main job: fuzz + reports + gate for every bundled target

Usage errors (unknown target, unimportable module, bad flag or value) exit 2 with one line on
stderr. The library (everything outside this package) never imports it.
"""

from __future__ import annotations

import os
import sys

from verify.commands import bundled, demo, export, fuzz, memory, report, repro, targets
from verify.commands.common import Parser, UsageError
from verify.targets import TargetError, Unavailable

COMMANDS = {"demo": demo, "targets": targets, "fuzz": fuzz, "repro": repro, "export": export, "report": report,
            "memory": memory, "bundled": bundled}


def build_parser() -> Parser:
    p = Parser(prog="attnverify", description="verify and fuzz chunked attention implementations")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The console script: parse, run the subcommand, turn usage errors into one line and exit 2."""
    sys.path.insert(0, os.getcwd())  # user targets are importable from the working directory
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError(f"give a command: {', '.join(COMMANDS)}")
        return COMMANDS[args.command].run(args)
    except (UsageError, TargetError, Unavailable, ValueError) as exc:
        print(f"attnverify: error: {exc}", file=sys.stderr)
        return 2
