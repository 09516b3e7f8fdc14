"""oracles.spec, modern options: align/offset, causal, window, segments, ALiBi, sinks, softcap; validation."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

from oracles import mp, naive, spec

B, LQ, LK, HQ, HKV, DK, DV = 2, 3, 5, 4, 2, 3, 2


def qkv(b=B, lq=LQ, lk=LK, hq=HQ, hkv=HKV, dtype=np.float32):
    r = np.random.default_rng(0)
    return (
        r.standard_normal((b, lq, hq, DK)).astype(dtype),
        r.standard_normal((b, lk, hkv, DK)).astype(dtype),
        r.standard_normal((b, lk, hkv, DV)).astype(dtype),
    )


def brute_visible(lq, lk, *, align="top-left", causal=False, window=None, qseg=None, kvseg=None, b=0):
    """The spec's visibility rules, one (i, j) at a time."""
    off = 0 if align == "top-left" else lk - lq
    want = np.zeros((lq, lk), dtype=bool)
    for i in range(lq):
        for j in range(lk):
            ok = True
            if causal:
                ok &= j <= i + off
            if window is not None:
                left, right = window
                if left is not None:
                    ok &= i + off - left <= j
                if right is not None:
                    ok &= j <= i + off + right
            if qseg is not None:
                ok &= qseg[b, i] == kvseg[b, j]
            want[i, j] = ok
    return want


# ---------------------------------------------------------------- defaults and helpers


def test_defaults_mean_off():
    q, k, v = qkv()
    att = spec.normalize(q, k, v)
    assert (att.align, att.offset, att.causal, att.window, att.softcap) == ("top-left", 0, False, None, None)
    assert att.alibi is None and att.alibi_slopes is None and att.sinks is None
    assert att.q_segment_ids is None and att.kv_segment_ids is None
    assert att.visible.all() and not att.empty_row.any() and not att.masked_row.any()
    assert not att.sink_row.any() and not att.infinite_sink_row.any()


@pytest.mark.parametrize("lq,lk", [(3, 7), (7, 3), (5, 5), (1, 6)])
def test_offset_and_relative_position(lq, lk):
    assert spec.offset(lq, lk, "top-left") == 0
    assert spec.offset(lq, lk, "bottom-right") == lk - lq
    for off in (0, lk - lq):
        d = spec.relative_position(lq, lk, off)
        assert d.dtype == np.int64 and d.shape == (lq, lk)
        assert all(d[i, j] == i + off - j for i in range(lq) for j in range(lk))
    q, k, v = qkv(lq=lq, lk=lk)
    att = spec.normalize(q, k, v, align="bottom-right")
    assert att.offset == lk - lq
    np.testing.assert_array_equal(att.distance, np.abs(spec.relative_position(lq, lk, lk - lq)))


WINDOWS = [None, (0, 0), (1, 0), (0, 2), (2, None), (None, 1), (None, None), (1, 9), (9, 9), (3, 1)]


@pytest.mark.parametrize("lq,lk", [(4, 4), (3, 6), (6, 3), (1, 5)])
@pytest.mark.parametrize("align", spec.ALIGNS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_visible_positions_match_the_rules(lq, lk, align, causal, window):
    q, k, v = qkv(b=1, lq=lq, lk=lk, hq=2, hkv=1)
    att = spec.normalize(q, k, v, align=align, causal=causal, window=window)
    want = brute_visible(lq, lk, align=align, causal=causal, window=window)
    for h in range(2):
        np.testing.assert_array_equal(att.visible[0, h], want)
    np.testing.assert_array_equal(att.empty_row[0, 0], ~want.any(-1))
    np.testing.assert_array_equal(att.masked_row, att.empty_row)  # no sinks: the same rows
    off = spec.offset(lq, lk, align)
    np.testing.assert_array_equal(spec.position_visible(lq, lk, off, causal, window), want)


def test_bottom_right_equals_top_left_when_square():
    q, k, v = qkv(lq=5, lk=5)
    for kw in ({"causal": True}, {"window": (1, 2)}, {"causal": True, "window": (2, 0)}):
        a = spec.normalize(q, k, v, align="top-left", **kw)
        b = spec.normalize(q, k, v, align="bottom-right", **kw)
        np.testing.assert_array_equal(a.visible, b.visible)
        assert a.offset == b.offset == 0


def test_bottom_right_causal_decode_and_lq_greater_than_lk():
    q, k, v = qkv(lq=1, lk=6)
    assert spec.normalize(q, k, v, causal=True, align="bottom-right").visible.all()  # decode sees every key
    assert spec.normalize(q, k, v, causal=True).visible[..., 1:].sum() == 0  # top-left sees key 0 only
    q, k, v = qkv(lq=7, lk=3)
    att = spec.normalize(q, k, v, causal=True, align="bottom-right")
    assert att.offset == -4
    np.testing.assert_array_equal(att.empty_row[0, 0], [True] * 4 + [False] * 3)
    np.testing.assert_array_equal(att.visible[0, 0, 4:], np.tri(3, dtype=bool))


def test_window_zero_zero_is_the_diagonal_and_right_past_lk_is_unbounded():
    q, k, v = qkv(lq=5, lk=5)
    np.testing.assert_array_equal(spec.normalize(q, k, v, window=(0, 0)).visible[1, 3], np.eye(5, dtype=bool))
    q, k, v = qkv(lq=4, lk=6)
    for align in spec.ALIGNS:
        wide = spec.normalize(q, k, v, window=(1, 6), align=align).visible
        none = spec.normalize(q, k, v, window=(1, None), align=align).visible
        np.testing.assert_array_equal(wide, none)
        assert (wide.sum(-1) >= 2).all()


def test_segments_and_their_intersection_with_mask_bias_causal_window():
    r = np.random.default_rng(3)
    b, lq, lk = 2, 5, 6
    q, k, v = qkv(b=b, lq=lq, lk=lk, hq=2, hkv=1)
    qseg = np.array([[0, 0, 1, 1, 2], [5, 5, 5, 7, 7]], dtype=np.int32)
    kvseg = np.array([[0, 0, 0, 1, 1, 2], [5, 7, 7, 7, 7, 7]], dtype=np.int64)
    mask = r.random((b, 1, lq, lk)) < 0.8
    bias = np.where(r.random((2, lq, lk)) < 0.2, -np.inf, 0.0).astype(np.float32)
    kw = {"align": "bottom-right", "causal": True, "window": (3, None)}
    att = spec.normalize(q, k, v, mask=mask, bias=bias, q_segment_ids=qseg, kv_segment_ids=kvseg, **kw)
    for bb in range(b):
        pos = brute_visible(lq, lk, qseg=qseg, kvseg=kvseg, b=bb, **kw)
        for h in range(2):
            want = pos & mask[bb, 0] & (bias[h] != -np.inf)
            np.testing.assert_array_equal(att.visible[bb, h], want)
    np.testing.assert_array_equal(att.q_segment_ids, qseg)
    # One segment for everything changes nothing.
    one = spec.normalize(q, k, v, q_segment_ids=np.zeros((b, lq), np.int8), kv_segment_ids=np.zeros((b, lk), np.int8))
    assert one.visible.all()


@pytest.mark.parametrize("shape", [(HQ,), (B, HQ)])
def test_alibi_term(shape):
    q, k, v = qkv(lq=3, lk=5)
    slopes = (np.arange(1, np.prod(shape) + 1).reshape(shape) * 0.125).astype(ml_dtypes.bfloat16)
    for align in spec.ALIGNS:
        att = spec.normalize(q, k, v, alibi_slopes=slopes, align=align)
        assert att.alibi_slopes.shape == (B, HQ) and att.alibi_slopes.dtype == np.float64
        assert att.alibi.shape == (B, HQ, 3, 5) and att.alibi.dtype == np.float64
        sl = np.broadcast_to(slopes.astype(np.float64), (B, HQ))
        for bb, h, i, j in np.ndindex(B, HQ, 3, 5):
            assert att.alibi[bb, h, i, j] == -sl[bb, h] * abs(i + att.offset - j)
        assert att.visible.all()  # ALiBi changes logits, not visibility
    np.testing.assert_array_equal(spec.alibi_term(att.alibi_slopes, 3, 5, att.offset), att.alibi)


def test_sink_rows():
    q, k, v = qkv(b=1, lq=3, lk=4, hq=4, hkv=2)
    mask = np.ones((1, 4, 3, 4), dtype=bool)
    mask[0, :, 1] = False  # row 1 of every head is empty
    sinks = np.array([-np.inf, 0.5, np.inf, -3.0], dtype=np.float32)
    att = spec.normalize(q, k, v, mask=mask, sinks=sinks)
    assert att.sinks.dtype == np.float64 and att.sinks.tolist() == [-np.inf, 0.5, np.inf, -3.0]
    np.testing.assert_array_equal(att.sink_row[0, :, 0], [False, True, True, True])
    np.testing.assert_array_equal(att.infinite_sink_row[0, :, 0], [False, False, True, False])
    np.testing.assert_array_equal(att.empty_row[0, :, 1], [True] * 4)
    # Only the head whose sink is -inf (= no sink) has a masked row.
    np.testing.assert_array_equal(att.masked_row[0], [[False, True, False]] + [[False] * 3] * 3)


def test_softcap_kept_as_float():
    q, k, v = qkv()
    assert spec.normalize(q, k, v, softcap=30).softcap == 30.0
    assert spec.normalize(q, k, v, softcap=np.float16(2.5)).softcap == 2.5
    assert spec.normalize(q, k, v, window=[np.int64(2), None]).window == (2, None)


# ---------------------------------------------------------------- errors


def _bad(name):
    """(keyword arguments, regex of the message) for one bad input."""
    f32 = np.float32
    table = {
        "align-unknown": ({"align": "center"}, "unknown align 'center'; known: top-left, bottom-right"),
        "align-none": ({"align": None}, "unknown align None"),
        "window-int": ({"window": 3}, r"window must be None or a pair \(left, right\).*got 3"),
        "window-triple": ({"window": (1, 2, 3)}, r"window must be None or a pair.*got \(1, 2, 3\)"),
        "window-negative-left": ({"window": (-1, 0)}, r"window left must be >= 0 .*got -1"),
        "window-negative-right": ({"window": (0, -2)}, r"window right must be >= 0 .*got -2"),
        "window-float": ({"window": (1.0, 0)}, r"window left must be an int >= 0 or None.*got 1\.0"),
        "window-bool": ({"window": (0, True)}, r"window right must be an int >= 0 or None.*got True"),
        "window-str": ({"window": ("2", 0)}, r"window left must be an int.*got '2'"),
        "softcap-zero": ({"softcap": 0.0}, r"softcap must be finite and > 0, got 0\.0"),
        "softcap-negative": ({"softcap": -1.5}, r"softcap must be finite and > 0, got -1\.5"),
        "softcap-inf": ({"softcap": np.inf}, r"softcap must be finite and > 0, got inf"),
        "softcap-nan": ({"softcap": np.nan}, r"softcap must be finite and > 0, got nan"),
        "softcap-str": ({"softcap": "30"}, r"softcap must be a number > 0 or None, got '30'"),
        "softcap-bool": ({"softcap": True}, r"softcap must be a number > 0 or None, got True"),
        "softcap-array": ({"softcap": np.array([1.0, 2.0])}, r"softcap must be a number > 0 or None"),
        "alibi-shape": ({"alibi_slopes": np.ones(HQ + 1, f32)}, r"alibi_slopes \[5\] must have shape \[Hq\] = \[4\] "
                                                                  r"or \[B, Hq\] = \[2, 4\]"),
        "alibi-shape-3d": ({"alibi_slopes": np.ones((B, HQ, 1), f32)}, r"alibi_slopes \[2, 4, 1\] must have shape"),
        "alibi-shape-swapped": ({"alibi_slopes": np.ones((HQ, B), f32)}, r"alibi_slopes \[4, 2\] must have shape"),
        "alibi-int": ({"alibi_slopes": np.ones(HQ, np.int64)}, "alibi_slopes has unsupported dtype int64"),
        "alibi-nan": ({"alibi_slopes": np.array([0.5, np.nan, 1, 1], f32)}, r"alibi_slopes \[4\] contains NaN"),
        "alibi-inf": ({"alibi_slopes": np.array([0.5, 1, np.inf, 1], f32)}, r"alibi_slopes \[2, 4\] contains inf"),
        "sinks-shape": ({"sinks": np.zeros((B, HQ), f32)}, r"sinks \[2, 4\] must have shape \[Hq\] = \[4\]"),
        "sinks-short": ({"sinks": np.zeros(HKV, f32)}, r"sinks \[2\] must have shape \[Hq\] = \[4\]"),
        "sinks-int": ({"sinks": np.zeros(HQ, np.int32)}, "sinks has unsupported dtype int32"),
        "sinks-nan": ({"sinks": np.array([0, np.nan, 0, 0], f32)}, r"sinks \[4\] contains NaN"),
        "segments-q-only": ({"q_segment_ids": np.zeros((B, LQ), int)},
                            r"q_segment_ids and kv_segment_ids must be given together \(got only q_segment_ids\)"),
        "segments-kv-only": ({"kv_segment_ids": np.zeros((B, LK), int)}, r"got only kv_segment_ids"),
        "segments-float": ({"q_segment_ids": np.zeros((B, LQ), f32), "kv_segment_ids": np.zeros((B, LK), int)},
                           "q_segment_ids must be an integer array, got dtype float32"),
        "segments-bool": ({"q_segment_ids": np.zeros((B, LQ), int), "kv_segment_ids": np.zeros((B, LK), bool)},
                          "kv_segment_ids must be an integer array, got dtype bool"),
        "segments-q-shape": ({"q_segment_ids": np.zeros((B, LK), int), "kv_segment_ids": np.zeros((B, LK), int)},
                             r"q_segment_ids \[2, 5\] must have shape \[B, Lq\] = \[2, 3\]"),
        "segments-kv-shape": ({"q_segment_ids": np.zeros((B, LQ), int), "kv_segment_ids": np.zeros((1, LK), int)},
                              r"kv_segment_ids \[1, 5\] must have shape \[B, Lk\] = \[2, 5\]"),
    }
    kw, msg = table[name]
    if name == "alibi-inf":
        kw = {"alibi_slopes": np.tile(kw["alibi_slopes"], (B, 1))}
    return kw, msg


BAD = [
    "align-unknown", "align-none", "window-int", "window-triple", "window-negative-left", "window-negative-right",
    "window-float", "window-bool", "window-str", "softcap-zero", "softcap-negative", "softcap-inf", "softcap-nan",
    "softcap-str", "softcap-bool", "softcap-array", "alibi-shape", "alibi-shape-3d", "alibi-shape-swapped",
    "alibi-int", "alibi-nan", "alibi-inf", "sinks-shape", "sinks-short", "sinks-int", "sinks-nan",
    "segments-q-only", "segments-kv-only", "segments-float", "segments-bool", "segments-q-shape",
    "segments-kv-shape",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("entry", ["spec", "mp", "mp-vjp", "naive", "naive-vjp"])
def test_bad_input_names_the_argument(name, entry):
    q, k, v = qkv()
    kw, msg = _bad(name)
    g = np.ones((B, LQ, HQ, DV), np.float32)
    call = {
        "spec": lambda: spec.normalize(q, k, v, **kw),
        "mp": lambda: mp.attention(q, k, v, **kw),
        "mp-vjp": lambda: mp.attention_vjp(q, k, v, g, **kw),
        "naive": lambda: naive.attention(q, k, v, **kw),
        "naive-vjp": lambda: naive.attention_vjp(q, k, v, g, **kw),
    }[entry]
    with pytest.raises(ValueError, match=msg):
        call()


@pytest.mark.parametrize("entry", [mp.attention_vjp, naive.attention_vjp])
@pytest.mark.parametrize(
    "bad,msg",
    [
        ((B, LQ, HQ), re.escape("cotangent g_lse [2, 3, 4] must have lse's shape [B, Hq, Lq] = [2, 4, 3]")),
        ((B, HQ), re.escape("cotangent g_lse [2, 4] must have lse's shape")),
        ("nan", re.escape("g_lse [2, 4, 3] contains NaN")),
        ("inf", re.escape("g_lse [2, 4, 3] contains inf")),
        ("int", "g_lse has unsupported dtype int32"),
    ],
)
def test_bad_lse_cotangent(entry, bad, msg):
    q, k, v = qkv()
    g = np.ones((B, LQ, HQ, DV), np.float32)
    if isinstance(bad, tuple):
        g_lse = np.ones(bad, np.float32)
    elif bad == "int":
        g_lse = np.ones((B, HQ, LQ), np.int32)
    else:
        g_lse = np.ones((B, HQ, LQ), np.float32)
        g_lse[1, 2, 0] = np.nan if bad == "nan" else -np.inf
    with pytest.raises(ValueError, match=msg):
        entry(q, k, v, g, g_lse=g_lse)
