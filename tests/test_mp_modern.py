"""oracles.mp, modern options: closed forms, doubled precision, mpmath finite differences, invariances."""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import mpmath
import numpy as np
import pytest

from oracles import mp
from tests.test_mp import ulp_distance

BF16 = ml_dtypes.bfloat16
FIELDS = ("out", "lse", "dq", "dk", "dv", "dbias", "dsinks")


# ---------------------------------------------------------------- helpers


def to_f64(x) -> float:
    """An mpf (any precision) correctly rounded to float64."""
    x = mpmath.mpf(x)
    if not mpmath.isfinite(x):
        return float(x)
    sign, man, exp, _ = x._mpf_
    r = Fraction(int(man)) * Fraction(2) ** int(exp)
    return -float(r) if sign else float(r)


def randn(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def bf16_exact(rng, shape, scale=1.0):
    """float64 arrays of bf16-representable values: perturbing them by 2**-30 is exact."""
    return (rng.standard_normal(shape) * scale).astype(BF16).astype(np.float64)


def run(q, k, v, g, g_lse=None, prec=mp.DEFAULT_PREC, **kw) -> dict:
    """Forward and VJP as one dict; the VJP's forward values must equal the forward's."""
    fwd = mp.attention(q, k, v, prec=prec, **kw)
    grads = mp.attention_vjp(q, k, v, g, g_lse=g_lse, prec=prec, **kw)
    assert ulp_distance(fwd.out, grads.out).max(initial=0) == 0
    assert ulp_distance(fwd.lse, grads.lse).max(initial=0) == 0
    return {"out": fwd.out, "lse": fwd.lse, "dq": grads.dq, "dk": grads.dk, "dv": grads.dv,
            "dbias": grads.dbias, "dsinks": grads.dsinks}


def assert_same(a: dict, b: dict, fields=FIELDS) -> None:
    for f in fields:
        if a[f] is None or b[f] is None:
            assert a[f] is None and b[f] is None, f
            continue
        np.testing.assert_array_equal(a[f], b[f], err_msg=f)


def qkvg(rng, b=1, lq=4, lk=6, hq=2, hkv=1, dk=3, dv=2, dtype=np.float32):
    return (randn(rng, (b, lq, hq, dk), dtype), randn(rng, (b, lk, hkv, dk), dtype),
            randn(rng, (b, lk, hkv, dv), dtype), randn(rng, (b, lq, hq, dv), dtype))


# ---------------------------------------------------------------- 1. closed forms


@pytest.mark.parametrize("c", [0.5, 1.5, 7.0])
@pytest.mark.parametrize("a", [0.375, -2.5, 40.0])
def test_softcap_two_keys_closed_form(c, a, rng):
    """Logits c tanh(a x_j / c): out = v0 s(D) + v1 s(-D), D = the capped difference; dq via sech^2."""
    x = np.array([1.25, -0.75])
    q, k = np.full((1, 1, 1, 1), a), x.reshape(1, 2, 1, 1)
    v, g = randn(rng, (1, 2, 1, 3), np.float64), randn(rng, (1, 1, 1, 3), np.float64)
    bias = np.array([[0.5, -0.25]])
    res = mp.attention_vjp(q, k, v, g, bias=bias, scale=1.0, softcap=c)
    with mpmath.workprec(600):
        cm = mpmath.mpf(c)
        s = [cm * mpmath.tanh(mpmath.mpf(a) * mpmath.mpf(xj) / cm) + mpmath.mpf(bj)
             for xj, bj in zip(x, bias[0], strict=True)]
        s0 = 1 / (1 + mpmath.exp(s[1] - s[0]))
        s1 = 1 - s0
        vm = [[mpmath.mpf(float(e)) for e in v[0, j, 0]] for j in range(2)]
        gm = [mpmath.mpf(float(e)) for e in g[0, 0, 0]]
        want_out = [to_f64(vm[0][i] * s0 + vm[1][i] * s1) for i in range(3)]
        ds0 = s0 * s1 * mpmath.fsum(gm[i] * (vm[0][i] - vm[1][i]) for i in range(3))
        sech2 = [1 / mpmath.cosh(mpmath.mpf(a) * mpmath.mpf(xj) / cm) ** 2 for xj in x]
        want_dq = to_f64(ds0 * (sech2[0] * x[0] - sech2[1] * x[1]))
        want_dk = [to_f64(ds0 * sech2[0] * a), to_f64(-ds0 * sech2[1] * a)]
        want_lse = to_f64(mpmath.log(mpmath.exp(s[0]) + mpmath.exp(s[1])))
    assert ulp_distance(res.out[0, 0, 0], want_out).max() <= 1
    assert ulp_distance(res.lse[0, 0, 0], want_lse) <= 1
    assert ulp_distance(res.dq[0, 0, 0, 0], want_dq) <= 1, (res.dq, want_dq)
    assert ulp_distance(res.dk[0, :, 0, 0], want_dk).max() <= 1, (res.dk, want_dk)
    assert ulp_distance(res.dbias[0], [to_f64(ds0), to_f64(-ds0)]).max() <= 1  # dbias: before the cap


def test_softcap_of_small_logits_is_nearly_the_identity(rng):
    """c tanh(t / c) = t - t^3 / (3 c^2) + ...: the outputs move by at most 2 max|t|^3 / (3 c^2) A."""
    q, k, v, g = qkvg(rng, lq=5, lk=7, hq=2, hkv=2, dk=4, dv=3)
    q = (q * 0.02).astype(np.float32)
    plain = mp.attention(q, k, v)
    capped = mp.attention(q, k, v, softcap=1.0)
    t = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) / 2.0
    a = mp.attention(q, k, np.abs(v)).out
    diff = np.abs(capped.out - plain.out)
    assert (diff <= 2 * np.abs(t).max() ** 3 / 3 * 1.01 * a).all()
    assert diff.max() > 0  # the cap does act
    # A huge cap is no cap at all: t^3 / c^2 ~ 1e-60 is far below every result's rounding.
    huge = run(q, k, v, g, softcap=1e30)
    assert_same(huge, run(q, k, v, g), ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("align", ["top-left", "bottom-right"])
def test_window_zero_zero_gives_the_diagonal_value(align, rng):
    lq = 5
    q, k = bf16_exact(rng, (2, lq, 2, 3)), bf16_exact(rng, (2, lq, 1, 3))
    v, g = randn(rng, (2, lq, 1, 2)), randn(rng, (2, lq, 2, 2))
    res = mp.attention_vjp(q, k, v, g, window=(0, 0), align=align, scale=1.0)
    for b, i, h in np.ndindex(2, lq, 2):
        assert res.out[b, i, h].tolist() == v[b, i, 0].astype(np.float64).tolist()
        exact = sum(Fraction(x) * Fraction(y) for x, y in zip(q[b, i, h], k[b, i, 0], strict=True))
        assert res.lse[b, h, i] == float(exact)
    assert (res.dq == 0).all() and (res.dk == 0).all()
    np.testing.assert_array_equal(res.dv[..., 0, :], g.astype(np.float64).sum(axis=2))


@pytest.mark.parametrize("kw", [{"causal": True}, {"window": (1, 2)}, {"causal": True, "window": (2, 0)},
                                {"causal": True, "alibi_slopes": np.array([0.5, 0.25], np.float32)}])
def test_bottom_right_equals_top_left_when_square(kw, rng):
    q, k, v, g = qkvg(rng, b=2, lq=5, lk=5)
    assert_same(run(q, k, v, g, align="top-left", **kw), run(q, k, v, g, align="bottom-right", **kw))


def test_decode_bottom_right_causal_sees_every_key(rng):
    q, k, v, g = qkvg(rng, b=2, lq=1, lk=7, hq=4, hkv=2)
    br = run(q, k, v, g, causal=True, align="bottom-right")
    assert_same(br, run(q, k, v, g))
    tl = run(q, k, v, g, causal=True)  # top-left: only key 0
    np.testing.assert_array_equal(tl["out"][:, 0], v[:, 0, [0, 0, 1, 1]].astype(np.float64))


@pytest.mark.parametrize("policy", ["zeros", "nan", "uniform"])
def test_lq_greater_than_lk_bottom_right_causal(policy, rng):
    """The first Lq - Lk rows see no key (masked rows); the others equal the explicit mask, bitwise."""
    lq, lk = 7, 3
    q, k, v, g = qkvg(rng, lq=lq, lk=lk)
    res = run(q, k, v, g, causal=True, align="bottom-right", masked_rows=policy)
    mask = np.array([[j <= i - (lq - lk) for j in range(lk)] for i in range(lq)])
    assert_same(res, run(q, k, v, g, mask=mask, masked_rows=policy))
    empty = res["out"][:, : lq - lk]
    assert np.isnan(empty).all() if policy == "nan" else (policy == "uniform" or (empty == 0).all())
    assert (np.isnan(res["lse"][..., : lq - lk]) if policy == "nan" else res["lse"][..., : lq - lk] == -np.inf).all()
    assert np.isfinite(res["lse"][..., lq - lk:]).all()


def test_sink_of_minus_inf_is_no_sink(rng):
    q, k, v, g = qkvg(rng, b=2, lq=4, lk=5, hq=4, hkv=2)
    mask = rng.random((2, 4, 4, 5)) < 0.7
    mask[0, 1, 2] = False  # a masked row
    kw = {"mask": mask, "bias": randn(rng, (4, 4, 5)), "softcap": 3.0, "masked_rows": "nan"}
    g_lse = randn(rng, (2, 4, 4))
    none = run(q, k, v, g, g_lse=g_lse, **kw)
    ninf = run(q, k, v, g, g_lse=g_lse, sinks=np.full(4, -np.inf, np.float32), **kw)
    assert_same(none, ninf, FIELDS[:-1])
    assert none["dsinks"] is None
    np.testing.assert_array_equal(ninf["dsinks"], [0, np.nan, 0, 0])  # head 1 reaches a NaN row
    # Mixed: only the heads with a real sink change.
    mixed = run(q, k, v, g, g_lse=g_lse, sinks=np.array([-np.inf, -np.inf, 0.5, -np.inf], np.float32), **kw)
    heads = np.array([True, True, False, True])
    np.testing.assert_array_equal(mixed["out"][:, :, heads], none["out"][:, :, heads])
    assert (mixed["out"][:, :, 2] != none["out"][:, :, 2]).any()


def test_sink_of_plus_inf_gives_zero(rng):
    """A +inf sink takes all the weight: out 0, lse +inf, no q/k/v/bias gradient, dsinks = sum g_lse (the limit)."""
    q, k, v, g = qkvg(rng, b=2, lq=3, lk=4, hq=2, hkv=2)
    g_lse = bf16_exact(rng, (2, 2, 3))
    sinks = np.array([np.inf, 0.25])
    res = mp.attention_vjp(q, k, v, g, g_lse=g_lse, bias=randn(rng, (2, 3, 4)), sinks=sinks, softcap=2.0,
                           alibi_slopes=np.array([0.5, 0.5]))
    assert (res.out[:, :, 0] == 0).all() and (res.lse[:, 0] == np.inf).all()
    for x in (res.dq[:, :, 0], res.dk[:, :, 0], res.dv[:, :, 0], res.dbias[0]):
        assert (x == 0).all()
    assert res.dsinks[0] == float(g_lse[:, 0].sum())  # p_sink = 1, delta = 0
    assert np.isfinite(res.out[:, :, 1]).all() and (res.out[:, :, 1] != 0).all()
    assert (res.lse[:, 1] != np.inf).all()


def test_sink_with_an_empty_row(rng):
    """No visible key but a sink: out 0, lse sigma, no q/k/v/bias gradient, dsinks = g_lse; not a masked row."""
    q, k, v, g = qkvg(rng, lq=3, lk=4, hq=2, hkv=1)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    sinks = np.array([-1.75, 3.5], np.float32)
    g_lse = bf16_exact(rng, (1, 2, 3))
    for policy in ("zeros", "nan", "uniform"):
        res = mp.attention_vjp(q, k, v, g, g_lse=g_lse, mask=mask, sinks=sinks, masked_rows=policy,
                               bias=np.zeros((3, 4)))
        assert (res.out[0, 1] == 0).all() and res.lse[0, :, 1].tolist() == [-1.75, 3.5]
        assert (res.dq[0, 1] == 0).all() and (res.dbias[1] == 0).all()
        g1 = np.where(np.arange(3)[None, None, :] == 1, 0, g_lse)  # the other rows' share of dsinks
        rest = mp.attention_vjp(q, k, v, g, g_lse=g1, mask=mask, sinks=sinks, masked_rows=policy)
        assert ulp_distance(res.dsinks, rest.dsinks + g_lse[0, :, 1]).max() <= 1
    q1 = q[:, 1:2]
    solo = mp.attention_vjp(q1, k, v, g[:, 1:2], g_lse=g_lse[..., 1:2], mask=mask[1:2], sinks=sinks)
    np.testing.assert_array_equal(solo.dsinks, g_lse[0, :, 1])
    assert (solo.dk == 0).all() and (solo.dv == 0).all()


@pytest.mark.parametrize("sigma", [0.0, 2.5, -40.0, 700.0, -1e5])
def test_one_key_and_a_sink_closed_form(sigma, rng):
    """p = s(z - sigma): out = p v, lse = log(e^z + e^sigma), dsinks and dbias by hand."""
    q, k = np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 1))
    v, g = randn(rng, (1, 1, 1, 3), np.float64), randn(rng, (1, 1, 1, 3), np.float64)
    z, g_lse = 1.25, np.array([[[0.75]]])
    res = mp.attention_vjp(q, k, v, g, g_lse=g_lse, bias=np.array([[z]]), sinks=np.array([sigma]))
    with mpmath.workprec(4000):
        zm, sm = mpmath.mpf(z), mpmath.mpf(sigma)
        p = 1 / (1 + mpmath.exp(sm - zm))
        ps = 1 - p
        gv = mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(b))
                         for a, b in zip(g[0, 0, 0], v[0, 0, 0], strict=True))
        delta = p * gv
        want = {
            "out": [to_f64(p * mpmath.mpf(float(x))) for x in v[0, 0, 0]],
            "lse": to_f64(mpmath.log(mpmath.exp(zm) + mpmath.exp(sm))),
            "dsinks": to_f64(ps * (mpmath.mpf(0.75) - delta)),
            "dbias": to_f64(p * (gv - delta + mpmath.mpf(0.75))),
        }
    assert ulp_distance(res.out[0, 0, 0], want["out"]).max() <= 1
    assert ulp_distance(res.lse[0, 0, 0], want["lse"]) <= 1
    assert ulp_distance(res.dsinks[0], want["dsinks"]) <= 1, (res.dsinks, want["dsinks"])
    assert ulp_distance(res.dbias[0, 0], want["dbias"]) <= 1, (res.dbias, want["dbias"])


def test_segments(rng):
    b, lq = 2, 5
    q, k, v, g = qkvg(rng, b=b, lq=lq, lk=lq, hq=2, hkv=1)
    kw = {"bias": randn(rng, (2, lq, lq)), "sinks": np.array([0.5, -1.0], np.float32), "causal": True}
    one = run(q, k, v, g, q_segment_ids=np.full((b, lq), 3), kv_segment_ids=np.full((b, lq), 3), **kw)
    assert_same(one, run(q, k, v, g, **kw))
    ids = np.tile(np.arange(lq), (b, 1))
    single = run(q, k, v, g, q_segment_ids=ids, kv_segment_ids=ids, **kw)
    assert_same(single, run(q, k, v, g, window=(0, 0), **kw))
    # Packed: two sequences in one row equal the two sequences run apart.
    q2, k2, v2, g2 = qkvg(rng, b=1, lq=7, lk=7, hq=2, hkv=1)
    seg = np.array([[0, 0, 0, 1, 1, 1, 1]])
    packed = mp.attention(q2, k2, v2, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
    for sl in (slice(0, 3), slice(3, 7)):
        apart = mp.attention(q2[:, sl], k2[:, sl], v2[:, sl], causal=True)
        np.testing.assert_array_equal(packed.out[:, sl], apart.out)
        np.testing.assert_array_equal(packed.lse[..., sl], apart.lse)


def test_windows_with_an_open_side_and_past_lk(rng):
    lq, lk = 4, 6
    q, k, v, g = qkvg(rng, b=1, lq=lq, lk=lk)
    for align in ("top-left", "bottom-right"):
        off = 0 if align == "top-left" else lk - lq
        d = np.arange(lq)[:, None] + off - np.arange(lk)[None, :]
        for window, allowed in (((2, None), d <= 2), ((None, 1), d >= -1), ((1, 3), (d <= 1) & (d >= -3))):
            assert_same(run(q, k, v, g, window=window, align=align), run(q, k, v, g, mask=allowed))
        assert_same(run(q, k, v, g, window=(1, lk), align=align), run(q, k, v, g, window=(1, None), align=align))
        assert_same(run(q, k, v, g, window=(lk + 3, 0), align=align), run(q, k, v, g, causal=True, align=align))


def test_alibi_zero_slope_and_explicit_bias(rng):
    b, lq, lk, hq = 2, 4, 6, 2
    q, k, v, g = qkvg(rng, b=b, lq=lq, lk=lk, hq=hq, hkv=1)
    base = {"bias": randn(rng, (hq, lq, lk)), "causal": True}
    assert_same(run(q, k, v, g, alibi_slopes=np.zeros(hq, np.float32), **base), run(q, k, v, g, **base))
    slopes = np.array([[0.375, 1.5], [0.0, 2.0 ** -7]], np.float32)  # [B, Hq], one zero
    for align in ("top-left", "bottom-right"):
        off = 0 if align == "top-left" else lk - lq
        dist = np.abs(np.arange(lq)[:, None] + off - np.arange(lk)[None, :])
        explicit = base["bias"][None].astype(np.float64) - slopes[:, :, None, None] * dist  # exact here
        a = run(q, k, v, g, alibi_slopes=slopes, align=align, **base)
        e = run(q, k, v, g, bias=explicit, causal=True, align=align)
        for f in ("out", "lse", "dq", "dk", "dv"):
            assert ulp_distance(a[f], e[f]).max() <= 1, f
        assert ulp_distance(a["dbias"], e["dbias"].sum(axis=0)).max(initial=0) <= 2  # bias [Hq, ...] sums B


# ---------------------------------------------------------------- 2. self-agreement at doubled precision


def combined_case(seed: int) -> tuple:
    """A random configuration with every option drawn (small shapes)."""
    r = np.random.default_rng(5000 + seed)
    dt = [np.float32, BF16, np.float16, np.float64][seed % 4]
    b, lq, lk, hkv = int(r.integers(1, 3)), int(r.integers(1, 8)), int(r.integers(1, 8)), int(r.integers(1, 3))
    hq, dk, dv = hkv * int(r.integers(1, 3)), int(r.integers(1, 5)), int(r.integers(1, 4))
    spread = float(r.choice([1.0, 3.0]))
    q, k = randn(r, (b, lq, hq, dk), dt, spread), randn(r, (b, lk, hkv, dk), dt, spread)
    v, g = randn(r, (b, lk, hkv, dv), dt), randn(r, (b, lq, hq, dv), dt)
    side = lambda: None if r.random() < 0.3 else int(r.integers(0, 4))  # noqa: E731
    kw = {
        "align": str(r.choice(["top-left", "bottom-right"])),
        "causal": bool(r.random() < 0.5),
        "window": None if r.random() < 0.4 else (side(), side()),
        "softcap": None if r.random() < 0.3 else float(r.choice([0.5, 2.0, 30.0])),
        "masked_rows": str(r.choice(["zeros", "nan", "uniform"])),
    }
    if r.random() < 0.7:
        shape = (hq,) if r.random() < 0.5 else (b, hq)
        kw["alibi_slopes"] = (2.0 ** -r.integers(0, 8, shape) * r.uniform(0.5, 1, shape)).astype(dt)
    if r.random() < 0.7:
        sinks = randn(r, (hq,), dt, 2.0)
        sinks[r.random(hq) < 0.2] = -np.inf
        sinks[r.random(hq) < 0.1] = np.inf
        kw["sinks"] = sinks
    if r.random() < 0.5:
        kw["q_segment_ids"] = np.sort(r.integers(0, 3, (b, lq)), axis=1)
        kw["kv_segment_ids"] = np.sort(r.integers(0, 3, (b, lk)), axis=1)
    if r.random() < 0.5:
        kw["mask"] = r.random((b, 1, lq, lk)) < 0.8
    if r.random() < 0.7:
        kw["bias"] = randn(r, [(b, hq, lq, lk), (hq, lq, lk), (1, 1, lk)][int(r.integers(0, 3))], dt)
    g_lse = randn(r, (b, hq, lq), dt) if r.random() < 0.7 else None
    return q, k, v, g, g_lse, kw


def _extreme_case(name: str, r) -> tuple:
    if name == "softcap-logits-1e30-fp32":
        mag = lambda shape: (10.0 ** r.uniform(13, 19, shape) * r.choice([-1, 1], shape)).astype(np.float32)  # noqa: E731
        q, k = mag((1, 4, 2, 3)), mag((1, 6, 2, 3))
        q[0, 0] = randn(r, (2, 3), np.float32, 1e-18)  # one row of unsaturated logits
        return q, k, randn(r, (1, 6, 2, 2)), randn(r, (1, 4, 2, 2)), randn(r, (1, 2, 4)), {
            "softcap": 30.0, "sinks": np.array([29.5, -3.0], np.float32), "alibi_slopes": np.array([0.5, 2.0])}
    if name == "softcap-offset-2^152-fp64":
        # t = 2^152 + O(1) capped at c = 2^152: the capped logits keep O(1) differences at magnitude 2^152,
        # so the working precision must follow c (152 bits more than for small logits).
        q, k = randn(r, (1, 4, 2, 3), np.float64), randn(r, (1, 6, 1, 3), np.float64)
        q[..., 0], k[..., 0] = 2.0**76, 2.0**76
        return q, k, randn(r, (1, 6, 1, 2), np.float64), randn(r, (1, 4, 2, 2), np.float64), randn(
            r, (1, 2, 4), np.float64), {"scale": 1.0, "softcap": 2.0**152, "sinks": np.array([2.0**152, -1.0])}
    if name == "tiny-softcap":
        q, k, v, g = qkvg(r, lq=4, lk=6, hq=2, hkv=2)
        return q, k, v, g, randn(r, (1, 2, 4)), {"softcap": 2.0 ** -20, "bias": randn(r, (2, 4, 6), np.float32,
                                                                                       2.0 ** -19)}
    if name == "sinks-near-2^100-fp64":
        q, k = randn(r, (1, 4, 2, 3), np.float64), randn(r, (1, 6, 1, 3), np.float64)
        q[..., 0], k[..., 0] = 2.0**50, 2.0**50
        sinks = np.array([2.0**100, 2.0**100 + 2.0**48])
        return q, k, randn(r, (1, 6, 1, 2), np.float64), randn(r, (1, 4, 2, 2), np.float64), randn(
            r, (1, 2, 4), np.float64), {"scale": 1.0, "sinks": sinks}
    if name == "alibi-large-bias-minus-1e300":
        q, k, v, g = qkvg(r, lq=5, lk=7, hq=2, hkv=1, dtype=np.float64)
        bias = r.standard_normal((1, 2, 5, 7))
        bias[r.random(bias.shape) < 0.3] = -1e300
        return q, k, v, g, randn(r, (1, 2, 5), np.float64), {
            "bias": bias, "alibi_slopes": np.array([1e3, 3.0]), "sinks": np.array([-2e3, 1.0]),
            "align": "bottom-right"}
    if name == "fp16-everything":
        q, k, v, g = qkvg(r, b=2, lq=6, lk=5, hq=4, hkv=2, dk=4, dv=3, dtype=np.float16)
        seg_q, seg_k = np.array([[0, 0, 1, 1, 1, 2]] * 2), np.array([[0, 1, 1, 1, 2]] * 2)
        return q, k, v, g, randn(r, (2, 4, 6), np.float16), {
            "softcap": 5.0, "alibi_slopes": randn(r, (2, 4), np.float16, 0.3), "sinks": randn(r, (4,), np.float16),
            "window": (2, 1), "causal": True, "align": "bottom-right", "q_segment_ids": seg_q,
            "kv_segment_ids": seg_k, "bias": randn(r, (2, 1, 6, 5), np.float16), "masked_rows": "uniform"}
    raise KeyError(name)


EXTREME = [
    "softcap-logits-1e30-fp32", "softcap-offset-2^152-fp64", "tiny-softcap", "sinks-near-2^100-fp64",
    "alibi-large-bias-minus-1e300", "fp16-everything",
]


def _self_agree(q, k, v, g, g_lse, kw, what):
    lo = run(q, k, v, g, g_lse, prec=mp.DEFAULT_PREC, **kw)
    hi = run(q, k, v, g, g_lse, prec=2 * mp.DEFAULT_PREC, **kw)
    for f in FIELDS:
        if lo[f] is None:
            assert hi[f] is None
            continue
        d = ulp_distance(lo[f], hi[f])
        assert d.max(initial=0) <= 1, (what, f, d.max(), kw)
    return hi


@pytest.mark.parametrize("seed", range(16))
def test_self_agreement_random_combined(seed):
    q, k, v, g, g_lse, kw = combined_case(seed)
    _self_agree(q, k, v, g, g_lse, kw, seed)


@pytest.mark.parametrize("name", EXTREME)
def test_self_agreement_extreme(name, rng):
    q, k, v, g, g_lse, kw = _extreme_case(name, rng)
    hi = _self_agree(q, k, v, g, g_lse, kw, name)
    for f in ("out", "dv"):
        assert (np.isfinite(hi[f]) & (hi[f] != 0)).any(), f
    if kw.get("sinks") is not None:
        assert (hi["dsinks"] != 0).any()


def test_combined_cases_cover_every_option():
    seen = set()
    for seed in range(16):
        _, _, _, _, g_lse, kw = combined_case(seed)
        seen |= {n for n, x in kw.items() if not (x is None or x is False or isinstance(x, str) and x in
                                                 ("top-left", "zeros"))}
        seen |= {"g_lse"} if g_lse is not None else set()
        if kw.get("sinks") is not None:
            seen |= {"sink=-inf"} if (kw["sinks"] == -np.inf).any() else set()
            seen |= {"sink=+inf"} if (kw["sinks"] == np.inf).any() else set()
    assert seen >= {"align", "causal", "window", "softcap", "alibi_slopes", "sinks", "q_segment_ids", "mask",
                    "bias", "g_lse", "masked_rows", "sink=-inf", "sink=+inf"}, seen


# ---------------------------------------------------------------- 3. VJP vs mpmath finite differences

H = 2.0**-30


def _objective(arrs, g, g_lse, kw) -> mpmath.mpf:
    """sum g . out + sum g_lse . lse over the rows whose lse is finite (the others take no gradient)."""
    res = mp.attention(arrs["q"], arrs["k"], arrs["v"], mp_values=True,
                       **dict(kw, bias=arrs["bias"], sinks=arrs["sinks"]))
    total = mpmath.fsum(mpmath.mpf(float(a)) * o for a, o in zip(g.ravel(), res.mp_out.ravel(), strict=True))
    if g_lse is not None:
        pairs = zip(g_lse.ravel(), res.mp_lse.ravel(), strict=True)
        total += mpmath.fsum(mpmath.mpf(float(a)) * x for a, x in pairs if mpmath.isfinite(x))
    return total


def _fd(q, k, v, g, g_lse, kw, which, idx) -> mpmath.mpf:
    arrs = {"q": q, "k": k, "v": v, "bias": kw.get("bias"), "sinks": kw.get("sinks")}
    vals = []
    for sign in (1, -1):
        a = {n: (x.copy() if x is not None else None) for n, x in arrs.items()}
        x0 = a[which][idx]
        a[which][idx] = x0 + sign * H
        assert a[which][idx] - x0 == sign * H  # the perturbation is exact
        vals.append(_objective(a, g, g_lse, kw))
    return (vals[0] - vals[1]) / (2 * mpmath.mpf(H))


def _fd_case(name, r):
    if name == "softcap-alibi-window-bottom-right-sinks":
        q, k, v = bf16_exact(r, (1, 4, 2, 3)), bf16_exact(r, (1, 6, 1, 3)), bf16_exact(r, (1, 6, 1, 2))
        kw = {"softcap": 1.5, "alibi_slopes": np.array([0.25, 0.5]), "window": (2, 1), "align": "bottom-right",
              "sinks": np.array([0.375, -1.25]), "bias": bf16_exact(r, (2, 4, 6))}
        return q, k, v, bf16_exact(r, (1, 4, 2, 2)), bf16_exact(r, (1, 2, 4)), kw
    if name == "segments-causal-gqa-softcap-sinks":
        q, k, v = bf16_exact(r, (2, 5, 4, 2)), bf16_exact(r, (2, 5, 2, 2)), bf16_exact(r, (2, 5, 2, 3))
        seg = np.array([[0, 0, 1, 1, 1], [2, 2, 2, 2, 5]])
        kw = {"softcap": 0.75, "causal": True, "q_segment_ids": seg, "kv_segment_ids": seg,
              "sinks": bf16_exact(r, (4,)), "bias": bf16_exact(r, (2, 1, 5, 5)),
              "alibi_slopes": np.abs(bf16_exact(r, (2, 4), 0.3)), "scale": 0.625}
        return q, k, v, bf16_exact(r, (2, 5, 4, 3)), bf16_exact(r, (2, 4, 5)), kw
    if name == "empty-rows-lq>lk-sinks":
        # Rows 0..2 see no key: head 0's have the sink (out 0, lse sigma), head 1's are masked rows.
        q, k, v = bf16_exact(r, (1, 6, 2, 2)), bf16_exact(r, (1, 3, 2, 2)), bf16_exact(r, (1, 3, 2, 3))
        kw = {"causal": True, "align": "bottom-right", "sinks": np.array([0.5, -np.inf]),
              "bias": bf16_exact(r, (1, 2, 6, 3)), "softcap": 2.5}
        return q, k, v, bf16_exact(r, (1, 6, 2, 3)), bf16_exact(r, (1, 2, 6)), kw
    raise KeyError(name)


FD_CASES = ["softcap-alibi-window-bottom-right-sinks", "segments-causal-gqa-softcap-sinks", "empty-rows-lq>lk-sinks"]


@pytest.mark.parametrize("name", FD_CASES)
def test_vjp_matches_finite_differences(name, rng):
    q, k, v, g, g_lse, kw = _fd_case(name, rng)
    grads = mp.attention_vjp(q, k, v, g, g_lse=g_lse, **kw)
    arrays = {"q": (q, grads.dq), "k": (k, grads.dk), "v": (v, grads.dv), "bias": (kw["bias"], grads.dbias),
              "sinks": (kw["sinks"], grads.dsinks)}
    pick = np.random.default_rng(7)
    with mpmath.workprec(400):
        for which, (x, dx) in arrays.items():
            assert dx.shape == x.shape
            scale = np.abs(dx).max()
            assert scale > 0
            flat = [i for i in np.ndindex(*x.shape) if np.isfinite(x[i])]
            chosen = {np.unravel_index(np.argmax(np.abs(dx)), dx.shape)}
            chosen |= {flat[i] for i in pick.choice(len(flat), size=min(3, len(flat)), replace=False)}
            for idx in chosen:
                fd = _fd(q, k, v, g, g_lse, kw, which, idx)
                err = abs(to_f64(fd) - dx[idx])
                assert err <= 1e-12 * scale, f"d{which}{list(idx)}: vjp {dx[idx]!r} fd {to_f64(fd)!r}"
    if name == "empty-rows-lq>lk-sinks":
        assert grads.dsinks[1] == 0  # a -inf sink has no gradient
        assert np.isfinite(grads.lse[0, 0, :3]).all() and (grads.lse[0, 1, :3] == -np.inf).all()


def test_lse_cotangent_alone(rng):
    """With g = 0 only lse is differentiated: dv = 0, sum_j ds_ij + ds_sink,i = g_lse_i (dbias over keys)."""
    q, k, v, _ = qkvg(rng, b=2, lq=4, lk=5, hq=2, hkv=1)
    g = np.zeros((2, 4, 2, 2), np.float32)
    g_lse = bf16_exact(rng, (2, 2, 4))
    sinks = np.array([0.5, -2.0], np.float32)
    res = mp.attention_vjp(q, k, v, g, g_lse=g_lse, bias=np.zeros((2, 2, 4, 1)), sinks=sinks, probs=True)
    assert (res.dv == 0).all() and (res.dq != 0).any()
    p_sink = res.p_sink
    np.testing.assert_allclose(res.dbias[..., 0] + p_sink * g_lse, g_lse, rtol=1e-15, atol=0)
    np.testing.assert_allclose(res.dsinks, (p_sink * g_lse).sum(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(res.p.sum(-1) + p_sink, 1.0, rtol=1e-15)


# ---------------------------------------------------------------- 4. exact invariances


def test_key_permutation_invariance_with_segments_and_sinks(rng):
    b, lq, lk = 2, 5, 7
    q, k, v = randn(rng, (b, lq, 2, 3), BF16), randn(rng, (b, lk, 1, 3), BF16), randn(rng, (b, lk, 1, 2), BF16)
    g, g_lse = randn(rng, (b, lq, 2, 2), BF16), randn(rng, (b, 2, lq), BF16)
    mask = rng.random((b, 1, lq, lk)) < 0.8
    bias = randn(rng, (1, 2, lq, lk), np.float32)
    qseg, kvseg = rng.integers(0, 2, (b, lq)), rng.integers(0, 2, (b, lk))
    kw = {"softcap": 4.0, "sinks": np.array([0.5, -np.inf], np.float32), "masked_rows": "uniform"}
    perm = rng.permutation(lk)
    r0 = mp.attention_vjp(q, k, v, g, g_lse=g_lse, mask=mask, bias=bias, q_segment_ids=qseg, kv_segment_ids=kvseg,
                          **kw)
    r1 = mp.attention_vjp(q, k[:, perm], v[:, perm], g, g_lse=g_lse, mask=mask[..., perm], bias=bias[..., perm],
                          q_segment_ids=qseg, kv_segment_ids=kvseg[:, perm], **kw)
    for f in ("out", "lse", "dq", "dsinks"):
        np.testing.assert_array_equal(getattr(r1, f), getattr(r0, f), err_msg=f)
    np.testing.assert_array_equal(r1.dk, r0.dk[:, perm])
    np.testing.assert_array_equal(r1.dv, r0.dv[:, perm])
    np.testing.assert_array_equal(r1.dbias, r0.dbias[..., perm])
    assert (r0.dk != r0.dk[:, perm]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_common_shift_of_logits_and_sinks(dtype, rng):
    """Adding c to every logit (through bias, after the softcap) and to every sink changes only lse."""
    b, lq, lk = 2, 4, 6
    q, k, v = randn(rng, (b, lq, 2, 4), dtype), randn(rng, (b, lk, 1, 4), dtype), randn(rng, (b, lk, 1, 3), dtype)
    g, g_lse = randn(rng, (b, lq, 2, 3), dtype), randn(rng, (b, 2, lq), dtype)
    mask = rng.random((b, 2, lq, lk)) < 0.8
    mask[0, 1, 2] = False  # an empty row with a sink
    bias = rng.integers(-4096, 4096, (b, 2, lq, lk)) * 2.0**-10
    sinks = np.array([0.75, -1.5])
    c = 3 * 2.0**20
    kw = {"mask": mask, "softcap": 2.0, "alibi_slopes": np.array([0.25, 0.5]), "window": (3, 1)}
    r0 = mp.attention_vjp(q, k, v, g, g_lse=g_lse, bias=bias, sinks=sinks, **kw)
    r1 = mp.attention_vjp(q, k, v, g, g_lse=g_lse, bias=bias + c, sinks=sinks + c, **kw)
    for f in ("out", "dq", "dk", "dv", "dbias", "dsinks"):
        np.testing.assert_array_equal(getattr(r1, f), getattr(r0, f), err_msg=f)
    assert np.abs(r1.lse - c - r0.lse).max() <= np.spacing(2.0**22)
    assert r0.lse[0, 1, 2] == sinks[1]
