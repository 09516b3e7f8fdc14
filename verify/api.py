"""The public API for a kernel repository's own tests: ``assert_attention_close`` and the strategies.

``assert_attention_close(out, q, k, v, **semantics)`` checks one attention result against the exact
answer under the harness's error model and raises ``AssertionError`` with the finding messages,
the way ``torch.testing.assert_close`` does for plain tensors. Arrays may be torch tensors, jax
arrays or numpy arrays; gradients (``grads={"dq": ..., ...}`` for the cotangent ``g``) and lse
are checked when given. ``verify.strategies.cases(...)`` draws the inputs in a ``@given`` test.
"""

from __future__ import annotations

from dataclasses import asdict

import ml_dtypes
import numpy as np

from verify.case import Case
from verify.checks import judge
from verify.execution import Calls
from verify.targets.base import Contract, TargetInfo
from verify.truth import decide

_SEMANTICS = ("mask", "bias", "scale", "causal", "align", "window", "softcap", "alibi_slopes", "sinks",
              "q_segment_ids", "kv_segment_ids")


def as_numpy(x: object) -> np.ndarray | None:
    """A numpy copy of a torch tensor (bf16 kept as ml_dtypes.bfloat16), jax array or array-like."""
    if x is None:
        return None
    if type(x).__module__.startswith("torch"):
        import torch

        t = x.detach().cpu()
        return t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy().copy()
    return np.asarray(x)


def assert_attention_close(out: object, q: object, k: object, v: object, *, lse: object = None,
                           grads: dict[str, object] | None = None, g: object = None, g_lse: object = None,
                           dtype_contract: Contract | dict | None = None, masked_rows: str = "zeros",
                           name: str = "attention", **semantics: object) -> None:
    """Raise ``AssertionError`` (the harness's finding messages) if ``out`` (and ``lse``, ``grads``) is not
    within the allowance of a correct implementation with ``dtype_contract`` (``verify.targets.Contract``:
    accumulation dtype, rounded logits/probabilities; the default is fp32 statistics with probabilities
    rounded, the FlashAttention contract) of attention of ``q, k, v`` with ``semantics``
    (``mask``, ``bias``, ``scale``, ``causal``, ``align``, ``window``, ``softcap``, ``alibi_slopes``,
    ``sinks``, ``q_segment_ids``, ``kv_segment_ids``). ``grads`` are the gradients for the cotangent
    ``g`` of out (and ``g_lse`` of lse).
    """
    unknown = sorted(set(semantics) - set(_SEMANTICS))
    if unknown:
        raise TypeError(f"assert_attention_close got unknown keywords {unknown}; semantics are {', '.join(_SEMANTICS)}")
    if grads is not None and g is None:
        raise TypeError("assert_attention_close: grads need the cotangent g they were computed for")
    contract = Contract(**dtype_contract) if isinstance(dtype_contract, dict) else dtype_contract or Contract()
    arrays = {key: as_numpy(val) if isinstance(val, object) and hasattr(val, "shape") else val
              for key, val in semantics.items()}
    case = Case(as_numpy(q), as_numpy(k), as_numpy(v), g=as_numpy(g), g_lse=as_numpy(g_lse), family="user",
                **arrays)
    features = {"grad"} if grads is not None else set()
    features |= {"lse"} if lse is not None else set()
    info = TargetInfo(name, "numpy", dtypes=(case.dtype,), features=frozenset(features), masked_rows=masked_rows,
                      contract=Contract(**asdict(contract)))
    truth = decide(case, info, grads is not None)
    calls = Calls(out=as_numpy(out), lse=as_numpy(lse),
                  grads=None if grads is None else {n: as_numpy(x) for n, x in grads.items()})
    found = judge(info, case, truth.exact, truth.allow, calls).findings
    if found:
        raise AssertionError("\n\n".join(f.message() for f in found))
