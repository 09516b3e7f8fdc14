"""Targets: bundled implementations and adapters, and naming a user's ``package.module:function``.

Each bundled target lives in its own module exposing ``INFO`` (a ``TargetInfo``) and
``attention`` (the canonical callable); importing the module imports its framework, so a missing
framework disables only the targets that need it. ``import verify.targets`` imports none.
``TargetSpec`` (``verify.targets.loader``) is how a name plus declarations becomes an adapter.
"""

from verify.targets.base import DEFAULT_DTYPES, FEATURES, Adapter, Contract, TargetInfo, Unavailable, Unsupported
from verify.targets.loader import BUNDLED, TARGET_OPTIONS, TargetError, TargetSpec, adapter_for, load

__all__ = [
    "BUNDLED",
    "DEFAULT_DTYPES",
    "FEATURES",
    "TARGET_OPTIONS",
    "Adapter",
    "Contract",
    "TargetError",
    "TargetInfo",
    "TargetSpec",
    "Unavailable",
    "Unsupported",
    "adapter_for",
    "load",
]
