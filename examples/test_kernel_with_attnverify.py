"""A kernel repository's own tests with attnverify: copy this file next to your kernel and adapt the import.

Two kinds of test, both plain pytest (no plugin options needed):

- a property test: Hypothesis draws cases at the numerical edges (``strategies.cases`` for the
  features the kernel has) and each result must be within the allowance of a correct kernel;
- a regression test: one hand-written case, checked the same way.

Here the kernel is ``examples.my_attention.attention`` (a plain PyTorch attention with mask, bias,
causal and chunk sizes); run with ``pytest examples/test_kernel_with_attnverify.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from verify import assert_attention_close, strategies

torch = pytest.importorskip("torch")
from examples.my_attention import attention  # noqa: E402 - your kernel here

FEATURES = {"mask", "bias", "causal", "chunks", "grad"}  # what the kernel supports
FP32_INSIDE = {"accumulate": "fp32", "round_logits": False, "round_probs": False}  # how it computes: fp32 throughout


def _torch(x: np.ndarray | None) -> torch.Tensor | None:
    if x is None:
        return None
    x = np.asarray(x)
    return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16) if x.dtype.name == "bfloat16" else \
        torch.from_numpy(x.copy())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(strategies.cases(features=FEATURES, dtypes=("bf16", "fp32"), max_len=33))
def test_attention_is_close_to_exact(case):
    q, k, v = (_torch(x).requires_grad_() for x in (case.q, case.k, case.v))
    bias = None if case.bias is None else _torch(case.bias).requires_grad_()
    kw = {"mask": _torch(case.mask), "bias": bias, "scale": case.scale, "causal": case.causal,
          "query_chunk_size": case.query_chunk_size, "key_chunk_size": case.key_chunk_size}
    out = attention(q, k, v, **kw)
    inputs = (q, k, v) if bias is None else (q, k, v, bias)
    grads = dict(zip(("dq", "dk", "dv", "dbias"), torch.autograd.grad(out, inputs, _torch(case.g)), strict=False))
    assert_attention_close(out, q, k, v, grads=grads, g=case.g, dtype_contract=FP32_INSIDE, mask=case.mask,
                           bias=case.bias, scale=case.scale, causal=case.causal)


def test_a_fully_masked_row_gives_zeros():
    r = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(r.standard_normal(s).astype(np.float32)) for s in ((1, 4, 1, 8), (1, 6, 1, 8),
                                                                                       (1, 6, 1, 8)))
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out = attention(q, k, v, mask=mask, key_chunk_size=4)
    assert_attention_close(out, q, k, v, mask=mask.numpy(), dtype_contract=FP32_INSIDE)
