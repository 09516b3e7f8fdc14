"""The target protocol: what an implementation under test declares, and the adapter that runs it.

A target is a callable with the canonical signature (framework-native arrays in and out)::

    attention(q, k, v, *, mask=None, bias=None, scale=None, causal=False, align="top-left",
              window=None, softcap=None, alibi_slopes=None, sinks=None,
              q_segment_ids=None, kv_segment_ids=None, return_lse=False,
              query_chunk_size=None, key_chunk_size=None)  # -> out, or (out, lse) with return_lse

Its ``TargetInfo`` says which of ``FEATURES`` it supports; the adapter passes only those keyword
arguments (``return_lse=True`` always when it declares ``lse``), so a target without ``chunks`` never
sees chunk sizes. ``constraints`` say which otherwise valid calls it cannot take (``CONSTRAINTS``), so
campaigns do not generate them. Framework adapters (``torch_adapter``, ``jax_adapter``,
``numpy_adapter``) convert a ``Case`` to native arrays of the case's dtype, call the target, and run
its VJP with the framework's own autodiff. Nothing here imports a framework.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from oracles import spec
from verify import policies
from verify.case import Case

if TYPE_CHECKING:
    from verify.targets.loader import TargetSpec

FEATURES = ("mask", "bias", "causal", "gqa", "chunks", "lse", "grad",
            "bottom-right", "window", "softcap", "alibi", "sinks", "segments")
FRAMEWORKS = ("torch", "jax", "numpy")
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")  # what a target declares unless it says otherwise; what campaigns run
# Calls a target cannot take although its features allow them. ``len%N`` / ``dim%N``: lengths / head dims
# must be multiples of N (block-size divisibility).
CONSTRAINTS = ("dk=dv", "default-scale", "lq=lk", "len%N", "dim%N")
EMPTY_LSE = ("-inf", "+inf", "nan", "any")  # what a target returns as lse for a row with no visible key
_MODULO = re.compile(r"^(len|dim)%([1-9][0-9]*)$")


class Unavailable(RuntimeError):
    """The target cannot run here (framework missing, device absent); the message says why."""


class Unsupported(ValueError):
    """The case uses something the target did not declare (feature, dtype or constraint): it declines."""


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


def check_constraints(constraints: frozenset[str]) -> None:
    """ValueError naming a constraint that is not one of ``CONSTRAINTS``."""
    for c in constraints:
        if c not in CONSTRAINTS[:3] and not _MODULO.match(c):
            raise ValueError(f"unknown constraint {c!r}; known: {', '.join(CONSTRAINTS)} (N a positive integer)")


def multiple_of(constraints: frozenset[str], what: str) -> int:
    """The N of a ``len%N`` / ``dim%N`` constraint (1 without one)."""
    n = 1
    for c in constraints:
        m = _MODULO.match(c)
        if m and m.group(1) == what:
            n = math.lcm(n, int(m.group(2)))
    return n


@dataclass(frozen=True)
class TargetInfo:
    """Everything the harness knows about a target besides its code."""

    name: str
    framework: str
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    features: frozenset[str] = frozenset()
    masked_rows: str = "zeros"  # a policy, or one per mechanism: verify.policies
    contract: Contract = field(default_factory=Contract)
    device: str = "cpu"
    description: str = ""
    notes: str = ""  # why the policy and contract are what they are
    constraints: frozenset[str] = frozenset()
    empty_lse: str | None = None  # None: what the masked-row policy implies (zeros -inf, nan NaN, uniform any)
    nondeterministic: bool = False  # run-to-run differences are allowed (within the allowance)
    tiles: tuple[int, ...] = ()  # fixed tile sizes of the kernel (rows or keys per block): lengths cross them

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {self.framework!r}; known: {', '.join(FRAMEWORKS)}")
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; known: {', '.join(FEATURES)}")
        for d in self.dtypes:
            spec.dtype_name(d)
        policies.parse(self.masked_rows)  # one policy, or one per mechanism ("mask:uniform,bias:nan")
        check_constraints(self.constraints)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in self.tiles):
            raise ValueError(f"tiles must be positive integers, got {list(self.tiles)}")
        if self.empty_lse is not None and self.empty_lse not in EMPTY_LSE:
            raise ValueError(f"unknown empty-row lse {self.empty_lse!r}; known: {', '.join(EMPTY_LSE)}")

    def unexercised(self) -> list[str]:
        """Features the harness will not test for this target (for every report)."""
        return [f for f in FEATURES if f not in self.features]


class Output(NamedTuple):
    """A forward pass's results as numpy arrays: ``out``, and ``lse`` when the target returns it."""

    out: np.ndarray
    lse: np.ndarray | None = None


# (case field = keyword, the feature that allows it, is it set?): keywords passed only when the case uses them
_OPTIONS: tuple[tuple[str, str, Callable[[Case], bool]], ...] = (
    ("mask", "mask", lambda c: c.mask is not None),
    ("bias", "bias", lambda c: c.bias is not None),
    ("causal", "causal", lambda c: c.causal),
    ("align", "bottom-right", lambda c: c.align != "top-left"),
    ("window", "window", lambda c: c.window is not None),
    ("softcap", "softcap", lambda c: c.softcap is not None),
    ("alibi_slopes", "alibi", lambda c: c.alibi_slopes is not None),
    ("sinks", "sinks", lambda c: c.sinks is not None),
    ("q_segment_ids", "segments", lambda c: c.q_segment_ids is not None),
    ("kv_segment_ids", "segments", lambda c: c.kv_segment_ids is not None),
)


def declines(info: TargetInfo, case: Case) -> str | None:
    """Why ``info``'s target cannot take ``case`` (an undeclared dtype, feature or a constraint), or None."""
    feats, d = info.features, case.dims
    if case.dtype not in info.dtypes:
        return f"{info.name} does not declare dtype {case.dtype}"
    if d["Hq"] != d["Hkv"] and "gqa" not in feats and case.layout != "broadcast-kv":  # that one calls MHA
        return f"{info.name} does not declare gqa (Hq={d['Hq']}, Hkv={d['Hkv']})"
    for name, feature, used in _OPTIONS:
        if used(case) and feature not in feats:
            return f"{info.name} does not declare {feature} (the case sets {name})"
    cons = info.constraints
    if "dk=dv" in cons and d["Dk"] != d["Dv"]:
        return f"{info.name} needs Dk == Dv (Dk={d['Dk']}, Dv={d['Dv']})"
    if "lq=lk" in cons and d["Lq"] != d["Lk"]:
        return f"{info.name} needs Lq == Lk (Lq={d['Lq']}, Lk={d['Lk']})"
    if "default-scale" in cons and case.scale is not None and not math.isclose(case.scale * math.sqrt(d["Dk"]), 1.0,
                                                                               rel_tol=1e-12):
        return f"{info.name} always scales logits by 1/sqrt(Dk); got scale={case.scale}"
    for what, dims in (("len", (d["Lq"], d["Lk"])), ("dim", (d["Dk"], d["Dv"]))):
        n = multiple_of(cons, what)
        if any(x % n for x in dims):
            return f"{info.name} needs {'lengths' if what == 'len' else 'head dims'} that are multiples of {n}"
    return None


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
        """The keyword arguments this target receives for ``case``; Unsupported if it cannot take it."""
        why = declines(self.info, case)
        if why:
            raise Unsupported(why)
        kw: dict = {"scale": case.scale}
        for name, _, used in _OPTIONS:
            if used(case):
                kw[name] = getattr(case, name)
        if "lse" in self.info.features:
            kw["return_lse"] = True
        if "chunks" in self.info.features:
            kw["query_chunk_size"] = case.query_chunk_size
            kw["key_chunk_size"] = case.key_chunk_size
        return kw

    def forward(self, case: Case) -> Output:
        """The target's output (and lse) for ``case`` as numpy arrays of the dtypes it returned."""
        raise NotImplementedError

    def vjp(self, case: Case) -> dict[str, np.ndarray]:
        """``dq, dk, dv`` (and ``dbias``, ``dsinks``) for cotangents ``case.g`` (and ``case.g_lse``), by autodiff."""
        raise NotImplementedError


def split_result(result: object, kw: dict, name: str) -> tuple[object, object | None]:
    """``(out, lse)`` of a target's return value; a target that declared lse must return a pair."""
    if not kw.get("return_lse"):
        return result, None
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise TypeError(f"{name} declares lse but returned {type(result).__name__}, not (out, lse)")
    return result[0], result[1]


def require_default_scale(target: str, scale: float | None, dk: int) -> None:
    """Decline (``Unsupported``) a scale other than ``1/sqrt(Dk)`` for a kernel that cannot take one."""
    if scale is not None and not math.isclose(scale * math.sqrt(dk), 1.0, rel_tol=1e-12):
        raise Unsupported(f"{target} always scales logits by 1/sqrt(Dk) = {1 / math.sqrt(dk):.6g}; got scale={scale}")


def require_equal_heads(target: str, hq: int, hkv: int) -> None:
    """Decline grouped-query attention for a kernel that needs as many kv heads as query heads."""
    if hq != hkv:
        raise Unsupported(f"{target} has no grouped-query attention (Hq={hq}, Hkv={hkv})")


def split_arrays(case: Case, kw: dict) -> tuple[list[np.ndarray], list[str]]:
    """The differentiable inputs of a call, in order, with their gradient names (q, k, v, bias, sinks)."""
    arrays, names = [case.q, case.k, case.v], ["dq", "dk", "dv"]
    for key, grad in (("bias", "dbias"), ("sinks", "dsinks")):
        if kw.get(key) is not None:
            arrays.append(kw[key])
            names.append(grad)
    return arrays, names
