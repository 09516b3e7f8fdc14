"""oracles.mp against itself at doubled precision, closed forms, mpmath finite differences and invariances."""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import mpmath
import numpy as np
import pytest

from oracles import mp

BF16 = ml_dtypes.bfloat16
FIELDS = ("out", "lse", "dq", "dk", "dv", "dbias")


# ---------------------------------------------------------------- helpers


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Float64 ulps between a and b elementwise (0 where equal, incl. 0 == -0, inf == inf, NaN == NaN)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))

    def ordered(x):  # consecutive floats map to consecutive Python ints
        i = x.view(np.int64).astype(object)
        mag = np.bitwise_and(i, 0x7FFFFFFFFFFFFFFF)
        return np.where(i < 0, -mag, mag)

    d = np.abs(ordered(a) - ordered(b)).astype(np.float64)
    d = np.where(np.isnan(a) | np.isnan(b), np.inf, d)
    return np.where(same, 0.0, d)


def test_ulp_distance_helper():
    x = np.array([1.0, 0.0, -0.0, np.inf, np.nan, 1.0, -1e-310, 5e-324])
    y = np.array([np.nextafter(1.0, 2.0), -0.0, 0.0, np.inf, np.nan, np.nan, -1e-310, -5e-324])
    np.testing.assert_array_equal(ulp_distance(x, y), [1, 0, 0, 0, 0, np.inf, 0, 2])
    assert ulp_distance(np.array([1.0]), np.array([1.0 + 4 * 2.0**-52]))[0] == 4


def to_f64(x) -> float:
    """An mpf (any precision) correctly rounded to float64, via exact rationals."""
    x = mpmath.mpf(x)
    if not mpmath.isfinite(x):
        return float(x)
    sign, man, exp, _ = x._mpf_
    r = Fraction(int(man)) * Fraction(2) ** int(exp)
    try:
        return -float(r) if sign else float(r)
    except OverflowError:
        return -np.inf if sign else np.inf


def f64_array(x: np.ndarray) -> np.ndarray:
    """An object array of mpf, each element correctly rounded to float64."""
    return np.array([to_f64(e) for e in x.ravel()], dtype=np.float64).reshape(x.shape)


def both(q, k, v, g, prec=mp.DEFAULT_PREC, **kw):
    """Forward and VJP results (the VJP's out/lse checked against the forward's) as a dict."""
    fwd = mp.attention(q, k, v, prec=prec, **kw)
    grads = mp.attention_vjp(q, k, v, g, prec=prec, **kw)
    assert ulp_distance(fwd.out, grads.out).max(initial=0) == 0
    assert ulp_distance(fwd.lse, grads.lse).max(initial=0) == 0
    return {"out": fwd.out, "lse": fwd.lse, "dq": grads.dq, "dk": grads.dk, "dv": grads.dv, "dbias": grads.dbias}


def randn(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def bf16_exact(rng, shape, scale=1.0):
    """float64 arrays whose values are bf16-representable (8 significant bits)."""
    return (rng.standard_normal(shape) * scale).astype(BF16).astype(np.float64)


# ---------------------------------------------------------------- 1. self-agreement at doubled precision


def _case(name, rng):
    """Named cases: (q, k, v, g, kwargs)."""
    r = rng
    if name.startswith("random-"):
        dt = {"fp32": np.float32, "bf16": BF16, "fp16": np.float16, "fp64": np.float64}[name.split("-")[1]]
        q, k, v = randn(r, (2, 5, 4, 3), dt), randn(r, (2, 7, 2, 3), dt), randn(r, (2, 7, 2, 2), dt)
        g = randn(r, (2, 5, 4, 2), dt)
        mask = r.random((2, 1, 5, 7)) < 0.8
        bias = randn(r, (4, 5, 7), dt)
        return q, k, v, g, {"mask": mask, "bias": bias}
    if name == "logits-1e30-fp32":
        # q, k entries of magnitude 1e15..1e19 with random signs: logits up to ~1e38.
        mag = lambda shape: (10.0 ** r.uniform(15, 19, shape) * r.choice([-1, 1], shape)).astype(np.float32)  # noqa: E731
        q, k = mag((1, 4, 2, 3)), mag((1, 6, 2, 3))
        v, g = randn(r, (1, 6, 2, 2)), randn(r, (1, 4, 2, 2))
        return q, k, v, g, {}
    if name == "offset-1e30-fp32":
        # A huge common logit offset (a^2 ~ 1e30) plus O(1) differences: needs ~100 extra working bits.
        q, k = randn(r, (1, 4, 2, 3)), randn(r, (1, 6, 1, 3))
        q[..., 0], k[..., 0] = np.float32(1e15), np.float32(1e15)
        return q, k, randn(r, (1, 6, 1, 2)), randn(r, (1, 4, 2, 2)), {"scale": 1.0}
    if name == "offset-2^100-fp64":
        # Logits 2^200 + O(1): the working precision must grow by ~200 bits to resolve the softmax.
        q, k = randn(r, (1, 4, 2, 3), np.float64), randn(r, (1, 6, 1, 3), np.float64)
        q[..., 0], k[..., 0] = 2.0**100, 2.0**100
        q[0, 1, 0, 0] = -(2.0**100)  # and a row of logits -2^200 + O(1)
        return q, k, randn(r, (1, 6, 1, 2), np.float64), randn(r, (1, 4, 2, 2), np.float64), {}
    if name == "bias-minus-1e300":
        q, k, v = (
            randn(r, (1, 4, 2, 3), np.float64),
            randn(r, (1, 6, 2, 3), np.float64),
            randn(r, (1, 6, 2, 2), np.float64),
        )
        bias = r.standard_normal((1, 2, 4, 6))
        bias[r.random(bias.shape) < 0.4] = -1e300
        bias[0, 0, 1, :] = -1e300 - r.uniform(0, 1e285, 6)  # a row made only of -1e300 logits
        return q, k, v, randn(r, (1, 4, 2, 2), np.float64), {"bias": bias}
    if name == "fp16-near-max":
        big = lambda shape: (r.choice([-1, 1], shape) * r.uniform(60000, 65504, shape)).astype(np.float16)  # noqa: E731
        q, k = randn(r, (1, 3, 2, 4), np.float16, 0.05), randn(r, (1, 5, 2, 4), np.float16, 0.05)
        return q, k, big((1, 5, 2, 3)), big((1, 3, 2, 3)), {"bias": big((1, 1, 3, 5)) * np.float16(1e-3)}
    if name == "fp16-subnormal":
        tiny = lambda shape: (r.integers(-1023, 1024, shape) * 2.0**-24).astype(np.float16)  # noqa: E731
        return tiny((1, 3, 2, 4)), tiny((1, 5, 2, 4)), tiny((1, 5, 2, 3)), tiny((1, 3, 2, 3)), {}
    if name == "fp32-subnormal":
        tiny = lambda shape: (r.standard_normal(shape) * 1e-40).astype(np.float32)  # noqa: E731
        return tiny((1, 3, 2, 4)), tiny((1, 5, 2, 4)), tiny((1, 5, 2, 3)), tiny((1, 3, 2, 3)), {"bias": tiny((3, 5))}
    if name == "all-equal-logits":
        q = np.zeros((1, 3, 2, 4), np.float32)
        return q, randn(r, (1, 7, 2, 4)), randn(r, (1, 7, 2, 3)), randn(r, (1, 3, 2, 3)), {}
    if name.startswith("masked-rows-"):
        q, k, v = randn(r, (2, 4, 2, 3)), randn(r, (2, 5, 2, 3)), randn(r, (2, 5, 2, 2))
        mask = r.random((2, 2, 4, 5)) < 0.6
        mask[0, 1, 2, :] = False
        mask[1, :, 0, :] = False
        bias = randn(r, (2, 1, 4, 5))
        return q, k, v, randn(r, (2, 4, 2, 2)), {"mask": mask, "bias": bias, "masked_rows": name.split("-")[2]}
    if name.startswith("causal-"):
        lq, lk = (7, 4) if name == "causal-lq>lk" else (3, 8)
        q, k, v = randn(r, (2, lq, 2, 3), BF16), randn(r, (2, lk, 2, 3), BF16), randn(r, (2, lk, 2, 4), BF16)
        return q, k, v, randn(r, (2, lq, 2, 4), BF16), {"causal": True, "bias": randn(r, (2, 1, lk), BF16)}
    if name == "gqa-dk!=dv":
        q, k, v = randn(r, (1, 5, 4, 6)), randn(r, (1, 6, 2, 6)), randn(r, (1, 6, 2, 3))
        return q, k, v, randn(r, (1, 5, 4, 3)), {"bias": randn(r, (1, 4, 1, 6)), "mask": r.random((5, 6)) < 0.8}
    if name == "fp64-huge-values-spread-logits":
        # |v|, |g| ~ 1e300 and logit gaps up to ~4000: keys far below the row maximum still
        # contribute normal numbers to dbias and dk (p * g.v with g.v ~ 1e600).
        q, k = randn(r, (1, 3, 1, 2), np.float64), randn(r, (1, 8, 1, 2), np.float64)
        v = randn(r, (1, 8, 1, 2), np.float64, 1e300)
        g = randn(r, (1, 3, 1, 2), np.float64, 1e300)
        bias = -np.sort(r.uniform(0, 4000, (3, 8)), axis=1)
        bias[:, 0] = 0.0
        bias[0, 1:4] = [-1712.0, -1900.5, -2100.25]
        return q, k, v, g, {"bias": bias}
    raise KeyError(name)


SELF_CASES = [
    "random-fp32", "random-bf16", "random-fp16", "random-fp64",
    "logits-1e30-fp32", "offset-1e30-fp32", "bias-minus-1e300", "fp16-near-max", "fp16-subnormal",
    "fp32-subnormal", "all-equal-logits", "masked-rows-zeros", "masked-rows-nan", "masked-rows-uniform",
    "causal-lq>lk", "causal-lq<lk", "gqa-dk!=dv", "fp64-huge-values-spread-logits", "offset-2^100-fp64",
]  # fmt: skip


@pytest.mark.parametrize("name", SELF_CASES)
def test_self_agreement_at_doubled_precision(name, rng):
    q, k, v, g, kw = _case(name, rng)
    lo = both(q, k, v, g, prec=mp.DEFAULT_PREC, **kw)
    hi = both(q, k, v, g, prec=2 * mp.DEFAULT_PREC, **kw)
    for f in FIELDS:
        if lo[f] is None:
            assert hi[f] is None and kw.get("bias") is None
            continue
        assert lo[f].shape == hi[f].shape
        d = ulp_distance(lo[f], hi[f])
        worst = np.unravel_index(np.argmax(d), d.shape)
        assert d.max() < 1, f"{name}: {f}{list(worst)} {lo[f][worst]!r} vs {hi[f][worst]!r} ({d.max()} ulp)"
    # The case is not vacuous: outputs and gradients carry nonzero finite values.
    for f in ("out", "dv"):
        assert (np.isfinite(hi[f]) & (hi[f] != 0)).any(), f


@pytest.mark.parametrize("seed", range(8))
def test_self_agreement_random_configurations(seed):
    """Random dtype, shape, GQA, mask density, bias shape, causal and policy; moderate sizes."""
    r = np.random.default_rng(1000 + seed)
    dt = [np.float32, BF16, np.float16, np.float64][seed % 4]
    b, lq, lk, hkv = int(r.integers(1, 3)), int(r.integers(1, 12)), int(r.integers(1, 12)), int(r.integers(1, 3))
    hq, dk, dv = hkv * int(r.integers(1, 3)), int(r.integers(1, 9)), int(r.integers(1, 6))
    scale = float(r.choice([1.0, 4.0, 10.0]))  # spread of the logits
    q, k = randn(r, (b, lq, hq, dk), dt, scale), randn(r, (b, lk, hkv, dk), dt, scale)
    v, g = randn(r, (b, lk, hkv, dv), dt), randn(r, (b, lq, hq, dv), dt)
    kw = {"causal": bool(r.random() < 0.4), "masked_rows": str(r.choice(["zeros", "nan", "uniform"]))}
    if r.random() < 0.7:
        kw["mask"] = r.random((b, 1, lq, lk)) < r.uniform(0.3, 1.0)
    if r.random() < 0.7:
        shape = [(b, hq, lq, lk), (hq, lq, lk), (1, 1, lk), (b, 1, lq, lk)][int(r.integers(0, 4))]
        kw["bias"] = randn(r, shape, dt, 2.0)
    lo = both(q, k, v, g, prec=mp.DEFAULT_PREC, **kw)
    hi = both(q, k, v, g, prec=2 * mp.DEFAULT_PREC, **kw)
    for f in FIELDS:
        if lo[f] is not None:
            d = ulp_distance(lo[f], hi[f])
            assert d.max() < 1, (f, kw, d.max())
    assert (np.isfinite(hi["out"]) & (hi["out"] != 0)).any()


def test_huge_fp64_case_has_far_keys_that_matter(rng):
    """The spread-logits case must exercise keys beyond 2**-2460 of the row maximum with visible gradients."""
    q, k, v, g, kw = _case("fp64-huge-values-spread-logits", rng)
    res = mp.attention_vjp(q, k, v, g, **kw)
    far = kw["bias"] < -(mp.DEFAULT_PREC + 2300) * np.log(2)
    dbias = res.dbias
    assert (far & np.isfinite(dbias) & (dbias != 0)).any()


# ---------------------------------------------------------------- 2. closed forms


def test_one_visible_key(rng):
    """out = v of the one visible key, lse = its logit; dv of that key = sum of g, dq = dk = dbias = 0."""
    b, lq, lk, hq, hkv = 2, 4, 5, 4, 2
    q, k = bf16_exact(rng, (b, lq, hq, 3)), bf16_exact(rng, (b, lk, hkv, 3))
    v, g = randn(rng, (b, lk, hkv, 2)), bf16_exact(rng, (b, lq, hq, 2))
    bias = bf16_exact(rng, (b, hq, lq, lk))
    key = rng.integers(0, lk, (b, hq, lq))
    mask = np.zeros((b, hq, lq, lk), dtype=bool)
    np.put_along_axis(mask, key[..., None], True, axis=-1)
    res = mp.attention_vjp(q, k, v, g, mask=mask, bias=bias, scale=1.0)
    dv = np.zeros_like(v, dtype=np.float64)
    for bb, h, i in np.ndindex(b, hq, lq):
        j, kvh = key[bb, h, i], h // (hq // hkv)
        assert res.out[bb, i, h].tolist() == v[bb, j, kvh].astype(np.float64).tolist()
        s = float(Fraction(float(q[bb, i, h] @ k[bb, j, kvh])) + Fraction(float(bias[bb, h, i, j])))
        assert np.dot(q[bb, i, h], k[bb, j, kvh]) == sum(
            Fraction(x) * Fraction(y) for x, y in zip(q[bb, i, h], k[bb, j, kvh], strict=True)
        )
        assert res.lse[bb, h, i] == s
        dv[bb, j, kvh] += g[bb, i, h]  # exact: bf16 values, few terms
    np.testing.assert_array_equal(res.dv, dv)
    assert (res.dq == 0).all() and (res.dk == 0).all() and (res.dbias == 0).all()
    assert (dv != 0).any()


@pytest.mark.parametrize("lk", [2, 3, 5, 6, 7, 11])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equal_logits_give_the_exact_mean(lk, dtype, rng):
    q = np.zeros((1, 2, 1, 3), dtype)
    k, v = randn(rng, (1, lk, 1, 3), dtype), randn(rng, (1, lk, 1, 4), dtype)
    out = mp.attention(q, k, v).out
    for c in range(4):
        mean = float(sum(Fraction(float(x)) for x in v[0, :, 0, c]) / lk)
        assert out[0, 0, 0, c] == mean and out[0, 1, 0, c] == mean


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 64, 1000])
@pytest.mark.parametrize("s", [0.0, 3.25, -17.5, 1e-300, 1e30, -1e300, 123456.789])
def test_lse_of_equal_logits(n, s):
    q = np.zeros((1, 1, 1, 1))
    k, v = np.zeros((1, n, 1, 1)), np.ones((1, n, 1, 1))
    res = mp.attention(q, k, v, bias=np.full((1, n), s))
    with mpmath.workprec(4000):
        want = to_f64(mpmath.mpf(s) + mpmath.log(n))
    assert res.lse[0, 0, 0] == want
    assert res.out[0, 0, 0, 0] == 1.0


def _sigma(t):
    return 1 / (1 + mpmath.exp(-t))


@pytest.mark.parametrize("t", [0.0, 1e-20, 0.5, -3.25, 37.0, -37.0, 700.0, 1712.0, 2100.0, 1e5, -1e5])
@pytest.mark.parametrize("big", [False, True])
def test_two_keys_sigmoid_mixture(t, big, rng):
    """Logits (t, 0): out = v0 s(t) + v1 s(-t); dbias = s(t) s(-t) g.(v0 - v1) [1, -1]; dq = dk = 0."""
    mag = 1e300 if big else 1.0
    q, k = np.zeros((1, 1, 1, 1)), np.zeros((1, 2, 1, 1))
    v, g = randn(rng, (1, 2, 1, 3), np.float64, mag), randn(rng, (1, 1, 1, 3), np.float64, mag)
    bias = np.array([[t, 0.0]])
    res = mp.attention_vjp(q, k, v, g, bias=bias)
    with mpmath.workprec(6000):
        s0, s1 = _sigma(mpmath.mpf(t)), _sigma(-mpmath.mpf(t))
        vm = [[mpmath.mpf(float(x)) for x in v[0, j, 0]] for j in range(2)]
        want_out = [to_f64(vm[0][c] * s0 + vm[1][c] * s1) for c in range(3)]
        gdv = mpmath.fsum(mpmath.mpf(float(g[0, 0, 0, c])) * (vm[0][c] - vm[1][c]) for c in range(3))
        want_db = [to_f64(s0 * s1 * gdv), to_f64(-s0 * s1 * gdv)]
        want_dv = [[to_f64(s * mpmath.mpf(float(g[0, 0, 0, c]))) for c in range(3)] for s in (s0, s1)]
        want_lse = to_f64(mpmath.log(mpmath.exp(mpmath.mpf(t)) + 1))
    assert ulp_distance(res.out[0, 0, 0], want_out).max() <= 1, (res.out, want_out)
    assert ulp_distance(res.dbias[0], want_db).max() <= 1, (res.dbias, want_db)
    assert ulp_distance(res.dv[0, :, 0], want_dv).max() <= 1, (res.dv, want_dv)
    assert ulp_distance(res.lse[0, 0], want_lse).max() <= 1
    assert (res.dq == 0).all() and (res.dk == 0).all()


def _masked_row_case(rng):
    b, lq, lk, hq, hkv = 2, 4, 5, 4, 2
    q, k = randn(rng, (b, lq, hq, 3)), randn(rng, (b, lk, hkv, 3))
    v, g = randn(rng, (b, lk, hkv, 2)), randn(rng, (b, lq, hq, 2))
    mask = np.ones((b, hq, lq, lk), dtype=bool)
    mask[0, 1, 2] = False  # batch 0, query head 1 (kv head 0), row 2
    mask[1, 3, :2] = False  # batch 1, query head 3 (kv head 1), rows 0 and 1
    bias = randn(rng, (b, hq, lq, lk))
    masked = np.zeros((b, hq, lq), dtype=bool)
    masked[0, 1, 2] = masked[1, 3, 0] = masked[1, 3, 1] = True
    return q, k, v, g, mask, bias, masked


@pytest.mark.parametrize("policy", ["zeros", "nan", "uniform"])
def test_fully_masked_rows(policy, rng):
    q, k, v, g, mask, bias, masked = _masked_row_case(rng)
    res = mp.attention_vjp(q, k, v, g, mask=mask, bias=bias, masked_rows=policy)
    fwd = mp.attention(q, k, v, mask=mask, bias=bias, masked_rows=policy, mp_values=True)
    # The same problem with the masked rows removed from g gives the visible rows' contributions.
    g0 = np.where(masked.transpose(0, 2, 1)[..., None], 0, g).astype(np.float32)
    ref = mp.attention_vjp(q, k, v, g0, mask=mask, bias=bias, masked_rows="zeros")
    out_rows = res.out.transpose(0, 2, 1, 3)[masked]  # [n_masked, Dv]
    lse_rows = res.lse[masked]
    vis = ~masked
    np.testing.assert_array_equal(res.out.transpose(0, 2, 1, 3)[vis], ref.out.transpose(0, 2, 1, 3)[vis])
    np.testing.assert_array_equal(res.lse[vis], ref.lse[vis])
    assert np.isfinite(res.lse[vis]).all()
    # mp_values agree with the float64 results, masked rows included.
    np.testing.assert_array_equal(f64_array(fwd.mp_out), fwd.out)
    np.testing.assert_array_equal(f64_array(fwd.mp_lse), fwd.lse)
    np.testing.assert_array_equal(fwd.out, res.out)
    dq_rows = res.dq.transpose(0, 2, 1, 3)[masked]
    dbias_rows = res.dbias[masked]
    if policy == "zeros":
        assert (out_rows == 0).all() and (lse_rows == -np.inf).all()
        assert (dq_rows == 0).all() and (dbias_rows == 0).all()
        for f in ("dq", "dk", "dv", "dbias"):
            np.testing.assert_array_equal(getattr(res, f), getattr(ref, f))
    elif policy == "nan":
        assert np.isnan(out_rows).all() and np.isnan(lse_rows).all()
        assert np.isnan(dq_rows).all() and np.isnan(dbias_rows).all()
        assert not np.isnan(res.dq.transpose(0, 2, 1, 3)[vis]).any()
        assert not np.isnan(res.dbias[vis]).any()
        nan_heads = {(0, 0), (1, 1)}  # (batch, kv head) read by a masked row
        for bb, kvh in np.ndindex(2, 2):
            for f in ("dk", "dv"):
                blk = getattr(res, f)[bb, :, kvh]
                if (bb, kvh) in nan_heads:
                    assert np.isnan(blk).all(), (f, bb, kvh)
                else:
                    np.testing.assert_array_equal(blk, getattr(ref, f)[bb, :, kvh])
    else:  # uniform
        lk = v.shape[1]
        for bb, h, i in zip(*np.nonzero(masked), strict=True):
            kvh = h // 2
            want = [float(sum(Fraction(float(x)) for x in v[bb, :, kvh, c]) / lk) for c in range(v.shape[-1])]
            assert res.out[bb, i, h].tolist() == want
        assert (lse_rows == -np.inf).all()
        assert (dq_rows == 0).all() and (dbias_rows == 0).all()
        np.testing.assert_array_equal(res.dq, ref.dq)
        np.testing.assert_array_equal(res.dk, ref.dk)
        np.testing.assert_array_equal(res.dbias, ref.dbias)
        # dv = visible rows' contribution + (sum of the masked rows' g) / Lk for every key of the kv head.
        for bb, j, kvh, c in np.ndindex(*v.shape):
            extra = sum(
                (
                    Fraction(float(g[bb, i, h, c]))
                    for h, i in zip(*np.nonzero(masked[bb]), strict=True)
                    if h // 2 == kvh
                ),
                Fraction(0),
            )
            got, vis_part = res.dv[bb, j, kvh, c], ref.dv[bb, j, kvh, c]
            if extra == 0:
                assert got == vis_part
            else:
                err = abs(Fraction(float(got)) - Fraction(float(vis_part)) - extra / lk)
                assert err <= Fraction(float(np.spacing(abs(got)) + np.spacing(abs(vis_part)))) / 2


# ---------------------------------------------------------------- 3. VJP vs mpmath finite differences

H = 2.0**-30


def _objective(q, k, v, g, kw) -> mpmath.mpf:
    res = mp.attention(q, k, v, mp_values=True, **kw)
    return mpmath.fsum(mpmath.mpf(float(gg)) * o for gg, o in zip(g.ravel(), res.mp_out.ravel(), strict=True))


def _fd(q, k, v, g, kw, which, idx) -> mpmath.mpf:
    arrs = {"q": q, "k": k, "v": v, "bias": kw.get("bias")}
    vals = []
    for sign in (1, -1):
        a = {n: (x.copy() if x is not None else None) for n, x in arrs.items()}
        x0 = a[which][idx]
        a[which][idx] = x0 + sign * H
        assert a[which][idx] - x0 == sign * H  # the perturbation is exact
        kw2 = dict(kw, bias=a["bias"])
        vals.append(_objective(a["q"], a["k"], a["v"], g, kw2))
    return (vals[0] - vals[1]) / (2 * mpmath.mpf(H))


def _fd_case(name, rng):
    r = rng
    if name == "mask-gqa-bias":
        q, k, v = bf16_exact(r, (1, 3, 4, 3)), bf16_exact(r, (1, 4, 2, 3)), bf16_exact(r, (1, 4, 2, 2))
        mask = r.random((1, 4, 3, 4)) < 0.7
        mask[0, :, :, 0] = True
        return q, k, v, bf16_exact(r, (1, 3, 4, 2)), {"mask": mask, "bias": bf16_exact(r, (1, 4, 3, 4))}
    if name == "causal-bcast-bias":
        q, k, v = bf16_exact(r, (2, 4, 2, 3)), bf16_exact(r, (2, 3, 1, 3)), bf16_exact(r, (2, 3, 1, 4))
        return q, k, v, bf16_exact(r, (2, 4, 2, 4)), {"causal": True, "bias": bf16_exact(r, (2, 1, 3))}
    if name == "uniform-masked-rows":
        q, k, v = bf16_exact(r, (1, 3, 2, 2)), bf16_exact(r, (1, 4, 2, 2)), bf16_exact(r, (1, 4, 2, 3))
        mask = r.random((1, 2, 3, 4)) < 0.7
        mask[0, 1, 1, :] = False
        mask[0, 0, 2, :] = False
        return (
            q,
            k,
            v,
            bf16_exact(r, (1, 3, 2, 3)),
            {"mask": mask, "bias": bf16_exact(r, (3, 4)), "masked_rows": "uniform", "scale": 0.75},
        )
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mask-gqa-bias", "causal-bcast-bias", "uniform-masked-rows"])
def test_vjp_matches_finite_differences(name, rng):
    q, k, v, g, kw = _fd_case(name, rng)
    grads = mp.attention_vjp(q, k, v, g, **kw)
    arrays = {"q": (q, grads.dq), "k": (k, grads.dk), "v": (v, grads.dv), "bias": (kw["bias"], grads.dbias)}
    pick = np.random.default_rng(7)
    with mpmath.workprec(400):
        for which, (x, dx) in arrays.items():
            assert dx.shape == x.shape
            scale = np.abs(dx).max()
            assert scale > 0
            flat = list(np.ndindex(*x.shape))
            # The largest gradient element plus random ones (masked-key entries included when drawn).
            chosen = {np.unravel_index(np.argmax(np.abs(dx)), dx.shape)}
            chosen |= {flat[i] for i in pick.choice(len(flat), size=min(3, len(flat)), replace=False)}
            for idx in chosen:
                fd = _fd(q, k, v, g, kw, which, idx)
                err = abs(to_f64(fd) - dx[idx])
                assert err <= 1e-12 * scale, f"d{which}{list(idx)}: vjp {dx[idx]!r} fd {to_f64(fd)!r}"


def test_gqa_kv_gradient_sums_query_heads(rng):
    """dk, dv of a kv head = the sum of the same problem's gradients with the kv head duplicated per query head."""
    q, k, v = bf16_exact(rng, (1, 3, 4, 2)), bf16_exact(rng, (1, 5, 2, 2)), bf16_exact(rng, (1, 5, 2, 3))
    g = bf16_exact(rng, (1, 3, 4, 3))
    res = mp.attention_vjp(q, k, v, g)
    kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    full = mp.attention_vjp(q, kr, vr, g)
    np.testing.assert_array_equal(res.out, full.out)
    np.testing.assert_array_equal(res.dq, full.dq)
    for f in ("dk", "dv"):
        got, per_q = getattr(res, f), getattr(full, f)
        a, b = per_q[:, :, 0::2], per_q[:, :, 1::2]
        # a and b are each rounded once: their float sum is within (ulp(a) + ulp(b)) / 2 + ulp(sum) / 2.
        assert (np.abs(got - (a + b)) <= np.spacing(np.abs(a)) + np.spacing(np.abs(b))).all(), f
        assert (got != 0).all()


# ---------------------------------------------------------------- 4. exact invariances


def _grads_dict(r):
    return {"out": r.out, "dq": r.dq, "dk": r.dk, "dv": r.dv, "dbias": r.dbias}


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float64])
def test_row_offset_invariance(dtype, rng):
    b, lq, lk = 2, 4, 6
    q, k, v = randn(rng, (b, lq, 2, 4), dtype), randn(rng, (b, lk, 1, 4), dtype), randn(rng, (b, lk, 1, 3), dtype)
    g = randn(rng, (b, lq, 2, 3), dtype)
    mask = rng.random((b, 2, lq, lk)) < 0.8
    bias = rng.integers(-4096, 4096, (b, 2, lq, lk)) * 2.0**-10  # multiples of 2**-10, |bias| <= 4
    c = rng.integers(-3, 4, (b, 2, lq, 1)) * 2.0**20  # a per-row constant, bias + c exact
    shifted = bias + c
    assert ((shifted - c) == bias).all()
    r0 = mp.attention_vjp(q, k, v, g, mask=mask, bias=bias)
    r1 = mp.attention_vjp(q, k, v, g, mask=mask, bias=shifted)
    for f, x in _grads_dict(r0).items():
        np.testing.assert_array_equal(getattr(r1, f), x, err_msg=f)
    assert ulp_distance(r1.lse - c[..., 0], r0.lse).max() <= 2**30  # lse moves by c (rounded at |c|)
    assert np.abs(r1.lse - c[..., 0] - r0.lse).max() <= np.spacing(2.0**22)


@pytest.mark.parametrize(
    "dtype,a", [(np.float32, 1e15), (np.float32, 1e19), (np.float64, 2.0**100), (np.float64, 1e150)]
)
def test_huge_common_logit_offset_invariance(dtype, a, rng):
    """q = [a, x], k_j = [a, y_j]: logits a^2 + x.y_j (up to 1e300) give the same softmax as x.y_j."""
    q, k, v = randn(rng, (1, 4, 2, 3), dtype), randn(rng, (1, 6, 1, 3), dtype), randn(rng, (1, 6, 1, 2), dtype)
    g = randn(rng, (1, 4, 2, 2), dtype)
    q0, k0 = q.copy(), k.copy()
    q0[..., 0] = k0[..., 0] = 0
    q1, k1 = q.copy(), k.copy()
    q1[..., 0] = k1[..., 0] = dtype(a)
    r0 = mp.attention_vjp(q0, k0, v, g, scale=1.0)
    r1 = mp.attention_vjp(q1, k1, v, g, scale=1.0)
    np.testing.assert_array_equal(r1.out, r0.out)
    np.testing.assert_array_equal(r1.dv, r0.dv)
    np.testing.assert_array_equal(r1.dq[..., 1:], r0.dq[..., 1:])
    np.testing.assert_array_equal(r1.dk[..., 1:], r0.dk[..., 1:])
    # sum_j ds_ij = 0 exactly, so the gradient along the common direction is exactly 0.
    assert (r1.dq[..., 0] == 0).all()
    assert np.abs(r0.out).max() > 0 and (r0.out != r0.out[:, :1]).any()  # not a trivial one-hot softmax


@pytest.mark.parametrize("bias_shape", [(1, 2, 5, 7), (5, 7), (2, 1, 1, 7)])
def test_key_permutation_invariance(bias_shape, rng):
    b, lq, lk = 2, 5, 7
    q, k, v = randn(rng, (b, lq, 2, 3), BF16), randn(rng, (b, lk, 1, 3), BF16), randn(rng, (b, lk, 1, 2), BF16)
    g = randn(rng, (b, lq, 2, 2), BF16)
    mask = rng.random((b, 1, lq, lk)) < 0.7
    mask[0, 0, 3] = False  # a fully masked row too
    bias = randn(rng, bias_shape, np.float32)
    perm = rng.permutation(lk)
    r0 = mp.attention_vjp(q, k, v, g, mask=mask, bias=bias)
    r1 = mp.attention_vjp(q, k[:, perm], v[:, perm], g, mask=mask[..., perm], bias=bias[..., perm])
    np.testing.assert_array_equal(r1.out, r0.out)
    np.testing.assert_array_equal(r1.lse, r0.lse)
    np.testing.assert_array_equal(r1.dq, r0.dq)
    np.testing.assert_array_equal(r1.dk, r0.dk[:, perm])
    np.testing.assert_array_equal(r1.dv, r0.dv[:, perm])
    np.testing.assert_array_equal(r1.dbias, r0.dbias[..., perm])
    assert (r0.dk != r0.dk[:, perm]).any()  # the permutation is not a no-op


# ---------------------------------------------------------------- mp_values


def test_mp_values_round_to_the_float_results(rng):
    q, k, v = randn(rng, (1, 3, 2, 2)), randn(rng, (1, 4, 2, 2)), randn(rng, (1, 4, 2, 3))
    res = mp.attention(q, k, v, bias=randn(rng, (3, 4)), mp_values=True)
    assert res.mp_out.shape == res.out.shape and res.mp_lse.shape == res.lse.shape
    assert all(isinstance(x, mpmath.mpf) for x in res.mp_out.ravel())
    np.testing.assert_array_equal(f64_array(res.mp_out), res.out)
    np.testing.assert_array_equal(f64_array(res.mp_lse), res.lse)
    assert mp.attention(q, k, v).mp_out is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dbias_summed_over_keys_is_exactly_zero(dtype, rng):
    """sum_j ds_ij = 0 exactly, so a bias broadcast over keys has dbias exactly 0 (not ~2**-prec)."""
    q, k, v = (
        randn(rng, (2, 3, 2, 3), dtype, 3.0),
        randn(rng, (2, 6, 1, 3), dtype, 3.0),
        randn(rng, (2, 6, 1, 2), dtype),
    )
    g = randn(rng, (2, 3, 2, 2), dtype)
    for shape in [(2, 2, 3, 1), (3, 1), (1,)]:
        res = mp.attention_vjp(q, k, v, g, bias=randn(rng, shape, dtype), mask=rng.random((3, 6)) < 0.8)
        assert res.dbias.shape == shape
        assert (res.dbias == 0).all(), (shape, res.dbias)
        assert (res.dq != 0).any()


# ---------------------------------------------------------------- an independent, naive mpmath forward


def naive_mp_forward(q, k, v, *, mask=None, bias=None, scale=None, causal=False, prec=600):
    """Textbook softmax attention in mpmath at ``prec`` bits, loop by loop, zeros for masked rows."""
    b_, lq, hq, dk = q.shape
    _, lk, hkv, dv = v.shape
    out = np.zeros((b_, lq, hq, dv))
    lse = np.full((b_, hq, lq), -np.inf)
    full = (b_, hq, lq, lk)
    m = np.ones(full, bool) if mask is None else np.broadcast_to(mask, full)
    bb = np.zeros(full) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), full)
    with mpmath.workprec(prec):
        sc = 1 / mpmath.sqrt(dk) if scale is None else mpmath.mpf(scale)
        for b, h, i in np.ndindex(b_, hq, lq):
            kv = h // (hq // hkv)
            js = [j for j in range(lk) if m[b, h, i, j] and (not causal or j <= i) and bb[b, h, i, j] != -np.inf]
            if not js:
                continue
            s = {
                j: sc
                * mpmath.fsum(
                    mpmath.mpf(float(x)) * mpmath.mpf(float(y)) for x, y in zip(q[b, i, h], k[b, j, kv], strict=True)
                )
                + mpmath.mpf(float(bb[b, h, i, j]))
                for j in js
            }
            mx = max(s.values())
            w = {j: mpmath.exp(s[j] - mx) for j in js}
            tot = mpmath.fsum(w.values())
            lse[b, h, i] = to_f64(mx + mpmath.log(tot))
            for c in range(dv):
                out[b, i, h, c] = to_f64(mpmath.fsum(w[j] * mpmath.mpf(float(v[b, j, kv, c])) for j in js) / tot)
    return out, lse


@pytest.mark.parametrize("dk", [3, 4, 5])
def test_forward_matches_naive_mpmath(dk, rng):
    b, lq, lk, hq, hkv, dv = 2, 4, 5, 4, 2, 3
    q, k, v = randn(rng, (b, lq, hq, dk), BF16), randn(rng, (b, lk, hkv, dk), BF16), randn(rng, (b, lk, hkv, dv), BF16)
    mask = rng.random((b, 1, lq, lk)) < 0.75
    mask[1, 0, 2] = False
    bias = randn(rng, (hq, 1, lk), np.float16)
    for kw in ({}, {"mask": mask, "bias": bias}, {"causal": True, "mask": mask}, {"scale": 0.3, "bias": bias}):
        res = mp.attention(q, k, v, **kw)
        out, lse = naive_mp_forward(q, k, v, **kw)
        assert ulp_distance(res.out, out).max() < 1, kw
        assert ulp_distance(res.lse, lse).max() < 1, kw
