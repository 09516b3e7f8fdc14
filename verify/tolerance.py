"""The error model: how far a *correct* implementation's result may lie from the exact one.

Fixed ``rtol/atol`` pairs either flag correct low-precision kernels or miss real bugs, so each
element gets its own allowance from the dtype, the case and the target's declared contract.

Notation (per batch b and query head h; ``p`` the exact probabilities of the keys, ``p_sink`` the
sink's, both from the oracle):

- ``u``: unit roundoff of the input dtype; ``ua``: of the accumulation (``min(u, 2^-24)`` for
  the ``fp32`` contract, ``u`` for ``input``); ``gamma(n) = n*ua / (1 - n*ua)`` (Higham).
- Absolute-value scales (Higham's componentwise bounds: the same formula on absolute values):
  ``A = p @ |v|`` (outputs); ``dPa = |g| @ |v|^T``, ``da_i = |g_i| . A_i``,
  ``dSa = p * (dPa + da + |g_lse|)``; with softcap ``dTa = dSa * sech^2(t/c)`` (else ``dTa = dSa``);
  ``Sdq = scale * dTa @ |k|``, ``Sdk = scale * dTa^T @ |q|``, ``Sdv = p^T @ |g|``, ``Sdbias = dSa``
  summed to bias's shape, ``Sdsinks = sum p_sink (|g_lse| + da)`` (kv-head sums over the group).
- Logit error of key j in row i (absolute), with ``t = scale q.k`` and the final logit
  ``s = cap(t) + bias - alibi``:
  ``dt_ij = gamma(Dk+2) * scale * sum_d |q_id||k_jd| + 2*ua*|t|``, and ``ua*|s_ij - m_i|`` for the
  subtraction of the row maximum ``m_i`` (the sink's logit included) before ``exp``; with softcap c the capped logit
  errs by ``dt`` (``c tanh(t/c)`` is 1-Lipschitz) plus ``(2*ua + U_TANH*ua) * |c tanh(t/c)|`` for the
  division, ``tanh`` and product; ALiBi's ``slope * |i + off - j|`` adds ``ua * |alibi|``; adding bias
  and ALiBi ``2*ua*(|cap(t)| + |bias| + |alibi|)``. ``round_logits`` rounds every step to the input
  dtype (what a plain implementation does): the product and the scaling ``2u|t|``, with softcap
  ``u(|t| sech^2(t/c) + 2|cap(t)|) + c*subnormal_min`` more (``t/c`` may fall among the dtype's
  subnormals), and ``u|s|`` for each of the bias and ALiBi additions. A sink
  logit is exact (given in the dtype, converted exactly) and takes part in the softmax without error.
- Its effect on the probabilities, without linearising (so huge logit errors stay sound):
  ``w_i = sum_j p_ij expm1(ds_ij)``, ``r_ij = exp(ds_ij) / (1 - w_i) - 1``, so
  ``|p~_ij - p_ij| <= p_ij r_ij`` and the sink's ``|p~_sink - p_sink| <= p_sink r_sink`` with
  ``r_sink = 1 / (1 - w_i) - 1``. A row with ``w_i >= 1``, or with a key whose exact weight
  underflows float64 but whose logit could come within exp's range of the row's maximum once the
  logit errors are added (``s_j - m_i + ds_ij + max_k ds_ik > -745``), is *unconstrained*: its
  logits are lost in rounding (a -1e9 bias in fp32, bf16-rounded logits of 1e4), so any convex
  combination of its values is within the contract: the output may differ from the exact one by
  up to ``2 max_j |v_j|`` (gradients and lse are then not bounded), and campaigns count such rows.
- Output allowance:
  ``u*A + slack * [ (p*r) @ |v| + A * (4*ua + 2*gamma(Lk+1) + [round_probs]*u) + floor ]``
  where the terms are: final rounding to the dtype (rigorous, so without slack); logit error;
  exp and division; the row sum and ``p @ v`` accumulations; probabilities rounded to the dtype.
- lse allowance (lse is returned in float32, float64 for fp64 inputs, with unit roundoff ``ul``):
  ``ul*|lse| + slack * (log(1 + w) + 2*gamma(Lk+2) + floor)``: lse moves by at most the
  probability-weighted logit error; the sum and the log round.
- Gradient allowances: ``dS`` errs by ``dSe = (p*r)*(dPa + da + |g_lse|) + p * (|g| . allow_out)``
  (``delta`` is computed from the target's own rounded output); with softcap the logit cotangent
  ``dT = dS * sech^2`` errs by ``dTe = dSe*sech^2 + dSa*(0.77*dt/c + 4*ul)`` (0.77 bounds
  ``|d sech^2(x)/dx|``; ``ul`` is ``u`` when logits are in the input dtype, else ``ua``);
  ``dq: scale * dTe @ |k| + rho*Sdq``, ``dk: scale * dTe^T @ |q| + rho*Sdk``,
  ``dv: (p*r)^T @ |g| + rho*Sdv``, ``dbias: dSe + rho*Sdbias``,
  ``dsinks: sum p_sink (r_sink (|g_lse| + da) + |g| . allow_out) + rho*Sdsinks``, all times ``slack``,
  with ``rho = 4*u + 2*gamma(max(Lq, Lk, Dk, Dv) + 2)`` (gradients rounded to the dtype, ``dS`` and
  ``p`` rounded to the dtype in the backward, and its accumulations). A row under the ``uniform``
  masked-row policy also allows its ``dSa`` in full in dq, dk and dbias: a kernel that *adds*
  ``finfo.min`` to masked logits passes the uniform softmax's gradient to them, one that selects
  (``where``) passes none; both are that policy.
- ``floor = (n + 2) * tiny(acc) + subnormal_min(dtype)``: gradual underflow or flush-to-zero of
  ``n`` accumulated terms and the final rounding of a subnormal; gradients scale it by the
  largest input magnitude they multiply. Each probability also errs by up to ``tiny(acc)``
  absolutely (fp32 probabilities below 1.2e-38, as under a dominant sink, may be flushed to zero:
  XLA on CPU does), and by half the smallest subnormal of the input dtype when intermediates are
  rounded to it (``round_probs`` or ``accumulate="input"``; fp16 probabilities below 6.1e-5 are
  subnormal): that is added to ``p*r`` (and so to ``dSe``) for every visible key.
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
from verify import policies
from verify.case import Case
from verify.reference import Exact
from verify.targets.base import Contract

SLACK = 2.0
ALPHA, BETA = 2.0, 2.0
POLICIES = ("bound", "naive")
U_TANH = 4.0  # a correct tanh errs by a few ulps of the accumulation dtype
SECH2_SLOPE = 0.77  # max |d/dx sech^2(x)| = 4 / (3 sqrt 3)
_U32 = 2.0**-24


@dataclass(frozen=True)
class Allowance:
    """Per-element allowances and absolute-value scales for the output, lse and each gradient."""

    out: np.ndarray  # [B, Lq, Hq, Dv]
    scale_out: np.ndarray  # A = p @ |v|
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    grad_scales: dict[str, np.ndarray] = field(default_factory=dict)
    unconstrained_rows: int = 0  # rows whose logit error makes any answer acceptable
    u: float = 0.0
    policy: str = "bound"
    lse: np.ndarray | None = None  # [B, Hq, Lq], absolute
    free_rows: np.ndarray | None = None  # bool [B, Hq, Lq]: the unconstrained rows


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


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


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


@dataclass
class _Scales:
    """What the bound needs that does not depend on the contract (float64, heads first, kv heads expanded)."""

    att: spec.Attention
    p: np.ndarray  # [B, H, Lq, Lk] (uniform on masked rows under the uniform policy)
    p_sink: np.ndarray | None  # [B, H, Lq]
    vis: np.ndarray  # the keys a row averages (every key of a masked row under uniform)
    aq: np.ndarray
    ak: np.ndarray
    av: np.ndarray
    t: np.ndarray  # scale q.k
    sabs: np.ndarray  # scale |q|.|k|
    capped: np.ndarray  # c tanh(t / c), or t
    sech2: np.ndarray | None
    bias: np.ndarray | float
    alibi: np.ndarray | float
    s: np.ndarray  # the final logits, -inf where invisible
    shift: np.ndarray  # s - m (0 where invisible): the argument of exp
    big_a: np.ndarray  # A = p @ |v|
    grads: dict | None = None  # |g|, |g_lse|, dPa, da, dSa, dTa and the gradient scales, with a cotangent
    uniform: np.ndarray | None = None  # bool [B, H, Lq]: rows under the uniform policy


def _prepare(case: Case, p: np.ndarray, masked_rows: str, p_sink: np.ndarray | None) -> _Scales:
    att = spec.normalize(case.q, case.k, case.v, **case.semantics())
    uniform = policies.row_policies(case, att, masked_rows)["uniform"]
    if uniform.any():
        # A row under the uniform policy attends uniformly to every key: scales and gradients follow that p.
        p = np.where(uniform[..., None], 1.0 / att.k.shape[1], p)
    q, k, v = _heads(att)
    aq, ak, av = np.abs(q), np.abs(k), np.abs(v)
    scale = att.scale_float()
    vis = att.visible
    t = scale * (q @ _swap(k))
    sabs = abs(scale) * (aq @ _swap(ak))
    sech2, capped = None, t
    if att.softcap is not None:
        c = att.softcap
        capped = c * np.tanh(t / c)
        with np.errstate(over="ignore"):
            sech2 = 1.0 / np.cosh(np.minimum(np.abs(t / c), 700.0)) ** 2
    bias = 0.0 if att.bias is None else np.where(vis, att.bias.astype(np.float64), 0.0)
    alibi = 0.0 if att.alibi is None else att.alibi
    with np.errstate(invalid="ignore"):
        s = np.where(vis, capped + bias + alibi, -np.inf)
        # exp(s - m) with m the row's maximum (a sink's logit included): the subtraction rounds too
        m = s.max(axis=-1, keepdims=True)
        if att.sinks is not None:
            m = np.maximum(m, att.sinks[None, :, None, None])
        shift = np.where(vis, s - np.where(np.isfinite(m), m, 0.0), 0.0)
    vis = vis | uniform[..., None]
    sc = _Scales(att, p, p_sink, vis, aq, ak, av, t, sabs, capped, sech2, bias, alibi, s, shift, p @ av,
                 uniform=uniform)
    if case.g is not None:
        ag = np.abs(spec.to_heads_first(case.g.astype(np.float64)))
        glse = 0.0 if case.g_lse is None else np.abs(case.g_lse.astype(np.float64))[..., None]
        dpa = ag @ _swap(av)
        da = (ag * sc.big_a).sum(-1, keepdims=True)
        dsa = p * (dpa + da + glse)
        dta = dsa if sech2 is None else dsa * sech2
        a = abs(scale)
        scales = {"dq": spec.to_seq_first(a * (dta @ ak)), "dk": _fold_kv(a * (_swap(dta) @ aq), att),
                  "dv": _fold_kv(_swap(p) @ ag, att)}
        if att.bias_shape is not None:
            scales["dbias"] = spec.reduce_to_shape(dsa, att.bias_shape)
        if att.sinks is not None and p_sink is not None:
            scales["dsinks"] = (p_sink[..., None] * (glse + da)).sum(axis=(0, 2))[:, 0]
        sc.grads = {"ag": ag, "glse": glse, "dpa": dpa, "da": da, "dsa": dsa, "scales": scales}
    return sc


def _logit_error(sc: _Scales, contract: Contract, dtype: str, u: float, ua: float) -> tuple[np.ndarray, np.ndarray]:
    """(ds, dt): the absolute error of each computed logit, and of t = scale q.k before softcap."""
    att, t, capped = sc.att, sc.t, sc.capped
    bias, alibi = np.abs(sc.bias), np.abs(sc.alibi)
    with np.errstate(invalid="ignore"):
        dt = _gamma(att.q.shape[-1] + 2, ua) * sc.sabs + 2 * ua * np.abs(t)
        ds = dt + 2 * ua * (np.abs(capped) + bias + alibi) + ua * np.abs(sc.shift)
        if att.softcap is not None:
            ds = ds + (2 + U_TANH) * ua * np.abs(capped)
        if att.alibi is not None:
            ds = ds + ua * alibi
        if contract.round_logits:
            ds = ds + 2 * u * np.abs(t)
            if sc.sech2 is not None:  # t/c in the dtype may be subnormal (a large c): absolute error c*sub/2, twice
                ds = ds + u * (np.abs(t) * sc.sech2 + 2 * np.abs(capped)) + att.softcap * _subnormal_min(dtype)
            if att.bias is not None:
                ds = ds + u * np.abs(capped + sc.bias)
            if att.alibi is not None:
                ds = ds + u * np.abs(np.where(att.visible, sc.s, 0.0))
    return np.where(att.visible, ds, 0.0), dt


def _allow(sc: _Scales, dtype: str, contract: Contract, lse: np.ndarray | None, fills: bool = True) -> Allowance:
    """The allowance of a correct implementation in ``dtype`` under ``contract`` (see the module doc).

    ``fills``: include what the masked-row policy lets a kernel's fill do (an additive fill's gradient
    on uniform rows); False for the bound of ``oracles.naive`` itself, which selects.
    """
    att, p, vis, av = sc.att, sc.p, sc.vis, sc.av
    u = spec.unit_roundoff(dtype)
    ua, acc = _acc_unit(dtype, contract)
    d = att.dims
    ds, dt = _logit_error(sc, contract, dtype, u, ua)
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.where(p > 0, p * np.expm1(ds), 0.0).sum(-1, keepdims=True)  # keys of weight 0: "lost" below
        r = np.exp(ds) / np.maximum(1 - w, 1e-300) - 1
        r_sink = 1 / np.maximum(1 - w, 1e-300) - 1
        # A key whose exact weight underflows float64 (p = 0) may still be lifted by logit errors into
        # exp's range of the row maximum; a row with w >= 1 is unconstrained for every visible key.
        lost = vis & (p == 0) & (sc.shift + ds + ds.max(-1, keepdims=True) > -745.0)
        free = vis & ((w >= 1) | lost.any(-1, keepdims=True))
        pr = np.where(free, np.inf, np.where(p > 0, p * r, 0.0))
    unconstrained = int(free.any(-1).sum())

    # Probabilities below the accumulation dtype's normal range (fp32: 1.2e-38, as under a dominant sink)
    # may be flushed to zero (XLA on CPU does): an absolute error of up to tiny(acc) each; in the input
    # dtype, when intermediates are rounded to it, half its smallest subnormal (fp16: p < 6.1e-5).
    rounded = contract.round_probs or contract.accumulate == "input"
    pr = pr + (_tiny(acc) + (0.5 * _subnormal_min(dtype) if rounded else 0.0)) * vis
    big_a = sc.big_a
    rel = 4 * ua + 2 * _gamma(d["Lk"] + 1, ua) + (u if rounded else 0.0)
    floor_o = (d["Lk"] + 2) * _tiny(acc) + _subnormal_min(dtype)
    with np.errstate(invalid="ignore"):
        # The final rounding to the dtype is rigorously <= u*|o| <= u*A: it takes no slack.
        allow_o = u * big_a + SLACK * (pr @ av + big_a * rel + floor_o)
        # An unconstrained row still averages its values: within 2 max|v| of the exact output.
        vmax = av.max(-2, keepdims=True)  # over every key of the head: no smaller than over the row's
        allow_o = np.where(free.any(-1, keepdims=True), 2 * (1 + 4 * u) * vmax + floor_o, allow_o)
    out = spec.to_seq_first(allow_o)
    allow_lse = None if lse is None else _lse_allowance(lse, dtype, ua, w, free, d["Lk"])
    free_rows = free.any(-1)
    result = Allowance(out, spec.to_seq_first(big_a), unconstrained_rows=unconstrained, u=u, lse=allow_lse,
                       free_rows=free_rows)
    if sc.grads is None:
        return result

    gs = sc.grads
    ag, glse, dpa, da, dsa, scales = gs["ag"], gs["glse"], gs["dpa"], gs["da"], gs["dsa"], gs["scales"]
    with np.errstate(invalid="ignore"):
        err_delta = (ag * allow_o).sum(-1, keepdims=True)
        dse = pr * (dpa + da + glse) + p * err_delta
        if sc.sech2 is not None:  # 1 - tanh^2 computed in the logits' dtype: an absolute error of a few units
            ul = u if contract.round_logits or contract.accumulate == "input" else ua
            dte = dse * sc.sech2 + dsa * (SECH2_SLOPE * dt / att.softcap + 4 * ul)
        else:
            dte = dse
    rho = 4 * u + 2 * _gamma(max(d["Lq"], d["Lk"], d["Dk"], d["Dv"]) + 2, ua)
    scale = abs(att.scale_float())
    mag = max(1.0, scale * max(float(sc.aq.max()), float(sc.ak.max())), float(ag.max()), float(av.max()))
    floor_g = ((d["Lq"] + d["Lk"] + d["Dk"] + d["Dv"] + 2) * _tiny(acc) + _subnormal_min(dtype)) * mag
    if fills and sc.uniform is not None and sc.uniform.any():
        # A kernel whose fill is additive (finfo.min added to masked logits) passes the uniform softmax's
        # gradient to them: dq, dk and dbias of such rows may be anything up to their own scale.
        dte = dte + np.where(sc.uniform[..., None], dsa, 0.0)
        dse = dse + np.where(sc.uniform[..., None], dsa, 0.0)
    with np.errstate(invalid="ignore"):
        errs = {
            "dq": spec.to_seq_first(scale * (dte @ sc.ak)),
            "dk": _fold_kv(scale * (_swap(dte) @ sc.aq), att),
            "dv": _fold_kv(_swap(pr) @ ag, att),
        }
        if "dbias" in scales:
            errs["dbias"] = spec.reduce_to_shape(dse, att.bias_shape)
        if "dsinks" in scales:
            ps = sc.p_sink[..., None]
            errs["dsinks"] = (ps * (r_sink * (glse + da) + err_delta)).sum(axis=(0, 2))[:, 0]
    with np.errstate(invalid="ignore"):  # inf * 0 in a matmul (an unconstrained row, a zero input): unbounded
        grads = {name: np.nan_to_num(SLACK * (errs[name] + rho * scales[name] + floor_g), nan=np.inf, posinf=np.inf)
                 for name in scales}
    return Allowance(out, result.scale_out, grads, scales, unconstrained, u, lse=allow_lse, free_rows=free_rows)


def bound(case: Case, contract: Contract, p: np.ndarray, masked_rows: str = "zeros",
          p_sink: np.ndarray | None = None, lse: np.ndarray | None = None) -> Allowance:
    """The componentwise error bound for ``case`` given exact probabilities ``p`` [B, Hq, Lq, Lk].

    ``p_sink`` (with sinks) gives the ``dsinks`` allowance, ``lse`` (the exact lse) the lse allowance.
    """
    return _allow(_prepare(case, p, masked_rows, p_sink), case.dtype, contract, lse)


def _lse_allowance(lse: np.ndarray, dtype: str, ua: float, w: np.ndarray, free: np.ndarray, lk: int) -> np.ndarray:
    """Absolute allowance of lse [B, Hq, Lq]: its final rounding to float32 (float64 for fp64) is rigorous."""
    ul = 2.0**-53 if dtype == "fp64" else _U32
    with np.errstate(invalid="ignore", divide="ignore"):
        moved = np.log1p(np.maximum(w[..., 0], 0.0))
        allow = ul * np.where(np.isfinite(lse), np.abs(lse), 0.0) + SLACK * (
            moved + 2 * _gamma(lk + 2, max(ua, ul)) + (lk + 2) * 2.0**-1022)
    return np.where(free.any(-1), np.inf, allow)


FLOAT64 = Contract(accumulate="input", round_logits=False, round_probs=False)  # how oracles.naive computes
CERTIFY_FRACTION = 1 / 64  # naive64 decides where its error bound is below this fraction of the allowance


def certified_bound(case: Case, contract: Contract, p: np.ndarray, masked_rows: str = "zeros",
                    p_sink: np.ndarray | None = None, lse: np.ndarray | None = None) -> tuple[Allowance, str]:
    """The allowance from float64 probabilities, and how far the float64 naive reference is certified for it.

    ``oracles.naive`` in float64 is a correct float64 implementation, so the allowance such an
    implementation has (``FLOAT64`` contract, u = 2^-53) bounds its own error, element by element.
    ``"certified"``: that bound is below ``CERTIFY_FRACTION`` of the target's allowance for every
    output, lse and gradient element, so no comparison of the target with it can change a verdict
    unless the target's error is within 1/64 of the allowance's edge. ``"free-rows"``: certified but
    on rows the target's contract leaves unconstrained (there any convex combination of the values
    passes, so the verdict does not depend on the exact values, but float64's are not to be trusted
    as "exact" in a message). ``"no"``: float64 cannot vouch for the case.
    """
    sc = _prepare(case, p, masked_rows, p_sink)
    allow = _allow(sc, case.dtype, contract, lse)
    own = _allow(sc, "fp64", FLOAT64, lse, fills=False)
    free = np.swapaxes(allow.free_rows, 1, 2)[..., None]  # [B, Lq, Hq, 1], the output's layout
    with np.errstate(invalid="ignore"):
        pairs = [(own.out, allow.out, free)] + [(own.grads[n], allow.grads[n], False) for n in allow.grads]
        if allow.lse is not None:
            pairs.append((own.lse, allow.lse, allow.free_rows))
        fits = [(a <= CERTIFY_FRACTION * b) | np.isinf(b) for a, b, _ in pairs]
        if all(bool(f.all()) for f in fits):
            return allow, "certified"
        exempt = all(bool((f | rows).all()) for f, (_, _, rows) in zip(fits, pairs, strict=True))
    return allow, "free-rows" if exempt else "no"


def allowance(case: Case, contract: Contract, truth: Exact, masked_rows: str = "zeros",
              policy: str = "bound") -> Allowance:
    """The allowance of ``case`` under ``policy`` (``"bound"`` or ``"naive"``) from its exact values."""
    if policy == "naive":
        return flash_rule(case, contract, truth, masked_rows)
    if policy != "bound":
        raise ValueError(f"unknown tolerance policy {policy!r}; known: {', '.join(POLICIES)}")
    return bound(case, contract, truth.p, masked_rows, truth.p_sink, truth.lse)


def flash_rule(case: Case, contract: Contract, truth: Exact, masked_rows: str = "zeros") -> Allowance:
    """The FlashAttention rule: ``ALPHA * err(same-dtype naive) + BETA * u * scale``."""
    base = bound(case, contract, truth.p, masked_rows, truth.p_sink, truth.lse)
    kw = dict(case.semantics(), masked_rows=policies.single(masked_rows) or "zeros", dtype=case.dtype,
              accumulate=contract.accumulate,
              round_logits=contract.round_logits, round_probs=contract.round_probs)
    u = base.u
    with np.errstate(invalid="ignore"):
        if case.g is None:
            ref = naive.attention(case.q, case.k, case.v, **kw)
            out = ALPHA * np.abs(ref.out - truth.out) + BETA * u * base.scale_out
            return Allowance(out, base.scale_out, u=u, policy="naive", lse=base.lse)
        ref = naive.attention_vjp(case.q, case.k, case.v, case.g, g_lse=case.g_lse, **kw)
        out = ALPHA * np.abs(ref.out - truth.out) + BETA * u * base.scale_out
        grads = {}
        for name, exact in (truth.grads or {}).items():
            grads[name] = ALPHA * np.abs(getattr(ref, name) - exact) + BETA * u * base.grad_scales[name]
    return Allowance(out, base.scale_out, grads, base.grad_scales, base.unconstrained_rows, u, "naive", base.lse)
