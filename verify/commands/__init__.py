"""``attnverify``: the command line, one module per subcommand (each ``add_parser`` + ``run``).

    attnverify demo                       one case: mp oracle vs naive reference
    attnverify targets [--target T ...]   what can run here, with features, policy and contract
    attnverify fuzz --target T [...]      a campaign; exit 0 clean, 1 findings, 3 incomplete
    attnverify repro FILE                 replay a saved finding without Hypothesis
    attnverify export FILE                the finding as a standalone pytest file, for a bug report
    attnverify report --target T --out D  accuracy sweep: tables, plots, baseline gate
    attnverify memory --target T          temporary memory against length per chunk policy
    attnverify bundled [--out reports]    the main job: fuzz + reports + gate for every bundled target

Usage errors (unknown target, unimportable module, bad flag or value, a path that cannot be read
or written) exit 2 with one line on stderr. Anything else that escapes a command is a bug of
attnverify, not of the input or of the target (a target's exceptions are findings): it exits 4
with its traceback, so that a harness bug never reads as bad input (2) or as findings (1, Python's
own status for an uncaught exception).
The library (everything outside this package) never imports it.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

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
    except (UsageError, TargetError, Unavailable, OSError) as exc:  # OSError: a path that cannot be read or written
        print(f"attnverify: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if not _rejected_input(exc):
            return _internal_error(exc)
        print(f"attnverify: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - every other escape is a harness bug, reported as one
        return _internal_error(exc)


INTERNAL_ERROR = 4
_OURS = tuple(str(Path(__file__).resolve().parents[2] / d) + os.sep for d in ("verify", "oracles"))


def _rejected_input(exc: ValueError) -> bool:
    """Whether ``exc`` is one of attnverify's own checks of its input: a ``raise`` statement in
    ``verify/`` or ``oracles/``. A ValueError from inside numpy, jax or torch, or from an unpacking in
    our code, is a bug of the harness instead."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    return last.filename.startswith(_OURS) and (last.line or "").lstrip().startswith("raise ")


def _internal_error(exc: BaseException) -> int:
    traceback.print_exception(exc, file=sys.stderr)
    print(f"attnverify: internal error ({type(exc).__name__}: {exc}): a bug of attnverify, not of the input or "
          f"of the target; the traceback above says where", file=sys.stderr)
    return INTERNAL_ERROR
