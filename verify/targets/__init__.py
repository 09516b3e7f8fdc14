"""Targets: bundled implementations and adapters, and loading a user's ``package.module:function``.

Each bundled target lives in its own module exposing ``INFO`` (a ``TargetInfo``) and
``attention`` (the canonical callable); importing the module imports its framework, so a missing
framework disables only the targets that need it. ``import verify.targets`` imports none.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from verify.targets.base import FEATURES, Adapter, Contract, TargetInfo, Unavailable, Unsupported

BUNDLED: dict[str, str] = {
    "chunked-jax": "verify.targets.chunked_jax",
    "chunked-torch": "verify.targets.chunked_torch",
    "paper-jax": "verify.targets.paper_jax",
    "torch-sdpa": "verify.targets.torch_sdpa",
    "jax-dpa": "verify.targets.jax_dpa",
    "mea-torch": "verify.targets.mea_torch",
    "mea-jax": "verify.targets.mea_jax",
}

__all__ = [
    "BUNDLED",
    "FEATURES",
    "Adapter",
    "Contract",
    "TargetError",
    "TargetInfo",
    "Unavailable",
    "Unsupported",
    "adapter_for",
    "load",
]


class TargetError(ValueError):
    """A target could not be named or loaded: the message says what to fix."""


def adapter_for(fn: Callable, info: TargetInfo) -> Adapter:
    """The framework adapter that runs ``fn`` as described by ``info``."""
    module = importlib.import_module(f"verify.targets.{info.framework}_adapter")
    return module.ADAPTER(fn, info)


def _bundled(name: str) -> Adapter:
    try:
        module = importlib.import_module(BUNDLED[name])
    except ImportError as exc:
        raise Unavailable(f"target {name} is unavailable: {exc}") from exc
    adapter = adapter_for(module.attention, module.INFO)
    reason = adapter.unavailable_reason()
    if reason:
        raise Unavailable(f"target {name} is unavailable: {reason}")
    return adapter


def _user_function(spec_str: str) -> Callable:
    module_name, _, attr = spec_str.partition(":")
    if not module_name or not attr:
        raise TargetError(
            f"unknown target {spec_str!r}: give a bundled name ({', '.join(BUNDLED)}) "
            "or package.module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error of the user's module is a usage error here
        raise TargetError(f"cannot import module {module_name!r} for target {spec_str!r}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise TargetError(f"module {module_name!r} has no attribute {attr!r} (target {spec_str!r})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TargetError(f"target {spec_str!r} is not callable")
    return fn


def load(
    name: str,
    *,
    framework: str | None = None,
    features: list[str] | None = None,
    masked_rows: str | None = None,
    dtypes: list[str] | None = None,
    contract: Contract | None = None,
) -> Adapter:
    """An adapter for a bundled target name or a user's ``package.module:function``.

    For a user target, metadata may be attached to the function as a dict ``fn.attnverify``
    with the same keys; explicit arguments win.
    """
    if name in BUNDLED:
        adapter = _bundled(name)
        if any(x is not None for x in (framework, features, masked_rows, dtypes, contract)):
            raise TargetError(f"{name} is bundled: its framework, features, policy and dtypes are fixed")
        return adapter
    fn = _user_function(name)
    meta = dict(getattr(fn, "attnverify", {}) or {})
    framework = framework or meta.get("framework")
    if framework is None:
        raise TargetError(f"target {name!r}: say which framework it uses (--framework torch|jax|numpy)")
    contract = contract or meta.get("contract") or Contract()
    if isinstance(contract, dict):
        contract = Contract(**contract)
    try:
        info = TargetInfo(
            name=name,
            framework=framework,
            dtypes=tuple(dtypes or meta.get("dtypes") or ("bf16", "fp16", "fp32")),
            features=frozenset(features if features is not None else meta.get("features", ())),
            masked_rows=masked_rows or meta.get("masked_rows", "zeros"),
            contract=contract,
            description=meta.get("description", "user target"),
        )
    except ValueError as exc:
        raise TargetError(f"target {name!r}: {exc}") from exc
    try:
        adapter = adapter_for(fn, info)
    except ImportError as exc:
        raise Unavailable(f"target {name} is unavailable: {exc}") from exc
    reason = adapter.unavailable_reason()
    if reason:
        raise Unavailable(f"target {name} is unavailable: {reason}")
    return adapter
