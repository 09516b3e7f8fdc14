"""The error model: how far a *correct* implementation's result may lie from the exact one.

Fixed ``rtol/atol`` pairs either flag correct low-precision kernels or miss real bugs, so each
element gets its own allowance from the dtype, the case and the target's declared contract.

Notation (per batch b and query head h; ``p`` the exact probabilities, from the mp oracle):

- ``u``: unit roundoff of the input dtype; ``ua``: of the accumulation (``min(u, 2^-24)`` for
  the ``fp32`` contract, ``u`` for ``input``); ``gamma(n) = n*ua / (1 - n*ua)`` (Higham).
- Absolute-value scales (Higham's componentwise bounds: the same formula on absolute values):
  ``A = p @ |v|`` (outputs); ``dPa = |g| @ |v|^T``, ``da_i = |g_i| . A_i``,
  ``dSa = p * (dPa + da)``; ``Sdq = scale * dSa @ |k|``, ``Sdk = scale * dSa^T @ |q|``,
  ``Sdv = p^T @ |g|``, ``Sdbias = dSa`` summed to bias's shape (kv-head sums over the group).
- Logit error of key j in row i (absolute):
  ``ds_ij = gamma(Dk+2) * scale * sum_d |q_id||k_jd| + 2*ua*(|scale q.k| + |bias|) + [round_logits] * u*|s_ij|``.
- Its effect on the probabilities, without linearising (so huge logit errors stay sound):
  ``w_i = sum_j p_ij expm1(ds_ij)``, ``r_ij = exp(ds_ij) / (1 - w_i) - 1``, so
  ``|p~_ij - p_ij| <= p_ij r_ij``. A row with ``w_i >= 1`` (or a key whose weight underflows
  float64 while its logit error exceeds exp's range) is *unconstrained*: any answer is within
  the contract (say, bf16-rounded logits of 1e4), and the campaign counts such rows.
- Output allowance:
  ``u*A + slack * [ (p*r) @ |v| + A * (4*ua + 2*gamma(Lk) + [round_probs]*u) + floor ]``
  where the terms are: final rounding to the dtype (rigorous, so without slack); logit error;
  exp and division; the row sum and ``p @ v`` accumulations; probabilities rounded to the dtype.
- Gradient allowances: ``dS`` errs by ``dSe = (p*r)*(dPa + da) + p * (|g| . allow_out)``
  (``delta`` is computed from the target's own rounded output);
  ``dq: scale * dSe @ |k| + rho*Sdq``, ``dk: scale * dSe^T @ |q| + rho*Sdk``,
  ``dv: (p*r)^T @ |g| + rho*Sdv``, ``dbias: dSe + rho*Sdbias``, all times ``slack``, with
  ``rho = 4*u + 2*gamma(max(Lq, Lk, Dk, Dv) + 2)`` (gradients rounded to the dtype, ``dS`` and
  ``p`` rounded to the dtype in the backward, and its accumulations).
- ``floor = (n + 2) * tiny(acc) + subnormal_min(dtype)``: gradual underflow or flush-to-zero of
  ``n`` accumulated terms and the final rounding of a subnormal; gradients scale it by the
  largest input magnitude they multiply. When intermediates are rounded to the dtype
  (``round_probs`` or ``accumulate="input"``), each probability and each ``dS`` element also
  errs by up to ``subnormal_min(dtype) / 2`` absolutely (fp16 probabilities below 6.1e-5 are
  subnormal): that is added to ``p*r`` and to ``dSe`` for every visible key.
- ``slack = 2`` covers second-order terms. Worst-case ``gamma`` bounds are used throughout,
  so no correct kernel can exceed them, and bugs (wrong rescaling, dropped keys, a wrong
  Jacobian) give errors of order ``A`` itself, hundreds of allowances at bf16.

Second policy, ``naive`` (the FlashAttention test rule): ``alpha * |naive_same_dtype - exact| +
beta * u * A`` per element with ``alpha = 2, beta = 2``; the same-dtype reference follows the
target's contract (accumulation dtype, rounding of logits and probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from oracles import naive, spec
from verify.case import Case
from verify.reference import Exact
from verify.targets.base import Contract

SLACK = 2.0
ALPHA, BETA = 2.0, 2.0
POLICIES = ("bound", "naive")
_U32 = 2.0**-24


@dataclass(frozen=True)
class Allowance:
    """Per-element allowances and absolute-value scales for the output and each gradient."""

    out: np.ndarray  # [B, Lq, Hq, Dv]
    scale_out: np.ndarray  # A = p @ |v|
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    grad_scales: dict[str, np.ndarray] = field(default_factory=dict)
    unconstrained_rows: int = 0  # rows whose logit error makes any answer acceptable
    u: float = 0.0
    policy: str = "bound"


def _tiny(dtype: str) -> float:
    return float(spec.finfo(dtype).tiny)


def _subnormal_min(dtype: str) -> float:
    return float(spec.finfo(dtype).smallest_subnormal)


def _gamma(n: int, ua: float) -> float:
    x = n * ua
    return x / (1.0 - x) if x < 1.0 else np.inf


def _acc_unit(dtype: str, contract: Contract) -> tuple[float, str]:
    u = spec.unit_roundoff(dtype)
    if contract.accumulate == "input":
        return u, dtype
    return (min(u, _U32), "fp32" if u >= _U32 else dtype)


def _heads(att: spec.Attention) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v as float64 [B, H, L, D] with k and v expanded to query heads."""
    q = spec.to_heads_first(att.q.astype(np.float64))
    k = spec.to_heads_first(att.k.astype(np.float64))[:, att.kv_head]
    v = spec.to_heads_first(att.v.astype(np.float64))[:, att.kv_head]
    return q, k, v


def _fold_kv(x: np.ndarray, att: spec.Attention) -> np.ndarray:
    """[B, Hq, Lk, D] per query head -> [B, Lk, Hkv, D] summed over each group."""
    b, _, lk, d = x.shape
    out = np.zeros((b, att.k.shape[2], lk, d))
    np.add.at(out, (slice(None), att.kv_head), x)
    return spec.to_seq_first(out)


def bound(case: Case, contract: Contract, p: np.ndarray, masked_rows: str = "zeros") -> Allowance:
    """The componentwise error bound for ``case`` given exact probabilities ``p`` [B, Hq, Lq, Lk]."""
    att = spec.normalize(case.q, case.k, case.v, masked_rows=masked_rows, **case.semantics())
    if masked_rows == "uniform":
        # A fully masked row attends uniformly to every key: scales and gradients follow that p.
        rows = att.masked_row[..., None]
        p = np.where(rows, 1.0 / att.k.shape[1], p)
    dtype = case.dtype
    u = spec.unit_roundoff(dtype)
    ua, acc = _acc_unit(dtype, contract)
    d = att.dims
    q, k, v = _heads(att)
    scale = att.scale_float()
    vis = att.visible
    aq, ak, av = np.abs(q), np.abs(k), np.abs(v)

    qk = np.einsum("bhqd,bhkd->bhqk", q, k)
    sabs = np.abs(scale) * np.einsum("bhqd,bhkd->bhqk", aq, ak)
    bias = 0.0 if att.bias is None else np.where(vis, np.abs(att.bias.astype(np.float64)), 0.0)
    s = np.abs(scale * qk) + bias
    ds = _gamma(d["Dk"] + 2, ua) * sabs + 2 * ua * s
    if contract.round_logits:
        ds = ds + u * s
    ds = np.where(vis, ds, 0.0)
    if masked_rows == "uniform":
        vis = vis | att.masked_row[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        w = (p * np.expm1(ds)).sum(-1, keepdims=True)
        r = np.exp(ds) / np.maximum(1 - w, 1e-300) - 1
        # A key whose exact weight underflows float64 (p = 0) may still be lifted by a logit
        # error past exp's range, and a row with w >= 1 is unconstrained for every visible key.
        lost = vis & (p == 0) & (ds > 700)
        free = vis & ((w >= 1) | lost.any(-1, keepdims=True))
        pr = np.where(free, np.inf, np.where(p > 0, p * r, 0.0))
    unconstrained = int(free.any(-1).sum())

    # Intermediates rounded to the dtype (probabilities, dS) err by u relatively, and by half the
    # smallest subnormal absolutely once they fall below the normal range (fp16: p < 6.1e-5).
    rounded = contract.round_probs or contract.accumulate == "input"
    pr = pr + (0.5 * _subnormal_min(dtype) if rounded else 0.0) * vis
    big_a = np.einsum("bhqk,bhkd->bhqd", p, av)
    rel = 4 * ua + 2 * _gamma(d["Lk"], ua) + (u if rounded else 0.0)
    floor_o = (d["Lk"] + 2) * _tiny(acc) + _subnormal_min(dtype)
    with np.errstate(invalid="ignore"):
        # The final rounding to the dtype is rigorously <= u*|o| <= u*A: it takes no slack.
        allow_o = u * big_a + SLACK * (np.einsum("bhqk,bhkd->bhqd", pr, av) + big_a * rel + floor_o)
    out = spec.to_seq_first(allow_o)
    result = Allowance(out, spec.to_seq_first(big_a), unconstrained_rows=unconstrained, u=u)
    if case.g is None:
        return result

    g = spec.to_heads_first(case.g.astype(np.float64))
    ag = np.abs(g)
    dpa = np.einsum("bhqd,bhkd->bhqk", ag, av)
    da = (ag * big_a).sum(-1, keepdims=True)
    dsa = p * (dpa + da)
    with np.errstate(invalid="ignore"):
        dse = pr * (dpa + da) + p * (ag * allow_o).sum(-1, keepdims=True)
        dse = dse + (0.5 * _subnormal_min(dtype) if rounded else 0.0) * vis
    rho = 4 * u + 2 * _gamma(max(d["Lq"], d["Lk"], d["Dk"], d["Dv"]) + 2, ua)
    mag = max(1.0, float(np.abs(scale)) * max(float(aq.max()), float(ak.max())), float(ag.max()), float(av.max()))
    floor_g = ((d["Lq"] + d["Lk"] + d["Dk"] + d["Dv"] + 2) * _tiny(acc) + _subnormal_min(dtype)) * mag
    sc = abs(scale)
    scales = {
        "dq": spec.to_seq_first(sc * np.einsum("bhqk,bhkd->bhqd", dsa, ak)),
        "dk": _fold_kv(sc * np.einsum("bhqk,bhqd->bhkd", dsa, aq), att),
        "dv": _fold_kv(np.einsum("bhqk,bhqd->bhkd", p, ag), att),
    }
    with np.errstate(invalid="ignore"):
        errs = {
            "dq": spec.to_seq_first(sc * np.einsum("bhqk,bhkd->bhqd", dse, ak)),
            "dk": _fold_kv(sc * np.einsum("bhqk,bhqd->bhkd", dse, aq), att),
            "dv": _fold_kv(np.einsum("bhqk,bhqd->bhkd", pr, ag), att),
        }
    if att.bias_shape is not None:
        scales["dbias"] = spec.reduce_to_shape(dsa, att.bias_shape)
        errs["dbias"] = spec.reduce_to_shape(dse, att.bias_shape)
    grads = {name: SLACK * (errs[name] + rho * scales[name] + floor_g) for name in scales}
    return Allowance(out, result.scale_out, grads, scales, unconstrained, u)


def allowance(case: Case, contract: Contract, truth: Exact, masked_rows: str = "zeros",
              policy: str = "bound") -> Allowance:
    """The allowance of ``case`` under ``policy`` (``"bound"`` or ``"naive"``) from its exact values."""
    if policy == "naive":
        return flash_rule(case, contract, truth.out, truth.grads or {}, truth.p, masked_rows)
    if policy != "bound":
        raise ValueError(f"unknown tolerance policy {policy!r}; known: {', '.join(POLICIES)}")
    return bound(case, contract, truth.p, masked_rows)


def flash_rule(case: Case, contract: Contract, exact_out: np.ndarray, exact_grads: dict[str, np.ndarray],
               p: np.ndarray, masked_rows: str = "zeros") -> Allowance:
    """The FlashAttention rule: ``ALPHA * err(same-dtype naive) + BETA * u * scale``."""
    base = bound(case, contract, p, masked_rows)
    kw = dict(case.semantics(), masked_rows=masked_rows, dtype=case.dtype, accumulate=contract.accumulate,
              round_logits=contract.round_logits, round_probs=contract.round_probs)
    u = base.u
    with np.errstate(invalid="ignore"):
        if case.g is None:
            ref = naive.attention(case.q, case.k, case.v, **kw)
            out = ALPHA * np.abs(ref.out - exact_out) + BETA * u * base.scale_out
            return Allowance(out, base.scale_out, u=u, policy="naive")
        ref = naive.attention_vjp(case.q, case.k, case.v, case.g, **kw)
        out = ALPHA * np.abs(ref.out - exact_out) + BETA * u * base.scale_out
        grads = {}
        for name, exact in exact_grads.items():
            got = getattr(ref, name)
            grads[name] = ALPHA * np.abs(got - exact) + BETA * u * base.grad_scales[name]
    return Allowance(out, base.scale_out, grads, base.grad_scales, base.unconstrained_rows, u, "naive")
