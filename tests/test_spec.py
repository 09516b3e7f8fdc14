"""oracles.spec: validation errors, visibility (mask, bias -inf, causal), GQA head map, reduce_to_shape."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

from oracles import mp, spec

B, LQ, LK, HQ, HKV, DK, DV = 2, 3, 5, 4, 2, 3, 2


def qkv(dtype=np.float32, b=B, lq=LQ, lk=LK, hq=HQ, hkv=HKV, dk=DK, dv=DV):
    r = np.random.default_rng(0)
    q = r.standard_normal((b, lq, hq, dk)).astype(dtype)
    k = r.standard_normal((b, lk, hkv, dk)).astype(dtype)
    v = r.standard_normal((b, lk, hkv, dv)).astype(dtype)
    return q, k, v


def esc(s: str) -> str:
    return re.escape(s)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shape",
    [(B, HQ, LQ, LK + 1), (3, 1, 1, 1), (HQ + 1, LQ, LK), (LQ + 1, 1), (1, B, HQ, LQ, LK)],
)
@pytest.mark.parametrize("which", ["mask", "bias"])
def test_not_broadcastable_mask_or_bias(which, shape):
    q, k, v = qkv()
    arr = np.ones(shape, dtype=bool) if which == "mask" else np.zeros(shape, dtype=np.float32)
    shp = "[" + ", ".join(map(str, shape)) + "]"
    with pytest.raises(ValueError, match=esc(f"{which} {shp}") + ".*" + esc(str([B, HQ, LQ, LK]))):
        spec.normalize(q, k, v, **{which: arr})


def test_heads_not_multiple():
    q, k, v = qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match=r"Hq=3 \(q \[2, 3, 3, 3\]\) is not a multiple of Hkv=2 \(k \[2, 5, 2, 3\]\)"):
        spec.normalize(q, k, v)


def test_dk_mismatch():
    q, _, v = qkv()
    _, k, _ = qkv(dk=DK + 1)
    with pytest.raises(ValueError, match=r"head dim of q \[2, 3, 4, 3\] and k \[2, 5, 2, 4\] differ: Dk 3 != 4"):
        spec.normalize(q, k, v)


def test_kv_shape_mismatch():
    q, k, _ = qkv()
    _, _, v = qkv(lk=LK + 1)
    with pytest.raises(ValueError, match=r"k \[2, 5, 2, 3\] and v \[2, 6, 2, 2\]"):
        spec.normalize(q, k, v)
    _, _, v = qkv(b=B + 1)
    with pytest.raises(ValueError, match=r"k \[2, 5, 2, 3\] and v \[3, 5, 2, 2\]"):
        spec.normalize(q, k, v)


def test_empty_dimension():
    q, k, v = qkv(lk=0)
    with pytest.raises(ValueError, match="empty dimension"):
        spec.normalize(q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_nan_in_inputs(name, dtype):
    arrs = dict(zip("qkv", qkv(dtype), strict=True))
    arrs[name] = arrs[name].copy()
    arrs[name][1, 0, 1, 1] = np.nan
    shp = "[" + ", ".join(map(str, arrs[name].shape)) + "]"
    with pytest.raises(ValueError, match=esc(f"{name} {shp} contains NaN")):
        spec.normalize(arrs["q"], arrs["k"], arrs["v"])


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("val", [np.inf, -np.inf])
def test_inf_in_inputs(name, val):
    arrs = dict(zip("qkv", qkv(), strict=True))
    arrs[name] = arrs[name].copy()
    arrs[name][0, 0, 0, 0] = val
    with pytest.raises(ValueError, match=esc(f"{name} [") + ".*contains inf"):
        spec.normalize(arrs["q"], arrs["k"], arrs["v"])


def test_nan_in_bias():
    q, k, v = qkv()
    bias = np.zeros((LQ, LK), dtype=np.float16)
    bias[1, 2] = np.nan
    with pytest.raises(ValueError, match=esc("bias [3, 5] contains NaN")):
        spec.normalize(q, k, v, bias=bias)


def test_pos_inf_in_bias():
    q, k, v = qkv()
    bias = np.zeros((HQ, 1, LK))
    bias[2, 0, 4] = np.inf
    with pytest.raises(ValueError, match=esc("bias [4, 1, 5] contains +inf")):
        spec.normalize(q, k, v, bias=bias)


def test_neg_inf_in_bias_masks_the_key():
    q, k, v = qkv()
    bias = np.zeros((B, 1, LQ, LK), dtype=ml_dtypes.bfloat16)
    bias[1, 0, 2, 3] = -np.inf
    bias[0, 0, :, 0] = -np.inf
    att = spec.normalize(q, k, v, bias=bias)
    want = np.ones((B, HQ, LQ, LK), dtype=bool)
    want[1, :, 2, 3] = False
    want[0, :, :, 0] = False
    np.testing.assert_array_equal(att.visible, want)
    assert att.bias.shape == (B, HQ, LQ, LK) and att.bias_shape == (B, 1, LQ, LK)


def test_unknown_masked_row_policy():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown masked_rows policy 'mean'; known: zeros, nan, uniform"):
        spec.normalize(q, k, v, masked_rows="mean")


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.complex64, np.complex128, object, np.uint8])
@pytest.mark.parametrize("name", ["q", "k", "v", "bias"])
def test_unsupported_dtype(name, bad):
    arrs = dict(zip("qkv", qkv(np.float64), strict=True))
    arrs["bias"] = None
    if name == "bias":
        arrs["bias"] = np.zeros((LQ, LK), dtype=bad)
    else:
        arrs[name] = arrs[name].astype(bad)
    with pytest.raises(ValueError, match=esc(f"{name} has unsupported dtype") + ".*bf16, fp16, fp32, fp64"):
        spec.normalize(arrs["q"], arrs["k"], arrs["v"], bias=arrs["bias"])


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("ndim", [3, 5])
def test_wrong_ndim(name, ndim):
    arrs = dict(zip("qkv", qkv(), strict=True))
    arrs[name] = arrs[name][..., None] if ndim == 5 else arrs[name][0]
    shp = "[" + ", ".join(map(str, arrs[name].shape)) + "]"
    with pytest.raises(ValueError, match=esc(f"{name} must have 4 dims [batch, seq, heads, dim], got {shp}")):
        spec.normalize(arrs["q"], arrs["k"], arrs["v"])


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint8, np.int64])
def test_non_bool_mask(dtype):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=esc(f"mask must be boolean (True = attend), got dtype {np.dtype(dtype)}")):
        spec.normalize(q, k, v, mask=np.ones((LQ, LK), dtype=dtype))


@pytest.mark.parametrize("scale", [np.inf, -np.inf, np.nan])
def test_nonfinite_scale(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be finite"):
        spec.normalize(q, k, v, scale=scale)


@pytest.mark.parametrize("gshape", [(B, LQ, HQ, DK), (B, LQ, HKV, DV), (B, LK, HQ, DV), (1, LQ, HQ, DV), (LQ, HQ, DV)])
def test_bad_cotangent_shape(gshape):
    q, k, v = qkv()
    g = np.ones(gshape, dtype=np.float32)
    shp = "[" + ", ".join(map(str, gshape)) + "]"
    msg = (
        esc(f"cotangent g {shp} must have the output's shape {[B, LQ, HQ, DV]}")
        if len(gshape) == 4
        else esc(f"g must have 4 dims [batch, seq, heads, dim], got {shp}")
    )
    with pytest.raises(ValueError, match=msg):
        mp.attention_vjp(q, k, v, g)


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_bad_cotangent_values(bad):
    q, k, v = qkv()
    g = np.ones((B, LQ, HQ, DV), dtype=np.float32)
    if bad == "int":
        g = g.astype(np.int32)
        match = "g has unsupported dtype int32"
    else:
        g[0, 1, 2, 1] = np.nan if bad == "nan" else np.inf
        match = esc("g [2, 3, 4, 2] contains ") + ("NaN" if bad == "nan" else "inf")
    with pytest.raises(ValueError, match=match):
        mp.attention_vjp(q, k, v, g)


def test_mp_rejects_low_precision():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="prec must be at least 53 bits, got 40"):
        mp.attention(q, k, v, prec=40)


def test_dtype_helpers():
    assert spec.dtype_name(ml_dtypes.bfloat16) == "bf16"
    assert spec.dtype_name("fp16") == "fp16"
    assert spec.dtype_name(np.zeros(1, np.float32).dtype) == "fp32"
    assert spec.as_dtype("fp64") == np.dtype(np.float64)
    assert [spec.unit_roundoff(d) for d in ("bf16", "fp16", "fp32", "fp64")] == [2.0**-8, 2.0**-11, 2.0**-24, 2.0**-53]
    for bad in (np.int32, "float8", np.complex64):
        with pytest.raises(ValueError, match="unsupported dtype"):
            spec.dtype_name(bad)


# ---------------------------------------------------------------- semantics


@pytest.mark.parametrize("lq,lk", [(3, 7), (7, 3), (5, 5), (1, 4), (4, 1)])
def test_causal_top_left(lq, lk):
    q, k, v = qkv(b=1, lq=lq, lk=lk, hq=2, hkv=1)
    att = spec.normalize(q, k, v, causal=True)
    want = np.zeros((lq, lk), dtype=bool)
    for i in range(lq):
        for j in range(lk):
            want[i, j] = j <= i
    assert att.visible.shape == (1, 2, lq, lk)
    for h in range(2):
        np.testing.assert_array_equal(att.visible[0, h], want)
    np.testing.assert_array_equal(att.masked_row, np.zeros((1, 2, lq), dtype=bool))


def test_visible_combines_mask_causal_bias():
    q, k, v = qkv(b=2, lq=4, lk=4, hq=2, hkv=2)
    r = np.random.default_rng(1)
    mask = r.random((2, 1, 1, 4)) < 0.7  # key padding per batch
    bias = np.where(r.random((2, 4, 4)) < 0.3, -np.inf, 0.5)  # [Hq, Lq, Lk] -> broadcast over batch
    att = spec.normalize(q, k, v, mask=mask, bias=bias, causal=True)
    want = np.zeros((2, 2, 4, 4), dtype=bool)
    for b in range(2):
        for h in range(2):
            for i in range(4):
                for j in range(4):
                    want[b, h, i, j] = bool(mask[b, 0, 0, j]) and j <= i and bias[h, i, j] != -np.inf
    np.testing.assert_array_equal(att.visible, want)
    np.testing.assert_array_equal(att.masked_row, ~want.any(-1))


def test_gqa_head_map_and_dims():
    q, k, v = qkv(hq=6, hkv=2, dk=3, dv=5)
    att = spec.normalize(q, k, v)
    assert att.kv_head.tolist() == [0, 0, 0, 1, 1, 1]
    assert att.dims == {"B": B, "Lq": LQ, "Lk": LK, "Hq": 6, "Hkv": 2, "Dk": 3, "Dv": 5}
    assert att.scale_float() == 1 / np.sqrt(3)
    assert spec.normalize(q, k, v, scale=0.25).scale_float() == 0.25
    q4, k4, v4 = qkv(hq=4, hkv=4)
    assert spec.normalize(q4, k4, v4).kv_head.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 4, 5), (1, 3, 4, 5), (2, 1, 4, 5), (4, 5), (1, 5), (4, 1), (5,), (1,), (), (3, 1, 1), (2, 1, 1, 1)],
)
def test_reduce_to_shape(shape):
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5))
    got = spec.reduce_to_shape(x, shape)
    assert got.shape == shape
    # Explicit loop: every element of x goes to the broadcast index it came from.
    padded = (1,) * (4 - len(shape)) + shape
    want = np.zeros(padded)
    for idx in np.ndindex(*x.shape):
        want[tuple(0 if n == 1 else i for i, n in zip(idx, padded, strict=True))] += x[idx]
    np.testing.assert_allclose(got, want.reshape(shape), rtol=1e-13, atol=1e-13)


def test_layout_helpers():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    y = spec.to_heads_first(x)
    assert y.shape == (2, 4, 3, 5) and y[1, 2, 0, 3] == x[1, 0, 2, 3]
    np.testing.assert_array_equal(spec.to_seq_first(y), x)
