"""The mutant zoo is what it claims: the clean base is right and every mutant is genuinely wrong.

Allowances (error of a correct implementation against the mpmath oracle, elementwise):

- forward: ``|out - exact| <= c * u * A`` with ``A = mp.attention(q, k, |v|).out`` (Higham-style
  scale), ``c = 32`` at fp32 and ``c = 2`` at bf16/fp16 (the base computes in fp32 and rounds the
  output once, so only that rounding, at most ``u * A``, is visible there);
- gradients: per tensor ``max |grad - exact| <= r * max |exact|``, ``r = 1e-4`` at fp32 and
  ``r = 2u`` at bf16/fp16 (the fp32 backward rounded once to the input dtype).

The clean base must be within the allowance on every sanity case and every witness; each mutant
must exceed it by more than 10x on its witness (``finite`` witnesses: a non-finite output where
the exact one is finite).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from oracles import mp, spec
from tests.mutants import BASE, MUTANTS, Mutant
from verify.case import Case

FORWARD_C = {"fp32": 32.0, "bf16": 2.0, "fp16": 2.0}
GRAD_FP32 = 1e-4
GRAD_LOWP_C = 2.0
KILL_FACTOR = 10.0
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _torch(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x)
    if x.dtype == _BF16:
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _run(fn, case: Case, grad: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The output (float64) and, with ``grad``, ``dq, dk, dv`` (and ``dbias``) for cotangent ``case.g``."""
    names = ["dq", "dk", "dv"] + (["dbias"] if case.bias is not None else [])
    leaves = [_torch(a).requires_grad_(grad) for a in (case.q, case.k, case.v, case.bias) if a is not None]
    mask = None if case.mask is None else _torch(case.mask)
    bias = leaves[3] if case.bias is not None else None
    with torch.set_grad_enabled(grad):
        out = fn(*leaves[:3], mask=mask, bias=bias, scale=case.scale, causal=case.causal,
                 query_chunk_size=case.query_chunk_size, key_chunk_size=case.key_chunk_size)
    grads = {}
    if grad:
        got = torch.autograd.grad(out, leaves, grad_outputs=_torch(case.g).to(out.dtype))
        grads = {n: t.detach().to(torch.float64).numpy() for n, t in zip(names, got, strict=True)}
    return out.detach().to(torch.float64).numpy(), grads


def _ratio(err: np.ndarray, allowed: np.ndarray) -> float:
    """Largest ``err / allowed`` (inf where ``allowed`` is 0 and ``err`` is not, or ``err`` is NaN)."""
    err = np.where(np.isnan(err), np.inf, err)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(err == 0, 0.0, err / allowed)
    return float(r.max())


def _forward_ratio(case: Case, out: np.ndarray) -> float:
    exact = mp.attention(case.q, case.k, case.v, **case.semantics()).out
    scale = mp.attention(case.q, case.k, np.abs(case.v), **case.semantics()).out
    u = spec.unit_roundoff(case.dtype)
    return _ratio(np.abs(out - exact), FORWARD_C[case.dtype] * u * scale)


def _grad_ratio(case: Case, grads: dict[str, np.ndarray]) -> float:
    exact = mp.attention_vjp(case.q, case.k, case.v, case.g, **case.semantics())
    r = GRAD_FP32 if case.dtype == "fp32" else GRAD_LOWP_C * spec.unit_roundoff(case.dtype)
    return max(_ratio(np.abs(got - getattr(exact, n)), r * np.abs(getattr(exact, n)).max()) for n, got in grads.items())


def _sanity_cases() -> dict[str, Case]:
    """fp32 cases covering chunk sizes, masks with fully masked rows and key chunks, causal, GQA, bias -inf."""
    r = np.random.default_rng(7)

    def make(b, lq, lk, hq, hkv, dk, dv, qc, kc, **kw) -> Case:
        f = np.float32
        return Case(
            q=r.standard_normal((b, lq, hq, dk)).astype(f),
            k=r.standard_normal((b, lk, hkv, dk)).astype(f),
            v=r.standard_normal((b, lk, hkv, dv)).astype(f),
            g=r.standard_normal((b, lq, hq, dv)).astype(f),
            query_chunk_size=qc,
            key_chunk_size=kc,
            **kw,
        )

    mask = r.random((2, 1, 6, 8)) < 0.6
    mask[:, :, :, 3:6] = False  # a fully masked key chunk (key chunk 3)
    mask[0, :, 1] = mask[1, :, 4] = False  # fully masked rows
    bias = r.standard_normal((5, 7)).astype(np.float32)
    bias[0] = bias[2, 1::2] = -np.inf
    bias_all = r.standard_normal((1, 4, 9, 11)).astype(np.float32)
    bias_all[0, :, :, 2] = -np.inf
    padding = np.ones((2, 1, 1, 11), dtype=bool)
    padding[1, ..., -2:] = False
    return {
        "chunk-1": make(1, 5, 6, 1, 1, 3, 2, 1, 1),
        "non-divisor": make(2, 7, 9, 2, 2, 4, 4, 3, 4),
        "equal-and-L-1": make(1, 6, 6, 2, 2, 3, 3, 6, 5),
        "larger": make(1, 5, 7, 1, 1, 2, 3, 6, 14),
        "mask-masked-rows": make(2, 6, 8, 2, 2, 3, 3, 4, 3, mask=mask, mask_kind="masked-rows"),
        "causal-tall": make(1, 7, 5, 2, 2, 3, 2, 3, 2, causal=True),
        "causal-wide": make(1, 4, 9, 1, 1, 3, 2, 3, 4, causal=True),
        "gqa": make(2, 5, 6, 4, 2, 3, 5, 2, 3),
        "gqa-mqa": make(1, 4, 7, 3, 1, 2, 2, None, 2),
        "bias-inf": make(1, 5, 7, 2, 2, 3, 3, 2, 5, bias=bias),
        "everything": make(2, 9, 11, 4, 2, 3, 2, 4, 3, mask=padding, bias=bias_all, causal=True),
    }


SANITY = _sanity_cases()


def _as(case: Case, dtype: str) -> Case:
    dt = spec.as_dtype(dtype)
    cast = {n: getattr(case, n).astype(dt) for n in ("q", "k", "v", "g", "bias") if getattr(case, n) is not None}
    return case.with_(**cast)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(SANITY))
def test_clean_base_matches_oracle(name: str, dtype: str) -> None:
    case = _as(SANITY[name], dtype)
    out, grads = _run(BASE.fn, case, grad=True)
    assert out.dtype == np.float64 and out.shape == case.q.shape[:3] + case.v.shape[-1:]
    assert _forward_ratio(case, out) <= 1.0
    assert _grad_ratio(case, grads) <= 1.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_clean_base_values_at_dtype_max(dtype: str) -> None:
    """Values at and just below the dtype's maximum: no overflow, forward within the allowance."""
    r = np.random.default_rng(9)
    dt = spec.as_dtype(dtype)
    top = float(ml_dtypes.finfo(dt).max)
    v = np.where(r.random((1, 9, 1, 2)) < 0.5, top, 0.9 * top) * np.sign(r.standard_normal((1, 9, 1, 2)))
    v[0, :, 0, 0] = top  # every weight lands on the maximum: the computed average must not round past it
    case = Case(
        q=r.standard_normal((1, 5, 1, 2)).astype(dt),
        k=r.standard_normal((1, 9, 1, 2)).astype(dt),
        v=v.astype(dt),
        query_chunk_size=2,
        key_chunk_size=2,
    )
    out, _ = _run(BASE.fn, case, grad=False)
    assert np.isfinite(out).all() and _forward_ratio(case, out) <= 1.0


def test_zoo_shape() -> None:
    assert len(MUTANTS) >= 14
    assert len({m.kind for m in MUTANTS.values()}) == len(MUTANTS)
    assert all(m.features == BASE.features and m.name == name for name, m in MUTANTS.items())
    assert set(BASE.info().unexercised()) == {"lse", "bottom-right", "window", "softcap", "alibi", "sinks", "segments"}


def test_mutants_agree_with_base_off_trigger() -> None:
    """Without chunks, masks, bias, GQA or large logits, every mutant's forward is the base's, bit for bit.

    The exception, exp of raw logits, rounds differently: it agrees within 1e-6 of the largest output.
    """
    case = _as(SANITY["non-divisor"].with_(query_chunk_size=None, key_chunk_size=None), "fp32")
    ref, _ = _run(BASE.fn, case, grad=False)
    for m in MUTANTS.values():
        out, _ = _run(m.fn, case, grad=False)
        atol = 1e-6 * np.abs(ref).max() if m.name == "no_max_subtraction" else 0.0
        np.testing.assert_allclose(out, ref, rtol=0, atol=atol, err_msg=m.name)


@pytest.mark.parametrize("mutant", list(MUTANTS.values()), ids=list(MUTANTS))
def test_witness_kills_mutant(mutant: Mutant) -> None:
    case = mutant.witness()
    check = case.meta["check"]
    clean_out, clean_grads = _run(BASE.fn, case, grad=check == "grad")
    out, grads = _run(mutant.fn, case, grad=check == "grad")
    assert _forward_ratio(case, clean_out) <= 1.0
    if check == "forward":
        assert _forward_ratio(case, out) > KILL_FACTOR
    elif check == "grad":
        assert _grad_ratio(case, clean_grads) <= 1.0
        assert _grad_ratio(case, grads) > KILL_FACTOR
    else:
        exact = mp.attention(case.q, case.k, case.v, **case.semantics()).out
        assert np.isfinite(exact).all() and not np.isfinite(out).all()


# Backward bugs, and forward bugs whose output is no longer a softmax average (the backward assumes one).
_NOT_THE_GRADIENT = {"grad_no_delta", "grad_dk_no_scale", "dbias_scaled", "no_acc_rescale", "no_sum_rescale"}


@pytest.mark.parametrize("mutant", [BASE, *MUTANTS.values()], ids=["clean", *MUTANTS])
def test_backward_is_gradient_of_forward(mutant: Mutant) -> None:
    """fp64 finite differences (gradcheck): the hand-written backward is the gradient of the forward."""
    r = np.random.default_rng(11)
    mask = torch.from_numpy(r.random((1, 1, 4, 5)) < 0.7)
    mask[0, 0, 2] = False
    bias = torch.from_numpy(r.standard_normal((1, 1, 4, 5)))
    bias[0, 0, 3, 0] = -torch.inf
    q, k, v = (torch.from_numpy(r.standard_normal(s)) for s in ((1, 4, 4, 2), (1, 5, 2, 2), (1, 5, 2, 1)))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mutant.fn(q, k, v, mask=mask, bias=b, causal=True, query_chunk_size=3, key_chunk_size=2)

    ok = torch.autograd.gradcheck(f, tuple(x.requires_grad_() for x in (q, k, v, bias)), raise_exception=False)
    assert ok == (mutant.name not in _NOT_THE_GRADIENT)
