"""Naming a target: ``TargetSpec`` is the one way flags, function metadata and case files become a target.

A spec is a name (a bundled target, or ``package.module:function``) plus the declarations given
on the command line, in pytest options or in a case file. ``TargetSpec.load`` resolves them, for
a user target, against the dict ``fn.attnverify`` attached to the function: a field given in the
spec wins, then the function's metadata, then ``TargetInfo``'s defaults. The contract merges
field by field, so ``--accumulate input`` keeps the function's ``round_logits``.

``TARGET_OPTIONS`` lists the declaration flags once; the command line and the pytest plugin both
build their options from it. A spec is plain and picklable: worker processes and Dask workers
load the same target from it, and ``to_meta``/``from_meta`` carry it in case files.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

from oracles import spec as semantics
from verify.targets.base import CONSTRAINTS, EMPTY_LSE, FEATURES, FRAMEWORKS, Adapter, Contract, TargetInfo, Unavailable

BUNDLED: dict[str, str] = {
    "chunked-jax": "verify.targets.chunked_jax",
    "chunked-torch": "verify.targets.chunked_torch",
    "paper-jax": "verify.targets.paper_jax",
    "torch-sdpa": "verify.targets.torch_sdpa",
    "jax-dpa": "verify.targets.jax_dpa",
    "mea-torch": "verify.targets.mea_torch",
    "mea-jax": "verify.targets.mea_jax",
    "triton-flash": "verify.targets.triton_flash",
    "torch-sdpa-flash": "verify.targets.torch_sdpa_flash",
    "torch-flex": "verify.targets.torch_flex",
}


class TargetError(ValueError):
    """A target could not be named or loaded: the message says what to fix."""


class Option(NamedTuple):
    """One declaration flag: its spec field, command-line flag, kind and help text."""

    field: str
    flag: str
    kind: str  # "str", "csv" or "bool" (a --flag / --no-flag pair)
    help: str
    choices: tuple[str, ...] | None = None


TARGET_OPTIONS: tuple[Option, ...] = (
    Option("framework", "framework", "str", "framework of a user target", FRAMEWORKS),
    Option("features", "features", "csv", f"declared features, comma list of {','.join(FEATURES)}"),
    Option("masked_rows", "masked-rows", "str", f"declared policy for rows with no visible key: one of "
           f"{','.join(semantics.MASKED_ROW_POLICIES)}, or one per mechanism (mask:uniform,bias:nan)"),
    Option("dtypes", "target-dtypes", "csv", "dtypes the target supports (user targets)"),
    Option("accumulate", "accumulate", "str", "precision contract: dtype of accumulation and statistics",
           ("fp32", "input")),
    Option("round_logits", "round-logits", "bool", "precision contract: logits rounded to the input dtype"),
    Option("round_probs", "round-probs", "bool", "precision contract: probabilities rounded to the input dtype"),
    Option("constraints", "constraints", "csv", f"calls the target cannot take, comma list of {','.join(CONSTRAINTS)}"),
    Option("empty_lse", "empty-lse", "str", "lse the target returns for a row with no visible key", EMPTY_LSE),
    Option("nondeterministic", "nondeterministic", "bool", "run-to-run differences allowed (within the allowance)"),
    Option("device", "device", "str", "where a user target runs: cpu, cuda, cuda:1 (torch) or gpu (jax)"),
    Option("tiles", "tiles", "ints", "the kernel's fixed tile sizes, comma list (e.g. 64,128): large cases "
           "take lengths at their multiples +-1"),
)
_CONTRACT_FIELDS = ("accumulate", "round_logits", "round_probs")


@dataclass(frozen=True)
class TargetSpec:
    """A target name plus the declarations given for it (None: not given, resolved on load)."""

    name: str
    framework: str | None = None
    features: tuple[str, ...] | None = None
    masked_rows: str | None = None
    dtypes: tuple[str, ...] | None = None
    accumulate: str | None = None
    round_logits: bool | None = None
    round_probs: bool | None = None
    constraints: tuple[str, ...] | None = None
    empty_lse: str | None = None
    nondeterministic: bool | None = None
    device: str | None = None
    tiles: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("features", "dtypes", "constraints", "tiles"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def bundled(self) -> bool:
        return self.name in BUNDLED

    def declared(self) -> dict:
        """The declarations that were given (fields other than ``name`` that are not None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name" and getattr(self, f.name)
                is not None}

    def load(self) -> Adapter:
        """The adapter for this target (imports its framework); ``TargetError`` / ``Unavailable`` say why not."""
        if self.bundled:
            if self.declared():
                raise TargetError(f"{self.name} is bundled: its framework, features, policy, dtypes and contract "
                                  f"are fixed (got {', '.join(sorted(self.declared()))})")
            try:
                module = importlib.import_module(BUNDLED[self.name])
            except ImportError as exc:
                raise Unavailable(f"target {self.name} is unavailable: {exc}") from exc
            return _checked(adapter_for(module.attention, module.INFO, self))
        fn = _user_function(self.name)
        info = self._resolve(dict(getattr(fn, "attnverify", None) or {}))
        try:
            adapter = adapter_for(fn, info, self)
        except ImportError as exc:
            raise Unavailable(f"target {self.name} is unavailable: {exc}") from exc
        return _checked(adapter)

    def _resolve(self, meta: dict) -> TargetInfo:
        """This spec's declarations over the function's metadata over the defaults."""
        unknown = set(meta) - {"framework", "features", "masked_rows", "dtypes", "contract", "description", "notes",
                               "constraints", "empty_lse", "nondeterministic", "device", "tiles"}
        if unknown:
            raise TargetError(f"target {self.name!r}: unknown keys {sorted(unknown)} in its attnverify metadata")
        framework = self.framework or meta.get("framework")
        if framework is None:
            raise TargetError(f"target {self.name!r}: say which framework it uses (--framework torch|jax|numpy)")
        contract = dict(meta.get("contract") or {})
        if isinstance(meta.get("contract"), Contract):
            contract = asdict(meta["contract"])
        contract.update({k: getattr(self, k) for k in _CONTRACT_FIELDS if getattr(self, k) is not None})
        kw = {"name": self.name, "framework": framework, "description": meta.get("description", "user target"),
              "notes": meta.get("notes", "")}
        for name in ("features", "masked_rows", "dtypes", "constraints", "empty_lse", "nondeterministic", "device",
                     "tiles"):
            value = getattr(self, name) if getattr(self, name) is not None else meta.get(name)
            if value is not None:
                kw[name] = (frozenset(value) if name in ("features", "constraints") else tuple(value)
                            if name in ("dtypes", "tiles") else value)
        try:
            return TargetInfo(contract=Contract(**contract), **kw)
        except (TypeError, ValueError) as exc:
            raise TargetError(f"target {self.name!r}: {exc}") from exc

    def to_meta(self) -> dict:
        """JSON-ready: the name and the declarations given (what ``from_meta`` reads back)."""
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.declared().items()}}

    @classmethod
    def from_meta(cls, meta: dict) -> TargetSpec:
        """The spec ``to_meta`` wrote; ``TargetError`` naming an unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = set(meta) - known
        if unknown or "name" not in meta:
            raise TargetError(f"target metadata {meta!r}: needs 'name'; unknown keys {sorted(unknown)}")
        return cls(**meta)

    @classmethod
    def for_info(cls, info: TargetInfo) -> TargetSpec:
        """A spec that pins every declaration of a loaded user target (bundled: the name alone)."""
        if info.name in BUNDLED:
            return cls(info.name)
        c = info.contract
        return cls(info.name, info.framework, tuple(sorted(info.features)), info.masked_rows, tuple(info.dtypes),
                   c.accumulate, c.round_logits, c.round_probs, tuple(sorted(info.constraints)), info.empty_lse,
                   info.nondeterministic, info.device, tuple(info.tiles))


def load(name: str, **declared: object) -> Adapter:
    """``TargetSpec(name, **declared).load()``: the adapter for a bundled name or ``package.module:function``."""
    return TargetSpec(name, **{k: v for k, v in declared.items() if v is not None}).load()


def adapter_for(fn: Callable, info: TargetInfo, target: TargetSpec | None = None) -> Adapter:
    """The framework adapter that runs ``fn`` as ``info`` describes (``target``: how to load it again)."""
    module = importlib.import_module(f"verify.targets.{info.framework}_adapter")
    return module.ADAPTER(fn, info, target)


def _checked(adapter: Adapter) -> Adapter:
    reason = adapter.unavailable_reason()
    if reason:
        raise Unavailable(f"target {adapter.info.name} is unavailable: {reason}")
    return adapter


def _user_function(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise TargetError(f"unknown target {name!r}: give a bundled name ({', '.join(BUNDLED)}) "
                          "or package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error of the user's module is a usage error here
        raise TargetError(f"cannot import module {module_name!r} for target {name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise TargetError(f"module {module_name!r} has no attribute {attr!r} (target {name!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TargetError(f"target {name!r} is not callable")
    return fn
