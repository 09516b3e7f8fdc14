"""oracles.naive, modern options: float64 against mp, the logit-error bound, the same-dtype emulation.

Errors are componentwise against the same formula on absolute values (as in tests/test_naive.py),
extended to the new terms: the sink's weight, the softcap's ``sech^2`` and the ``g_lse`` cotangent.
"""

from __future__ import annotations

import ml_dtypes
import mpmath
import numpy as np
import pytest

from oracles import mp, naive, spec
from tests.test_naive import rel_err

BF16 = ml_dtypes.bfloat16
U64 = 2.0**-53
U32 = 2.0**-24
GRADS = ("dq", "dk", "dv", "dbias", "dsinks")


# ----------------------------------------------------------------------------------------- helpers


def case(seed: int, *, b=1, lq=5, lk=7, hq=2, hkv=1, dk=4, dv=3, dtype="fp32", spread=1.0, **kw) -> dict:
    """Random inputs and call keywords (``kw`` passed through); ``g_lse`` always drawn."""
    r = np.random.default_rng(seed)
    dt = spec.as_dtype(dtype)
    return {
        "q": (spread * r.standard_normal((b, lq, hq, dk))).astype(dt),
        "k": r.standard_normal((b, lk, hkv, dk)).astype(dt),
        "v": r.standard_normal((b, lk, hkv, dv)).astype(dt),
        "g": r.standard_normal((b, lq, hq, dv)).astype(dt),
        "g_lse": r.standard_normal((b, hq, lq)).astype(dt),
        "kw": kw,
    }


def combined(seed: int) -> dict:
    """Every option drawn at random, moderate sizes, logits of moderate size (float64 stays reliable)."""
    r = np.random.default_rng(9000 + seed)
    dtype = ["fp32", "bf16", "fp16", "fp64"][seed % 4]
    b, lq, lk, hkv = int(r.integers(1, 3)), int(r.integers(1, 10)), int(r.integers(1, 10)), int(r.integers(1, 3))
    hq = hkv * int(r.integers(1, 3))
    side = lambda: None if r.random() < 0.3 else int(r.integers(0, 5))  # noqa: E731
    kw = {
        "align": str(r.choice(["top-left", "bottom-right"])),
        "causal": bool(r.random() < 0.5),
        "window": None if r.random() < 0.4 else (side(), side()),
        "softcap": None if r.random() < 0.3 else float(r.choice([0.75, 3.0, 20.0])),
        "masked_rows": str(r.choice(["zeros", "nan", "uniform"])),
    }
    dt = spec.as_dtype(dtype)
    if r.random() < 0.7:
        kw["alibi_slopes"] = (r.uniform(0, 1.5, (hq,) if r.random() < 0.5 else (b, hq))).astype(dt)
    if r.random() < 0.7:
        sinks = (2 * r.standard_normal(hq)).astype(dt)
        sinks[r.random(hq) < 0.2] = -np.inf
        sinks[r.random(hq) < 0.1] = np.inf
        kw["sinks"] = sinks
    if r.random() < 0.5:
        kw["q_segment_ids"] = np.sort(r.integers(0, 3, (b, lq)), axis=1)
        kw["kv_segment_ids"] = np.sort(r.integers(0, 3, (b, lk)), axis=1)
    if r.random() < 0.5:
        kw["mask"] = r.random((b, 1, lq, lk)) < 0.8
    if r.random() < 0.7:
        kw["bias"] = r.standard_normal([(b, hq, lq, lk), (hq, lq, lk), (1, 1, lk)][int(r.integers(0, 3))]).astype(dt)
    return case(int(r.integers(1 << 30)), b=b, lq=lq, lk=lk, hq=hq, hkv=hkv, dk=int(r.integers(1, 9)),
                dv=int(r.integers(1, 5)), dtype=dtype, spread=float(r.choice([1.0, 2.0])), **kw)


def args(c: dict) -> tuple:
    return c["q"], c["k"], c["v"]


def abs_scales(c: dict, ref: mp.Grads) -> dict:
    """Every output's and gradient's absolute-value scale, from the oracle's probabilities."""
    att = spec.normalize(*args(c), **c["kw"])
    hkv = att.k.shape[2]
    q, k, v, g = (np.abs(spec.to_heads_first(x.astype(np.float64))) for x in (c["q"], c["k"], c["v"], c["g"]))
    k, v = k[:, att.kv_head], v[:, att.kv_head]
    gl = np.abs(c["g_lse"].astype(np.float64))[..., None]
    p = ref.p
    sc = abs(att.scale_float())

    def group(x):
        bb, hq = x.shape[:2]
        return spec.to_seq_first(x.reshape((bb, hkv, hq // hkv) + x.shape[2:]).sum(axis=2))

    dpa = g @ np.swapaxes(v, -1, -2)
    delta = (p * dpa).sum(-1, keepdims=True)
    dsa = p * (dpa + delta + gl)
    dta = dsa
    if att.softcap is not None:
        t = att.scale_float() * (spec.to_heads_first(att.q.astype(np.float64))
                                 @ np.swapaxes(spec.to_heads_first(att.k.astype(np.float64))[:, att.kv_head], -1, -2))
        with np.errstate(over="ignore"):
            dta = dsa / np.cosh(t / att.softcap) ** 2
    out = {
        "out": mp.attention(c["q"], c["k"], np.abs(c["v"]), **c["kw"]).out,
        "dv": group(np.swapaxes(p, -1, -2) @ g),
        "dq": spec.to_seq_first(sc * dta @ k),
        "dk": group(sc * np.swapaxes(dta, -1, -2) @ q),
        "dbias": None if att.bias_shape is None else spec.reduce_to_shape(dsa, att.bias_shape),
        "dsinks": None if att.sinks is None else (ref.p_sink * (gl + delta)[..., 0]).sum(axis=(0, 2)),
    }
    if att.masked_rows == "uniform" and att.masked_row.any():
        gm = np.where(att.masked_row[..., None], g, 0.0).sum(axis=2, keepdims=True) / att.k.shape[1]
        out["dv"] = out["dv"] + group(np.broadcast_to(gm, p.shape[:2] + (att.k.shape[1], g.shape[-1])))
    return out


def errors(c: dict, got, ref: mp.Grads) -> dict:
    sc = abs_scales(c, ref)
    errs = {"out": rel_err(got.out, ref.out, sc["out"])}
    for n in GRADS:
        if getattr(ref, n) is not None:
            errs[n] = rel_err(getattr(got, n), getattr(ref, n), sc[n])
    return errs


def oracle(c: dict) -> mp.Grads:
    return mp.attention_vjp(*args(c), c["g"], g_lse=c["g_lse"], probs=True, **c["kw"])


def emulated(c: dict, **opts) -> naive.Grads:
    return naive.attention_vjp(*args(c), c["g"], g_lse=c["g_lse"], **c["kw"], **opts)


def exact_logits(att: spec.Attention) -> np.ndarray:
    """Object array [B, Hq, Lq, Lk] of the exact logits (mpf at 400 bits; None where invisible)."""
    b, hq, lq, lk = att.visible.shape
    out = np.full((b, hq, lq, lk), None, dtype=object)
    with mpmath.workprec(400):
        sc = 1 / mpmath.sqrt(att.q.shape[-1]) if att.scale is None else mpmath.mpf(att.scale)
        for bb, h, i, j in zip(*np.nonzero(att.visible), strict=True):
            kv = att.kv_head[h]
            s = sc * mpmath.fsum(mpmath.mpf(float(x)) * mpmath.mpf(float(y))
                                 for x, y in zip(att.q[bb, i, h], att.k[bb, j, kv], strict=True))
            if att.softcap is not None:
                s = mpmath.mpf(att.softcap) * mpmath.tanh(s / mpmath.mpf(att.softcap))
            if att.bias is not None:
                s += mpmath.mpf(float(att.bias[bb, h, i, j]))
            if att.alibi_slopes is not None:
                s -= mpmath.mpf(float(att.alibi_slopes[bb, h])) * int(att.distance[i, j])
            out[bb, h, i, j] = s
    return out


def computed_logits(c: dict, dtype=None, accumulate="fp32", round_logits=True) -> tuple[np.ndarray, spec.Attention]:
    """The logits exactly as naive computes them (its internal stage, white box)."""
    att = spec.normalize(*args(c), **c["kw"])
    ar = naive._arith(dtype, accumulate, round_logits, True)
    q = ar.rnd(naive._heads_first(att.q), ar.dt)
    k = ar.rnd(naive._heads_first(att.k), ar.dt)[:, att.kv_head]
    lg, _ = naive._logits(att, ar, q, k, att.scale_float())
    return lg.s, att


def logit_errors(c: dict, **opts) -> np.ndarray:
    """Per row, max over visible keys of |computed - exact| (exactly, in mpmath), as float64."""
    s, att = computed_logits(c, **opts)
    ex = exact_logits(att)
    err = np.zeros(att.visible.shape[:3])
    with mpmath.workprec(400):
        for bb, h, i, j in zip(*np.nonzero(att.visible), strict=True):
            err[bb, h, i] = max(err[bb, h, i], float(abs(mpmath.mpf(float(s[bb, h, i, j])) - ex[bb, h, i, j])))
    return err


# ------------------------------------------------------------------------ float64 against the oracle


@pytest.mark.parametrize("seed", range(12))
def test_float64_matches_mp_combined(seed):
    """Forward within 1e-13 A, lse within 1e-13 (1 + |lse|), every gradient (dsinks too) within 1e-12."""
    c = combined(seed)
    ref = oracle(c)
    got = emulated(c)
    fwd = naive.attention(*args(c), **c["kw"])
    np.testing.assert_array_equal(fwd.out, got.out)
    errs = errors(c, got, ref)
    assert errs["out"] <= 1e-13, (errs, c["kw"])
    assert max(v for n, v in errs.items() if n != "out") <= 1e-12, (errs, c["kw"])
    fin = np.isfinite(ref.lse)
    np.testing.assert_array_equal(np.isnan(got.lse), np.isnan(ref.lse))
    np.testing.assert_array_equal(got.lse[~fin & ~np.isnan(ref.lse)], ref.lse[~fin & ~np.isnan(ref.lse)])
    assert (np.abs(got.lse[fin] - ref.lse[fin]) <= 1e-13 * (1 + np.abs(ref.lse[fin]))).all()
    assert fwd.reliable.all() and got.reliable.all()
    assert (got.dsinks is None) == (c["kw"].get("sinks") is None)


def test_combined_cases_cover_every_option():
    seen = set()
    for seed in range(12):
        kw = combined(seed)["kw"]
        seen |= {n for n, x in kw.items() if not (x is None or x is False or isinstance(x, str) and
                                                 x in ("top-left", "zeros"))}
        if kw.get("sinks") is not None:
            seen |= {"sink=-inf"} if (kw["sinks"] == -np.inf).any() else set()
            seen |= {"sink=+inf"} if (kw["sinks"] == np.inf).any() else set()
    assert seen >= {"align", "causal", "window", "softcap", "alibi_slopes", "sinks", "q_segment_ids", "mask",
                    "bias", "masked_rows", "sink=-inf", "sink=+inf"}, seen


# ---------------------------------------------------------------------- closed forms and equalities


OPTS = [{}, {"dtype": "bf16"}, {"dtype": "fp16", "accumulate": "input"}, {"dtype": "bf16", "round_logits": False}]


def _same(a, b, fields=("out", "lse") + GRADS[:-1]):
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if x is None or y is None:
            assert x is None and y is None, f
        else:
            np.testing.assert_array_equal(x, y, err_msg=f)


@pytest.mark.parametrize("opts", OPTS)
def test_sink_of_minus_inf_is_no_sink(opts):
    c = case(1, b=2, lq=4, lk=6, hq=4, hkv=2, bias=np.random.default_rng(0).standard_normal((4, 4, 6)),
             softcap=4.0, alibi_slopes=np.array([0.5, 0.25, 0.125, 1.0]))
    mask = np.random.default_rng(1).random((2, 4, 4, 6)) < 0.7
    mask[1, 2, 0] = False
    c["kw"]["mask"] = mask
    none = emulated(c, **opts)
    c["kw"]["sinks"] = np.full(4, -np.inf)
    ninf = emulated(c, **opts)
    _same(none, ninf)
    assert none.dsinks is None and (ninf.dsinks == 0).all()


@pytest.mark.parametrize("opts", OPTS)
def test_sink_of_plus_inf_and_empty_rows_with_a_sink(opts):
    bias = np.zeros((3, 4, 5))
    bias[0, :, 1] = 1000.0  # exp(1000) overflows: the +inf sink's rows must not divide inf by inf
    c = case(2, lq=4, lk=5, hq=3, hkv=3, sinks=np.array([np.inf, 1.3, -0.7]), softcap=2.0, bias=bias)
    mask = np.ones((4, 5), dtype=bool)
    mask[2] = False
    c["kw"]["mask"] = mask
    res = emulated(c, **opts)
    dt = opts.get("dtype") or "fp64"
    acc = dt if opts.get("accumulate") == "input" else ("fp32" if dt != "fp64" else dt)
    assert (res.out[:, :, 0] == 0).all() and (res.lse[:, 0] == np.inf).all()
    for x in (res.dq[:, :, 0], res.dk[:, :, 0], res.dv[:, :, 0]):
        assert (x == 0).all()
    # Head 0: p_sink = 1, delta = 0, so dsinks is the sum of g_lse (in the accumulate dtype).
    gl0 = naive.round_to_dtype(c["g_lse"][0, 0].astype(np.float64), acc)
    assert abs(res.dsinks[0] - gl0.sum()) <= 4 * spec.unit_roundoff(dt) * np.abs(gl0).sum()
    # Row 2 sees no key: out 0, lse = the sink as rounded to the accumulate dtype; it is not a masked row.
    assert (res.out[0, 2] == 0).all()
    np.testing.assert_array_equal(res.lse[0, 1:, 2], naive.round_to_dtype(np.array([1.3, -0.7]), acc))
    assert (res.dq[0, 2] == 0).all() and (res.dbias[:, 2] == 0).all()
    assert res.reliable[0, 0].all()  # a +inf sink's rows are exact
    assert np.isfinite(res.dsinks).all()


@pytest.mark.parametrize("opts", OPTS)
def test_equalities_that_must_hold_bitwise(opts):
    """Zero ALiBi slope = none; one segment = none; bottom-right = top-left when square; window past Lk = open."""
    r = np.random.default_rng(3)
    c = case(3, b=2, lq=5, lk=5, hq=2, hkv=1, causal=True, softcap=3.0, sinks=np.array([0.25, -1.0]),
             bias=r.standard_normal((2, 5, 5)))
    base = emulated(c, **opts)
    variants = [
        {"alibi_slopes": np.zeros(2)},
        {"q_segment_ids": np.full((2, 5), 7), "kv_segment_ids": np.full((2, 5), 7)},
        {"align": "bottom-right"},
        {"window": (None, 9)},
        {"window": (5, 0), "causal": False},
    ]
    for extra in variants:
        _same(base, emulated(dict(c, kw=dict(c["kw"], **extra)), **opts), ("out", "lse") + GRADS)


@pytest.mark.parametrize("opts", OPTS)
def test_diagonal_window_decode_and_lq_greater_than_lk(opts):
    c = case(4, b=1, lq=6, lk=6, hq=2, hkv=1, window=(0, 0))
    res = emulated(c, **opts)
    dt = opts.get("dtype") or "fp64"
    np.testing.assert_array_equal(res.out, naive.round_to_dtype(np.repeat(c["v"], 2, axis=2).astype(np.float64), dt))
    # Single-token segments are the same diagonal.
    ids = np.arange(6)[None]
    single = emulated(dict(c, kw={"q_segment_ids": ids, "kv_segment_ids": ids}), **opts)
    _same(res, single)
    # Decode: one query, bottom-right causal, sees every key.
    d = case(5, b=2, lq=1, lk=7, hq=2, hkv=2)
    _same(emulated(dict(d, kw={"causal": True, "align": "bottom-right"}), **opts), emulated(d, **opts))
    # Lq > Lk: the first Lq - Lk rows are masked rows.
    e = case(6, lq=7, lk=3, causal=True, align="bottom-right")
    res = emulated(e, **opts)
    assert (res.out[:, :4] == 0).all() and (res.lse[..., :4] == -np.inf).all() and (res.dq[:, :4] == 0).all()
    assert np.isfinite(res.lse[..., 4:]).all()


def test_softcap_huge_c_and_small_logits():
    """A cap of 1e30 is no cap within the tanh evaluation error; small logits are nearly unchanged."""
    c = case(7, lq=5, lk=6, dtype="fp64")
    plain = naive.attention(*args(c))
    huge = naive.attention(*args(c), softcap=1e30)
    a = mp.attention(c["q"], c["k"], np.abs(c["v"])).out
    bound = 2 * (2 * U64 + naive.U_TANH) * np.abs(huge.lse).max() * 4 + 8 * U64  # logit moves, in units of A
    assert (np.abs(huge.out - plain.out) <= bound * a).all()
    assert huge.reliable.all()
    small = dict(c, q=c["q"] * 0.01)
    t_max = np.abs(np.einsum("bqhd,bkhd->bhqk", small["q"], np.repeat(c["k"], 2, axis=2))).max() / 2
    moved = np.abs(naive.attention(*args(small), softcap=1.0).out - naive.attention(*args(small)).out)
    assert 0 < moved.max() and (moved <= (2 * t_max**3 / 3 * 1.01 + 1e-15) * mp.attention(
        small["q"], small["k"], np.abs(c["v"])).out).all()


def test_alibi_equals_an_explicit_bias():
    c = case(8, b=2, lq=4, lk=6, hq=2, hkv=1, dtype="fp64")
    slopes = np.array([[0.375, 1.5], [0.0, 2.0**-7]])
    bias = np.random.default_rng(8).standard_normal((2, 4, 6))
    for align in ("top-left", "bottom-right"):
        off = 0 if align == "top-left" else 2
        dist = np.abs(np.arange(4)[:, None] + off - np.arange(6)[None, :])
        explicit = bias[None] - slopes[:, :, None, None] * dist  # exact: few-bit slopes, small distances
        a = naive.attention_vjp(*args(c), c["g"], alibi_slopes=slopes, bias=bias, align=align, causal=True)
        e = naive.attention_vjp(*args(c), c["g"], bias=explicit, align=align, causal=True)
        for f in ("out", "lse", "dq", "dk", "dv"):
            np.testing.assert_allclose(getattr(a, f), getattr(e, f), rtol=1e-15, atol=1e-15, err_msg=f)


# --------------------------------------------------------------- the logit-error bound is sound


BOUND_CASES = {
    "fp64-softcap-alibi-bias": ({"dtype": "fp64", "spread": 3.0},
                                {"softcap": 5.0, "alibi_slopes": np.array([0.3, 1.7]), "bias": "rand",
                                 "sinks": np.array([0.1, 0.2])}, {}),
    "fp64-large-alibi": ({"dtype": "fp64"}, {"alibi_slopes": np.array([1e6, 3.3e4]), "bias": "rand"}, {}),
    "bf16": ({"dtype": "fp32", "spread": 2.0},
             {"softcap": 5.0, "alibi_slopes": np.array([0.3, 1.7], np.float32), "bias": "rand"}, {"dtype": "bf16"}),
    "bf16-input": ({"dtype": "fp32", "spread": 2.0},
                   {"softcap": 5.0, "alibi_slopes": np.array([0.3, 1.7], np.float32), "bias": "rand"},
                   {"dtype": "bf16", "accumulate": "input"}),
    "bf16-fp32-logits": ({"dtype": "fp32", "spread": 2.0},
                         {"softcap": 5.0, "alibi_slopes": np.array([0.3, 1.7], np.float32), "bias": "rand"},
                         {"dtype": "bf16", "round_logits": False}),
    "fp16-alibi-far": ({"dtype": "fp16", "lk": 40},
                       {"alibi_slopes": np.array([0.3, 3.1], np.float16), "align": "bottom-right"},
                       {"dtype": "fp16", "accumulate": "input"}),
    "fp32": ({"dtype": "fp32", "spread": 2.0},
             {"softcap": 5.0, "alibi_slopes": np.array([0.3, 1.7]), "bias": "rand"}, {"dtype": "fp32"}),
}


@pytest.mark.parametrize("name", list(BOUND_CASES))
def test_logit_error_bounds_the_computed_logits(name):
    """The actual error of every computed logit (measured exactly) is within the row's bound, and the
    bound is not loose by more than a factor 16 (in emulation) or 64 (float64)."""
    shape, kw, opts = BOUND_CASES[name]
    shape = dict({"lq": 6, "lk": 8, "hq": 2, "hkv": 1, "dk": 8}, **shape)
    if kw.get("bias") == "rand":
        kw = dict(kw, bias=np.random.default_rng(11).standard_normal((2, shape["lq"], shape["lk"])).astype(
            spec.as_dtype(shape["dtype"])))
    c = case(10, **shape, **kw)
    err = logit_errors(c, **{n: o for n, o in opts.items() if n != "dtype"}, dtype=opts.get("dtype"))
    bound = naive.attention(*args(c), **c["kw"], **opts).logit_error
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() >= bound.max() / (64 if opts.get("dtype") in (None, "fp64") else 16), (err.max(), bound.max())


@pytest.mark.parametrize("dtype,accumulate", [("bf16", "fp32"), ("fp16", "input"), ("fp32", "fp32")])
def test_logit_error_counts_the_sink_rounding(dtype, accumulate):
    """A float64 sink is rounded to the accumulate dtype: an empty row's lse is that rounded sink, and the
    bound covers (and here equals) the rounding."""
    c = case(12, lq=3, lk=4, dtype="fp64", mask=np.array([[True] * 4, [False] * 4, [True] * 4]),
             sinks=np.array([0.1, -3.3]))
    res = naive.attention(*args(c), **c["kw"], dtype=dtype, accumulate=accumulate)
    acc = "fp32" if accumulate == "fp32" else dtype
    err = np.abs(res.lse[0, :, 1] - np.array([0.1, -3.3]))
    assert (err > 0).all()
    np.testing.assert_array_equal(res.logit_error[0, :, 1], err)
    np.testing.assert_array_equal(res.lse[0, :, 1], naive.round_to_dtype(np.array([0.1, -3.3]), acc))
    assert (res.logit_error[0, :, [0, 2]] >= err).all()


@pytest.mark.parametrize("offset", [1e3, 1e9, 1e13])
def test_softcap_offset_error_and_reliable(offset):
    """Capped logits near c = 10 * offset keep their O(1) differences: float64 loses ~u * offset of them,
    the output error stays within (expm1(2E) + slack) A, and only rows with a small bound are reliable."""
    r = np.random.default_rng(13)
    dk, lq, lk = 4, 3, 5
    q, k = np.empty((1, lq, 1, dk)), np.empty((1, lk, 1, dk))
    q[..., 0], k[..., 0] = np.sqrt(offset), np.sqrt(offset)
    q[..., 1:], k[..., 1:] = r.standard_normal((1, lq, 1, dk - 1)), r.standard_normal((1, lk, 1, dk - 1))
    v = np.eye(lk).reshape(1, lk, 1, lk)
    kw = {"scale": 1.0, "softcap": 10 * offset, "sinks": np.array([offset * np.tanh(0.1) * 10 + 0.5])}
    ref = mp.attention(q, k, v, **kw)
    res = naive.attention(q, k, v, **kw)
    a = mp.attention(q, k, np.abs(v), **kw).out
    err = np.abs(res.out - ref.out) / np.where(a > 0, a, 1)
    allowed = np.expm1(2 * np.swapaxes(res.logit_error, 1, 2)[..., None]) + 8 * (lk + 10) * U64
    assert (err <= allowed).all(), (err.max(), res.logit_error)
    rel = np.broadcast_to(np.swapaxes(res.reliable, 1, 2)[..., None], err.shape)
    assert (err[rel] <= 1e-10).all()
    assert res.reliable.all() == (offset < 1e5)


# ------------------------------------------------------------------------------ same-dtype emulation


def test_fp32_emulation_matches_a_hand_computation():
    """Plain float32 numpy, written the way a framework graph computes, for every option at once."""
    c = case(14, b=2, lq=6, lk=7, hq=4, hkv=2, dk=8, dv=3, dtype="fp32", spread=2.0)
    r = np.random.default_rng(14)
    bias = r.standard_normal((4, 6, 7)).astype(np.float32)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    sinks = r.standard_normal(4).astype(np.float32)
    seg = np.array([[0, 0, 0, 1, 1, 1, 1]] * 2)
    kw = {"bias": bias, "softcap": 3.0, "alibi_slopes": slopes, "sinks": sinks, "window": (3, 1),
          "align": "bottom-right", "q_segment_ids": seg[:, 1:], "kv_segment_ids": seg}
    res = naive.attention_vjp(c["q"], c["k"], c["v"], c["g"], g_lse=c["g_lse"], dtype="fp32", **kw)

    f = np.float32
    hq = spec.to_heads_first
    kvh = np.array([0, 0, 1, 1])
    q, k, v, g = hq(c["q"]), hq(c["k"])[:, kvh], hq(c["v"])[:, kvh], hq(c["g"])
    scale = f(1 / np.sqrt(8))
    t = (q @ np.swapaxes(k, -1, -2)) * scale
    th = np.tanh(t / f(3.0))
    s = th * f(3.0) + bias
    i, j = np.arange(6)[:, None], np.arange(7)[None, :]
    d = i + 1 - j
    s = s - slopes[:, None, None] * np.abs(d).astype(f)
    vis = (d <= 3) & (d >= -1) & (seg[:, 1:, None] == seg[:, None, :])[:, None]
    s = np.where(vis, s, f(-np.inf))
    sig = sinks[None, :, None, None]
    m = np.maximum(s.max(-1, keepdims=True), sig)
    e, es = np.exp(s - m), np.exp(sig - m)
    z = e.sum(-1, keepdims=True) + es
    p, ps = e / z, es / z
    out = p @ v
    lse = (m + np.log(z))[..., 0]
    dp = g @ np.swapaxes(v, -1, -2)
    delta = (dp * p).sum(-1, keepdims=True)
    gl = c["g_lse"][..., None]
    ds = p * (dp - delta) + p * gl
    dq = (ds * (1 - th * th) * scale) @ k
    dsinks = (ps * (gl - delta)).sum(axis=(0, 2, 3))
    assert out.dtype == lse.dtype == dq.dtype == np.float32

    a = (p.astype(np.float64) @ np.abs(v.astype(np.float64)))
    smax = np.abs(np.where(vis, s, 0)).max()
    np.testing.assert_array_less(np.abs(spec.to_seq_first(res.out) - out), (16 + 8 * smax) * U32 * a + 1e-30)
    assert np.abs(res.lse - lse).max() <= 8 * U32 * (1 + np.abs(lse).max())
    dq_scale = np.abs(ds.astype(np.float64)) @ np.abs(k.astype(np.float64)) * float(scale)
    np.testing.assert_array_less(np.abs(spec.to_seq_first(res.dq) - dq), 64 * (1 + smax) * U32 * (dq_scale + 1e-30))
    assert np.abs(res.dsinks - dsinks).max() <= 64 * U32 * np.abs(ps * (np.abs(gl) + np.abs(delta))).sum()


def test_bf16_softcap_logits_are_rounded_where_the_docstring_says():
    """bf16 logits: t = rnd(rnd(q k^T) * scale), rnd(t / c), rnd(tanh), rnd(* c), rnd(+ bias),
    ALiBi rnd32(-(slope32 * d)), rnd(+ alibi); then the fp32 softmax with the fp32 sink, P rounded to bf16."""
    c = case(15, lq=5, lk=6, hq=2, hkv=1, dk=8, dv=4, dtype="fp32", spread=3.0)
    r = np.random.default_rng(15)
    bias = r.standard_normal((2, 5, 6)).astype(np.float32)
    slopes = np.array([0.3, 0.7], np.float64)  # not fp32-exact: rounded to the accumulate dtype
    sinks = np.array([0.4, -0.6], np.float64)
    kw = {"bias": bias, "softcap": 2.7, "alibi_slopes": slopes, "sinks": sinks}
    res = naive.attention(*args(c), dtype="bf16", **kw)

    def b(x):
        return naive.round_to_dtype(x, "bf16")

    def f32(x):
        return naive.round_to_dtype(x, "fp32")

    q, k, v = (b(spec.to_heads_first(x.astype(np.float64))) for x in args(c))
    k, v = k[:, [0, 0]], v[:, [0, 0]]
    qk = (q.astype(np.float32) @ np.swapaxes(k, -1, -2).astype(np.float32)).astype(np.float64)
    t = b(b(qk) * (1 / np.sqrt(8)))
    x = b(t / 2.7)
    th = b(np.tanh(x))
    capped = b(th * 2.7)
    sb = b(capped + b(bias.astype(np.float64)))
    dist = np.abs(np.arange(5)[:, None] - np.arange(6)[None, :]).astype(np.float64)
    alibi = f32(-(f32(slopes)[None, :, None, None] * dist))
    s = b(sb + alibi)
    # Each stage is a bf16 value, and none is the unrounded float64 result (the roundings happen).
    for stage in (t, x, th, capped, sb, s):
        np.testing.assert_array_equal(b(stage), stage)
    assert (th != np.tanh(x)).any() and (capped != th * 2.7).any() and (s != sb + alibi).any()
    sig = f32(sinks)[None, :, None, None]
    m = np.maximum(s.max(-1, keepdims=True), sig)
    e = f32(np.exp(f32(s - m)))
    z = e.astype(np.float32).sum(-1, keepdims=True, dtype=np.float32).astype(np.float64)
    z = f32(z + f32(np.exp(f32(sig - m))))
    p = b(f32(e / z))
    out = b((p.astype(np.float32) @ v.astype(np.float32)).astype(np.float64))
    np.testing.assert_array_equal(res.out, spec.to_seq_first(out))
    lg, _ = computed_logits(dict(c, kw=kw), dtype="bf16")
    np.testing.assert_array_equal(lg, s)


@pytest.mark.parametrize("accumulate", ["fp32", "input"])
def test_slopes_and_sinks_rounded_to_the_accumulate_dtype(accumulate):
    """float64 slopes and sinks: ALiBi is -(rnd(slope) * d) rounded, the sink enters as rnd(sigma) (white box)."""
    dtype = "fp32" if accumulate == "fp32" else "bf16"
    c = case(20, lq=4, lk=9, hq=2, hkv=1, dtype="fp32", align="bottom-right",
             alibi_slopes=np.array([0.3, 0.7]), sinks=np.array([3.1, 2.7]))  # the sinks are the row maxima
    rnd = lambda x: naive.round_to_dtype(x, "fp32" if accumulate == "fp32" else dtype)  # noqa: E731
    att = spec.normalize(*args(c), **c["kw"])
    ar = naive._arith(dtype, accumulate, True, True)
    f = naive._forward(att, ar)
    lg, _ = naive._logits(att, ar, f.q, f.k, att.scale_float())
    alibi = rnd(-(rnd(np.array([0.3, 0.7]))[None, :, None, None] * att.distance))
    np.testing.assert_array_equal(lg.alibi, alibi)
    assert (alibi != rnd(-(np.array([0.3, 0.7])[None, :, None, None] * att.distance))).any()  # not rnd(0.3 d)
    s = naive.round_to_dtype(lg.after_bias + alibi, dtype)
    np.testing.assert_array_equal(lg.s, s)
    sig = rnd(np.array([3.1, 2.7]))[None, :, None, None]
    m = np.maximum(s.max(-1, keepdims=True), sig)
    e_sink = rnd(np.exp(rnd(sig - m)))
    total = rnd(ar.sum(rnd(np.exp(rnd(s - m)))) + e_sink)
    np.testing.assert_array_equal(f.p_sink, rnd(e_sink / total))
    np.testing.assert_array_equal(f.lse, rnd(m[..., 0] + rnd(np.log(total[..., 0]))))
    assert (m == sig).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_emulation_error_is_physical_modern(dtype):
    """Emulated outputs: error above float64's, within (expm1(2E) + 4u + 3 gamma_{Lk+5}(u32)) A (E its own bound)."""
    r = np.random.default_rng(16)
    c = case(16, b=2, lq=6, lk=24, hq=2, hkv=1, dk=16, dv=8, dtype="fp32", softcap=4.0, align="bottom-right",
             window=(12, 3), alibi_slopes=np.array([0.05, 0.2], np.float32), sinks=np.array([0.5, 1.5], np.float32),
             bias=r.standard_normal((2, 6, 24)).astype(np.float32))
    ref = mp.attention(*args(c), **c["kw"])
    a = mp.attention(c["q"], c["k"], np.abs(c["v"]), **c["kw"]).out
    res = naive.attention(*args(c), **c["kw"], dtype=dtype)
    f64 = naive.attention(*args(c), **c["kw"])
    err = np.abs(res.out - ref.out) / a
    e = np.expm1(2 * np.swapaxes(res.logit_error, 1, 2)[..., None])
    lk = 24
    bound = e + 4 * spec.unit_roundoff(dtype) + 3 * (lk + 5) * U32 / (1 - (lk + 5) * U32)
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > max((np.abs(f64.out - ref.out) / a).max(), spec.unit_roundoff(dtype) / 8)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_emulated_gradients_error_is_physical_modern(dtype):
    """Emulated gradients incl. dsinks, with softcap and g_lse: within (2 expm1(2 E_max) + 12u) of the
    absolute-value scale (P enters dS twice; 12u: P, dP, dS, the lse branch, the softcap's three steps,
    dS * scale and the result, fp32 accumulation in between)."""
    c = case(17, lq=6, lk=10, hq=2, hkv=1, dk=8, dv=6, dtype=dtype, causal=True, softcap=3.0,
             sinks=np.array([0.3, -0.2], spec.as_dtype(dtype)),
             alibi_slopes=np.array([0.5, 0.125], spec.as_dtype(dtype)),
             bias=np.random.default_rng(17).standard_normal((2, 6, 10)).astype(spec.as_dtype(dtype)))
    ref = oracle(c)
    f64 = errors(c, emulated(c), ref)
    res = emulated(c, dtype=dtype)
    emu = errors(c, res, ref)
    allowed = 2 * np.expm1(2 * res.logit_error.max()) + 12 * spec.unit_roundoff(dtype)
    for name in emu:
        assert f64[name] < emu[name] <= allowed, (name, emu[name], allowed)
    for name in ("dq", "dk", "dv", "dbias", "dsinks"):
        x = getattr(res, name)
        np.testing.assert_array_equal(naive.round_to_dtype(x, dtype), x, err_msg=name)


# ----------------------------------------------------------------------------------- invariances


def test_key_permutation_invariance():
    c = case(18, b=2, lq=5, lk=7, hq=2, hkv=1, dtype="fp64", softcap=2.0, sinks=np.array([0.5, -np.inf]),
             masked_rows="nan")
    r = np.random.default_rng(18)
    mask = r.random((2, 1, 5, 7)) < 0.8
    mask[1, 0, 3] = False  # empty: out 0 for head 0 (sink), NaN for head 1 (masked row)
    bias = r.standard_normal((1, 2, 5, 7))
    qseg, kvseg = r.integers(0, 2, (2, 5)), r.integers(0, 2, (2, 7))
    perm = r.permutation(7)
    kw = dict(c["kw"], mask=mask, bias=bias, q_segment_ids=qseg, kv_segment_ids=kvseg)
    kwp = dict(c["kw"], mask=mask[..., perm], bias=bias[..., perm], q_segment_ids=qseg, kv_segment_ids=kvseg[:, perm])
    r0 = naive.attention_vjp(*args(c), c["g"], g_lse=c["g_lse"], **kw)
    r1 = naive.attention_vjp(c["q"], c["k"][:, perm], c["v"][:, perm], c["g"], g_lse=c["g_lse"], **kwp)
    ref = oracle(dict(c, kw=kw))
    sc = abs_scales(dict(c, kw=kw), ref)
    for f, x1, x0 in (("out", r1.out, r0.out), ("dq", r1.dq, r0.dq), ("dsinks", r1.dsinks, r0.dsinks),
                      ("dk", r1.dk, r0.dk[:, perm]), ("dv", r1.dv, r0.dv[:, perm]),
                      ("dbias", r1.dbias, r0.dbias[..., perm])):
        s = sc[f][:, perm] if f in ("dk", "dv") else (sc[f][..., perm] if f == "dbias" else sc[f])
        assert rel_err(x1, x0, s) <= 1e-14, f
    np.testing.assert_allclose(r1.lse, r0.lse, rtol=1e-15)
    assert np.isnan(r0.dsinks).any() and np.isnan(r0.out).any()  # the masked row's NaNs travel too


def test_common_shift_of_logits_and_sinks():
    """Adding c to every logit (through bias, after the softcap) and to every sink leaves out unchanged
    (to within the logit error bounds) and moves lse by c."""
    c = case(19, b=2, lq=4, lk=6, hq=2, hkv=1, dtype="fp64", softcap=2.0, alibi_slopes=np.array([0.25, 0.5]),
             window=(3, 1))
    r = np.random.default_rng(19)
    bias = r.integers(-4096, 4096, (2, 2, 4, 6)) * 2.0**-10
    sinks = np.array([0.75, -1.5])
    shift = 8.0
    r0 = naive.attention_vjp(*args(c), c["g"], bias=bias, sinks=sinks, **c["kw"])
    r1 = naive.attention_vjp(*args(c), c["g"], bias=bias + shift, sinks=sinks + shift, **c["kw"])
    a = mp.attention(c["q"], c["k"], np.abs(c["v"]), bias=bias, sinks=sinks, **c["kw"]).out
    e = np.swapaxes(r0.logit_error + r1.logit_error, 1, 2)[..., None]
    assert (np.abs(r1.out - r0.out) <= (2 * e + 1e-15) * a).all()
    assert np.abs(r1.lse - shift - r0.lse).max() <= 1e-14


# ------------------------------------------------------------------------ cross-check with PyTorch


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_emulation_matches_torch_cpu_modern(dtype):
    """The default emulation with softcap, bias, ALiBi (fp32), sinks (gpt-oss: a concatenated logit
    column, dropped after the softmax) and an lse cotangent is plain PyTorch on CPU and its autograd,
    bit for bit but for reduction order and the fp32 ALiBi addition's double rounding (>= 98% of
    elements identical, the rest within 4 u of the largest); lse (fp32) within a few fp32 ulps."""
    torch = pytest.importorskip("torch")
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    c = case(21, lq=8, lk=24, hq=2, hkv=2, dk=16, dv=8, dtype=dtype, spread=2.0)
    r = np.random.default_rng(21)
    dt = spec.as_dtype(dtype)
    bias = r.standard_normal((2, 8, 24)).astype(dt)
    slopes = np.array([0.25, 0.0625], np.float32)
    sinks = r.standard_normal(2).astype(dt)
    cap = 4.0

    def tensor(x):
        return torch.from_numpy(x.view(np.int16).copy()).view(tdt)

    tq, tk, tv, tg = (tensor(c[n]).transpose(1, 2) for n in ("q", "k", "v", "g"))
    tb, ts = tensor(bias), tensor(sinks)
    for x in (tq, tk, tv, tb, ts):
        x.requires_grad_(True)
    dist = torch.from_numpy(np.abs(np.arange(8)[:, None] - np.arange(24)[None, :]).astype(np.float32))
    alibi = -(torch.from_numpy(slopes)[:, None, None] * dist)
    s = (tq @ tk.transpose(-1, -2)) * float(1 / np.sqrt(16))
    s = torch.tanh(s / cap) * cap
    s = (s + tb).float()
    s = (s + alibi).to(tdt).float()
    full = torch.cat([s, ts.float()[None, :, None, None].expand(1, 2, 8, 1)], dim=-1)
    lse = torch.logsumexp(full, dim=-1)
    p = torch.softmax(full, dim=-1)[..., :-1].to(tdt)
    o = p @ tv
    tgl = torch.from_numpy(c["g_lse"].astype(np.float32))
    grads = torch.autograd.grad((o, lse), (tq, tk, tv, tb, ts), (tg, tgl))
    want = {"out": o.transpose(1, 2), "lse": lse, "dq": grads[0].transpose(1, 2), "dk": grads[1].transpose(1, 2),
            "dv": grads[2].transpose(1, 2), "dbias": grads[3], "dsinks": grads[4]}
    want = {n: t.detach().float().numpy().astype(np.float64) for n, t in want.items()}
    c["g_lse"] = c["g_lse"].astype(np.float32)
    res = naive.attention_vjp(*args(c), c["g"], g_lse=c["g_lse"], bias=bias, softcap=cap, alibi_slopes=slopes,
                              sinks=sinks, dtype=dtype)
    u = spec.unit_roundoff(dtype)
    # lse is fp32 (torch's own exp/log, the sink inside the sum): within a few fp32 ulps.
    assert np.abs(res.lse - want.pop("lse")).max() <= 4 * U32 * (1 + np.abs(res.lse).max())
    for name, w in want.items():
        got = getattr(res, name)
        assert (got == w).mean() >= 0.98, (name, (got == w).mean())  # measured: 100% (torch 2.13 CPU)
        assert np.abs(got - w).max() <= 4 * u * np.abs(w).max(), name
