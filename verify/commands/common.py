"""What every subcommand shares: usage errors, list arguments, the target flags and settings defaults."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from verify.targets import BUNDLED, TARGET_OPTIONS, TargetSpec


class UsageError(Exception):
    """Bad command line: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2 (``UsageError``)."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def csv(text: str) -> list[str]:
    """A comma list: ``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    """A comma list of positive integers."""
    try:
        values = [int(x) for x in csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of a settings dataclass: argparse defaults come from there, never twice."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


_DECLARED = "declared_"  # dests of the declaration flags, apart from run settings of the same name (--dtypes)


def add_target_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--target`` and the declaration flags of ``TARGET_OPTIONS``."""
    p.add_argument("--target", required=required, help="bundled name or package.module:function")
    for opt in TARGET_OPTIONS:
        dest = _DECLARED + opt.field
        if opt.kind == "bool":
            p.add_argument(f"--{opt.flag}", dest=dest, action=argparse.BooleanOptionalAction, default=None,
                           help=opt.help.replace("%", "%%"))
        else:
            p.add_argument(f"--{opt.flag}", dest=dest, type={"csv": csv, "ints": ints}.get(opt.kind, str),
                           choices=opt.choices, help=opt.help.replace("%", "%%"))


def target_spec(args: argparse.Namespace) -> TargetSpec:
    """The ``TargetSpec`` that ``--target`` and the declaration flags describe."""
    declared = {opt.field: getattr(args, _DECLARED + opt.field) for opt in TARGET_OPTIONS}
    return TargetSpec(args.target, **{k: v for k, v in declared.items() if v is not None})


def case_target(case_meta: dict, file: str) -> TargetSpec:
    """The target a saved case names: a ``TargetSpec`` (format 2), or a name and declarations (format 1)."""
    named = case_meta.get("target")
    if isinstance(named, dict):
        return TargetSpec.from_meta(named)
    if isinstance(named, str):  # format 1: the name, with a user target's declarations beside it
        if named in BUNDLED:
            return TargetSpec(named)
        contract = case_meta.get("contract") or {}
        return TargetSpec(named, framework=case_meta.get("framework"), features=case_meta.get("features"),
                          masked_rows=case_meta.get("masked_rows"), dtypes=case_meta.get("dtypes"), **contract)
    raise UsageError(f"{file}: the case names no target; pass --target")
