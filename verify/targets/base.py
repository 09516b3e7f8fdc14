"""The target protocol: what an implementation under test declares, and the adapter that runs it.

A target is a callable with the canonical signature (framework-native arrays in and out)::

    attention(q, k, v, *, mask=None, bias=None, scale=None, causal=False,
              query_chunk_size=None, key_chunk_size=None) -> out [B, Lq, Hq, Dv]

Its ``TargetInfo`` says which of ``FEATURES`` it supports; the adapter passes only those keyword
arguments, so a target without ``chunks`` never sees chunk sizes. Framework adapters
(``torch_adapter``, ``jax_adapter``, ``numpy_adapter``) convert a ``Case`` to native arrays of
the case's dtype, call the target, and run its VJP with the framework's own autodiff. Nothing
here imports a framework.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from oracles import spec
from verify.case import Case

if TYPE_CHECKING:
    from verify.targets.loader import TargetSpec

FEATURES = ("mask", "bias", "causal", "gqa", "chunks", "lse", "grad",
            "bottom-right", "window", "softcap", "alibi", "sinks", "segments")
FRAMEWORKS = ("torch", "jax", "numpy")
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")  # what a target declares unless it says otherwise; what campaigns run


class Unavailable(RuntimeError):
    """The target cannot run here (framework missing, device absent); the message says why."""


class Unsupported(ValueError):
    """The case uses something the target did not declare (feature or dtype)."""


@dataclass(frozen=True)
class Contract:
    """How a target computes, so the tolerance model charges the right rounding terms.

    ``accumulate``: dtype of dot-product accumulation and softmax statistics, ``"fp32"`` (what
    every serious low-precision kernel does) or ``"input"`` (everything in the input dtype).
    ``round_logits`` / ``round_probs``: logits / probabilities rounded to the input dtype before
    ``exp`` / before ``p @ v`` (a plain framework implementation does both; flash kernels round
    only the probabilities).
    """

    accumulate: str = "fp32"
    round_logits: bool = False
    round_probs: bool = True

    def __post_init__(self) -> None:
        if self.accumulate not in ("fp32", "input"):
            raise ValueError(f"contract accumulate must be 'fp32' or 'input', got {self.accumulate!r}")


@dataclass(frozen=True)
class TargetInfo:
    """Everything the harness knows about a target besides its code."""

    name: str
    framework: str
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    features: frozenset[str] = frozenset()
    masked_rows: str = "zeros"
    contract: Contract = field(default_factory=Contract)
    device: str = "cpu"
    description: str = ""
    notes: str = ""  # why the policy and contract are what they are

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {self.framework!r}; known: {', '.join(FRAMEWORKS)}")
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; known: {', '.join(FEATURES)}")
        for d in self.dtypes:
            spec.dtype_name(d)
        if self.masked_rows not in spec.MASKED_ROW_POLICIES:
            raise ValueError(
                f"unknown masked-row policy {self.masked_rows!r}; known: {', '.join(spec.MASKED_ROW_POLICIES)}"
            )

    def unexercised(self) -> list[str]:
        """Features the harness will not test for this target (for every report)."""
        return [f for f in FEATURES if f not in self.features]


class Adapter:
    """Runs a target on cases; framework subclasses supply the array conversions and autodiff."""

    def __init__(self, fn: Callable, info: TargetInfo, target: TargetSpec | None = None) -> None:
        self.fn = fn
        self.info = info
        self.target = target  # how to load this target again (worker processes); None: only in this process

    def unavailable_reason(self) -> str | None:
        """None when the target can run here, else a sentence saying why not."""
        return None

    def kwargs(self, case: Case) -> dict:
        """The keyword arguments this target receives for ``case``; Unsupported if it cannot."""
        feats = self.info.features
        if case.dtype not in self.info.dtypes:
            raise Unsupported(f"{self.info.name} does not declare dtype {case.dtype}")
        d = case.dims
        if d["Hq"] != d["Hkv"] and "gqa" not in feats:
            raise Unsupported(f"{self.info.name} does not declare gqa (Hq={d['Hq']}, Hkv={d['Hkv']})")
        kw: dict = {"scale": case.scale}
        for name, value, on in (
            ("mask", case.mask, case.mask is not None),
            ("bias", case.bias, case.bias is not None),
            ("causal", True, case.causal),
        ):
            if on:
                if name not in feats:
                    raise Unsupported(f"{self.info.name} does not declare {name}")
                kw[name] = value
        if "chunks" in feats:
            kw["query_chunk_size"] = case.query_chunk_size
            kw["key_chunk_size"] = case.key_chunk_size
        return kw

    def forward(self, case: Case) -> np.ndarray:
        """The target's output for ``case`` as a numpy array of the dtype it returned."""
        raise NotImplementedError

    def vjp(self, case: Case) -> dict[str, np.ndarray]:
        """``dq, dk, dv`` (and ``dbias`` with a bias) for cotangent ``case.g``, by autodiff."""
        raise NotImplementedError


def require_default_scale(target: str, scale: float | None, dk: int) -> None:
    """Decline (``Unsupported``) a scale other than ``1/sqrt(Dk)`` for a kernel that cannot take one."""
    if scale is not None and not math.isclose(scale * math.sqrt(dk), 1.0, rel_tol=1e-12):
        raise Unsupported(f"{target} always scales logits by 1/sqrt(Dk) = {1 / math.sqrt(dk):.6g}; got scale={scale}")


def require_equal_heads(target: str, hq: int, hkv: int) -> None:
    """Decline grouped-query attention for a kernel that needs as many kv heads as query heads."""
    if hq != hkv:
        raise Unsupported(f"{target} has no grouped-query attention (Hq={hq}, Hkv={hkv})")


def split_arrays(case: Case, kw: dict) -> tuple[list[np.ndarray], list[str]]:
    """The differentiable inputs of a call, in order, with their gradient names."""
    arrays, names = [case.q, case.k, case.v], ["dq", "dk", "dv"]
    if kw.get("bias") is not None:
        arrays.append(kw["bias"])
        names.append("dbias")
    return arrays, names
