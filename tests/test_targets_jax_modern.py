"""chunked-jax and jax-dpa on the modern options, through the harness the way campaigns use it.

Every case goes through ``verify.checks.run_case`` (forward, lse and every gradient against the mp
oracle under the harness's error model; a correct kernel gives no finding); where a property is
exact (empty rows, a ``-inf`` sink, key-chunk skipping) it is asserted bit for bit instead. Shapes are
shared between tests so that JAX compiles few programs: [B=2, Hq=4, Hkv=2 (GQA), Dk=6, Dv=5] with
``Lq, Lk = 7, 10`` (decode-like, Lq < Lk) or ``10, 7`` (Lq > Lk: bottom-right leaves rows empty).
"""

from __future__ import annotations

import itertools

import jax
import ml_dtypes
import numpy as np
import pytest

from oracles import mp, spec
from verify import checks, fuzz
from verify.case import Case
from verify.targets import load
from verify.targets.chunked_jax import band_overlaps

DT = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}
B, HQ, HKV, DK, DV = 2, 4, 2, 6, 5
SHORT, TALL = (7, 10), (10, 7)  # (Lq, Lk)


@pytest.fixture(scope="module")
def chunked() -> object:
    return load("chunked-jax")


@pytest.fixture(scope="module")
def dpa() -> object:
    return load("jax-dpa")


def make(seed: int, shape: tuple[int, int] = SHORT, dtype: str = "fp32", g_lse: bool = True, **fields: object) -> Case:
    """Normal q, k, v, g (and a float32 g_lse) of one dtype; query/key chunks 3/4 unless given."""
    rng = np.random.default_rng(seed)
    lq, lk = shape
    dt = DT[dtype]

    def draw(*s: int) -> np.ndarray:
        return rng.standard_normal(s).astype(dt)

    fields = {"query_chunk_size": 3, "key_chunk_size": 4, **fields}
    return Case(draw(B, lq, HQ, DK), draw(B, lk, HKV, DK), draw(B, lk, HKV, DV), g=draw(B, lq, HQ, DV),
                g_lse=rng.standard_normal((B, HQ, lq)).astype(np.float32) if g_lse else None, **fields)


def segments(seed: int, shape: tuple[int, int]) -> dict:
    """Sorted segment blocks; some query ids no key has (rows with no visible key)."""
    rng = np.random.default_rng(seed)
    lq, lk = shape
    q = np.sort(rng.integers(0, 3, (B, lq)), axis=1).astype(np.int32)
    kv = np.sort(rng.integers(0, 3, (B, lk)), axis=1).astype(np.int32)
    q[0, 1] = 7  # no key has segment 7
    return {"q_segment_ids": q, "kv_segment_ids": kv}


def clean(adapter: object, case: Case) -> checks.Outcome:
    """run_case with forward and grad: no finding, and every declared output was compared."""
    out = checks.run_case(adapter, case)
    assert out.findings == [], "\n\n".join(f.message() for f in out.findings)
    want = {"out", "dq", "dk", "dv"} | ({"lse"} if "lse" in adapter.info.features else set())
    want |= {"dbias"} if case.bias is not None else set()
    want |= {"dsinks"} if case.sinks is not None else set()
    assert want <= set(out.ratios), f"not compared: {want - set(out.ratios)}"
    return out


def masked_rows(case: Case) -> np.ndarray:
    return spec.normalize(case.q, case.k, case.v, **case.semantics()).masked_row  # [B, Hq, Lq]


def test_chunked_declares_every_feature(chunked: object) -> None:
    assert chunked.info.features == {"mask", "bias", "causal", "gqa", "chunks", "grad", "lse", "bottom-right",
                                     "window", "softcap", "alibi", "sinks", "segments"}
    assert chunked.info.unexercised() == []
    assert chunked.info.masked_rows == "zeros"


# --- chunked-jax: each option alone ---------------------------------------------------------------------

ALONE = {
    "causal-bottom-right-short": dict(causal=True, align="bottom-right"),
    "causal-bottom-right-tall": dict(shape=TALL, causal=True, align="bottom-right"),
    "window-0-0-bottom-right-tall": dict(shape=TALL, window=(0, 0), align="bottom-right"),
    "window-None-0": dict(window=(None, 0)),
    "window-3-None-bottom-right": dict(window=(3, None), align="bottom-right"),
    "window-right-beyond-Lk": dict(window=(1, 12)),
    "softcap-1": dict(softcap=1.0, scale=1.0),
    "softcap-50": dict(softcap=50.0),
    "alibi-Hq": dict(alibi_slopes=(2.0 ** (-8.0 * np.arange(1, HQ + 1) / HQ)).astype(np.float32)),
    "alibi-B-Hq": dict(alibi_slopes=(np.random.default_rng(1).random((B, HQ)) * 0.3).astype(np.float32)),
    "segments": dict(**segments(2, SHORT)),
}
EMPTY_ROWS = {"causal-bottom-right-tall", "window-0-0-bottom-right-tall", "segments"}


@pytest.mark.parametrize("name", ALONE)
def test_each_option_alone(chunked: object, name: str) -> None:
    fields = dict(ALONE[name])
    case = make(10, **fields)
    if name in EMPTY_ROWS:
        assert masked_rows(case).any()
        out = chunked.forward(case)
        b, h, i = np.nonzero(masked_rows(case))
        assert (out.out[b, i, h] == 0).all() and (out.lse[b, h, i] == -np.inf).all()
        assert (chunked.vjp(case)["dq"][b, i, h] == 0).all()
    clean(chunked, case)


@pytest.mark.parametrize("kind", ["mild", "dominant", "minus-inf"])
def test_sinks_alone(chunked: object, kind: str) -> None:
    """One program for the three: mild N(0, 4), dominant (out ~ 0, lse ~ sigma), -inf in two heads."""
    rng = np.random.default_rng(3)
    sinks = {"mild": 2.0 * rng.standard_normal(HQ), "dominant": 60.0 + 40.0 * rng.random(HQ),
             "minus-inf": np.array([-np.inf, 0.5, -np.inf, -1.0])}[kind].astype(np.float32)
    out = clean(chunked, make(11, sinks=sinks))
    assert out.ratios["dsinks"] is not None


# --- sinks, exactly -------------------------------------------------------------------------------------


def test_minus_inf_sink_is_exactly_no_sink(chunked: object) -> None:
    """A -inf sink equals no sink bit for bit: out, lse, dq, dk, dv (and its dsinks is 0)."""
    case = make(12, shape=TALL, causal=True, align="bottom-right")  # empty rows too
    sunk = case.with_(sinks=np.full(HQ, -np.inf, np.float32))
    plain, with_sink = chunked.forward(case), chunked.forward(sunk)
    np.testing.assert_array_equal(plain.out, with_sink.out)
    np.testing.assert_array_equal(plain.lse, with_sink.lse)
    g_plain, g_sink = chunked.vjp(case), chunked.vjp(sunk)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_array_equal(g_plain[name], g_sink[name], err_msg=name)
    assert (g_sink["dsinks"] == 0).all()


def test_empty_rows_with_a_sink_give_zero_and_sigma(chunked: object) -> None:
    """Rows with no visible key but a finite sink: out exactly 0, lse exactly sigma, not masked rows."""
    sinks = np.array([0.5, -3.0, 2.0, 80.0], np.float32)
    case = make(13, shape=TALL, causal=True, align="bottom-right", sinks=sinks)
    att = spec.normalize(case.q, case.k, case.v, **case.semantics())
    assert att.empty_row.any() and not att.masked_row.any()
    got = chunked.forward(case)
    b, h, i = np.nonzero(att.empty_row)
    assert (got.out[b, i, h] == 0).all()
    np.testing.assert_array_equal(got.lse[b, h, i], sinks[h])
    clean(chunked, case)


def test_plus_inf_sink_follows_the_spec(chunked: object) -> None:
    """A +inf sink: out 0 and lse +inf in its head, zero dq there, dsinks = sum g_lse (spec's limit)."""
    sinks = np.array([0.5, np.inf, -1.0, 2.0], np.float32)
    case = make(14, sinks=sinks)
    got = chunked.forward(case)
    grads = chunked.vjp(case)
    exact = mp.attention_vjp(case.q, case.k, case.v, case.g, g_lse=case.g_lse, **case.semantics())
    assert (got.out[:, :, 1] == 0).all() and (got.lse[:, 1] == np.inf).all()
    assert (grads["dq"][:, :, 1] == 0).all()
    np.testing.assert_allclose(grads["dsinks"][1], case.g_lse[:, 1].astype(np.float64).sum(), rtol=1e-6)
    np.testing.assert_allclose(grads["dsinks"][1], exact.dsinks[1], rtol=1e-6)
    finite = [0, 2, 3]
    np.testing.assert_allclose(got.out[:, :, finite], exact.out[:, :, finite], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["dsinks"][finite], exact.dsinks[finite], rtol=1e-4, atol=1e-6)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_allclose(grads[name], getattr(exact, name), rtol=1e-4, atol=1e-5, err_msg=name)


# --- lse ------------------------------------------------------------------------------------------------


def test_lse_values_and_cotangent(chunked: object) -> None:
    """lse [B, Hq, Lq] float32 against mp (-inf exactly on masked rows); the lse cotangent alone moves
    dq, dk, dv and dsinks as the exact VJP says (checked with g = 0 so nothing else contributes)."""
    case = make(15, shape=TALL, causal=True, align="bottom-right", sinks=np.array([-np.inf, 1.0, -np.inf, -2.0],
                                                                                 np.float32))
    got = chunked.forward(case).lse
    exact = mp.attention(case.q, case.k, case.v, **case.semantics()).lse
    assert got.dtype == np.float32 and got.shape == (B, HQ, TALL[0])
    empty = np.isneginf(exact)
    assert empty.any()
    assert (got[empty] == -np.inf).all()
    assert np.abs(got[~empty] - exact[~empty]).max() <= 8 * 2.0**-24 * (np.abs(exact[~empty]).max() + 1)
    only_lse = case.with_(g=np.zeros_like(case.g))
    out = clean(chunked, only_lse)
    assert all(out.ratios[n] is not None for n in ("dq", "dk", "dv", "dsinks"))
    grads = chunked.vjp(only_lse)
    assert np.abs(grads["dq"]).max() > 0.1  # the lse cotangent really reaches q


# --- combinations, chunk sizes, dtypes ------------------------------------------------------------------


def everything(seed: int, shape: tuple[int, int], dtype: str = "fp32", **chunks: object) -> Case:
    """Every option at once: mask, bias with -inf, causal bottom-right, window, softcap, ALiBi, sinks, segments."""
    rng = np.random.default_rng(seed)
    lq, lk = shape
    mask = rng.random((B, 1, lq, lk)) < 0.85
    bias = rng.standard_normal((1, HQ, lq, lk)).astype(DT[dtype])
    bias[0, 2, :, 1] = -np.inf
    fields = dict(mask=mask, bias=bias, causal=True, align="bottom-right", window=(4, None), softcap=5.0,
                  alibi_slopes=(rng.random((B, HQ)) * 0.3).astype(np.float32),
                  sinks=np.array([0.3, -np.inf, 1.5, -0.7], dtype=DT[dtype]), **segments(seed, shape))
    return make(seed, shape, dtype, **fields, **chunks)


# chunk sizes 1, non-divisors (clamped last chunks), beyond the lengths, the defaults; each on one shape
CHUNKS = {"1x1-tall": (TALL, 1, 1), "3x4-short": (SHORT, 3, 4), "beyond-tall": (TALL, 16, 16),
          "default-short": (SHORT, None, None)}


@pytest.mark.parametrize("chunks", CHUNKS)
def test_everything_at_once_any_chunks(chunked: object, chunks: str) -> None:
    shape, qc, kc = CHUNKS[chunks]
    case = everything(20, shape, query_chunk_size=qc, key_chunk_size=kc)
    assert masked_rows(case).any()
    clean(chunked, case)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_everything_at_once_low_precision(chunked: object, dtype: str) -> None:
    clean(chunked, everything(21, TALL, dtype))


def test_pairs_of_options(chunked: object) -> None:
    """Options two at a time where they interact: softcap with ALiBi and bias (the order of the terms), a window
    with segments (two visibility rules). Sinks with causal bottom-right: the sink tests above."""
    rng = np.random.default_rng(22)
    clean(chunked, make(22, softcap=1.0, bias=rng.standard_normal((B, HQ, 1, 10)).astype(np.float32),
                        alibi_slopes=np.full(HQ, 0.25, np.float32)))
    clean(chunked, make(23, shape=TALL, window=(0, 2), **segments(23, TALL)))


# --- key-chunk skipping ---------------------------------------------------------------------------------


def test_band_overlaps_is_exact_on_every_chunk_pair() -> None:
    """The skip test is True exactly when a (query chunk, key chunk) block holds a causal/window-visible pair,
    for every alignment, window and chunk size here (clamped last chunks included): nothing visible is skipped."""
    windows = [None, (0, 0), (None, 0), (3, None), (1, 12), (0, 2), (2, 1), (None, None)]
    count = 0
    for (lq, lk), causal, window, align in itertools.product([(7, 10), (10, 7), (5, 5), (1, 9)], [False, True],
                                                              windows, spec.ALIGNS):
        if not causal and window is None:
            continue
        off = spec.offset(lq, lk, align)
        vis = spec.position_visible(lq, lk, off, causal, window)
        for cq, ck in itertools.product(range(1, lq + 1), range(1, lk + 1)):
            for i, j in itertools.product(range(-(-lq // cq)), range(-(-lk // ck))):
                qs, ks = min(i * cq, lq - cq), min(j * ck, lk - ck)
                want = bool(vis[qs:qs + cq, ks:ks + ck].any())
                assert bool(band_overlaps(qs, qs + cq - 1, ks, ks + ck - 1, off, causal, window)) == want, (
                    lq, lk, causal, window, align, cq, ck, i, j)
                count += 1
    assert count > 10_000


def test_skipping_equals_the_same_pattern_as_a_mask(chunked: object) -> None:
    """A window (key chunks 4-7 and 8-9 skipped for query rows 0-2) and the same visibility given as a boolean
    mask (nothing skipped): equal bit for bit, forward, lse and gradients."""
    case = make(25, window=(None, 0))
    assert not band_overlaps(0, 2, 4, 7, 0, False, (None, 0))
    pattern = spec.position_visible(*SHORT, 0, False, (None, 0))
    as_mask = case.with_(causal=False, window=None, mask=np.broadcast_to(pattern, (1, 1, *SHORT)).copy())
    a, b = chunked.forward(case), chunked.forward(as_mask)
    np.testing.assert_array_equal(a.out, b.out)
    np.testing.assert_array_equal(a.lse, b.lse)
    ga, gb = chunked.vjp(case), chunked.vjp(as_mask)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_array_equal(ga[name], gb[name], err_msg=name)
    clean(chunked, case)


# --- a campaign -----------------------------------------------------------------------------------------


def test_short_campaign_finds_nothing(tmp_path: object) -> None:
    camp = fuzz.run(load("chunked-jax"), fuzz.Settings(database=None, repro_dir=tmp_path, max_examples=40,
                                                       dtypes=("fp32",)))
    assert camp.examples["fp32"] > 0
    assert camp.findings == [], "\n\n".join(f.message() for f in camp.findings)


# --- jax-dpa: the window, the one option that maps ------------------------------------------------------


def test_jax_dpa_declares_what_maps(dpa: object) -> None:
    feats = dpa.info.features
    assert "window" in feats
    assert not feats & {"lse", "bottom-right", "softcap", "alibi", "sinks", "segments", "chunks"}
    assert dpa.info.masked_rows == "uniform"


@pytest.mark.parametrize("window,shape,causal", [((0, 0), TALL, False), ((None, 0), SHORT, False),
                                                 ((3, None), TALL, True), ((1, 12), SHORT, False)])
def test_jax_dpa_window_matches_mp(dpa: object, window: tuple, shape: tuple[int, int], causal: bool) -> None:
    """local_window_size = spec's window (top-left); rows the window empties (Lq > Lk) follow ``uniform``."""
    case = make(30, shape, window=window, causal=causal, g_lse=False)
    clean(dpa, case)
    lq, lk = shape
    exact = mp.attention(case.q, case.k, case.v, masked_rows="uniform", **case.semantics()).out
    got = dpa.forward(case).out.astype(np.float64)
    assert np.abs(got - exact).max() <= 64 * 2.0**-24 * np.abs(exact).max()


def test_jax_dpa_residual_is_not_a_differentiable_lse() -> None:
    """Why ``lse`` is not declared: return_residual's lse is rounded to the input dtype and stop-gradient-ed.

    Its fp32 value does match mp's lse."""
    case = make(31, SHORT)
    q, k, v = (jax.numpy.asarray(x) for x in (case.q, case.k, case.v))
    pad = jax.numpy.zeros((B, SHORT[1], HKV, DK - DV), np.float32)
    v = jax.numpy.concatenate([v, pad], axis=-1)

    def residual(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jax.nn.dot_product_attention(q, k, v, implementation="xla", return_residual=True)[1]

    lse = np.asarray(residual(q, k, v))  # [B, Lq, Hq]
    exact = mp.attention(case.q, case.k, case.v).lse  # [B, Hq, Lq]
    assert np.abs(np.swapaxes(lse, 1, 2) - exact).max() <= 8 * 2.0**-24 * np.abs(exact).max()
    grads = jax.grad(lambda q, k: residual(q, k, v).sum(), argnums=(0, 1))(q, k)
    assert all(float(np.abs(g).max()) == 0.0 for g in grads)  # the exact d lse / dq is not 0
    low = jax.eval_shape(residual, *(x.astype(ml_dtypes.bfloat16) for x in (q, k, v)))
    assert low.dtype == ml_dtypes.bfloat16  # the harness wants float32 lse


def test_jax_dpa_query_lengths_zero_padded_rows() -> None:
    """Why query_seq_lengths maps to nothing of ours: its padded rows come out 0 (not ``uniform``, the policy
    of every other empty row), and key_value_seq_lengths is only a key-padding mask."""
    case = make(32, SHORT)
    q, k = jax.numpy.asarray(case.q), jax.numpy.asarray(case.k)
    v = jax.numpy.asarray(np.concatenate([case.v, np.ones((B, SHORT[1], HKV, DK - DV), np.float32)], -1))
    lengths = np.array([5, 7], np.int32)
    out = np.asarray(jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, implementation="xla"))
    assert (out[0, 5:] == 0).all() and (out[0, :5] != 0).all()
    kv_lengths = np.array([4, 10], np.int32)
    padded = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=kv_lengths, implementation="xla")
    mask = (np.arange(SHORT[1])[None, :] < kv_lengths[:, None])[:, None, None, :]
    masked = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(masked))
