"""triton-flash (our FA2-style Triton kernel) against the float64 reference and, on tiny cases, mpmath.

The target is called directly (not through the harness) on torch tensors: CPU under Triton's
interpreter, CUDA where the module compiled its kernels.

Error model (componentwise, Higham-style: the same formulas on absolute values give each element's
scale). ``u`` is the input dtype's unit roundoff (fp16 2^-11, fp32 2^-24), ``u32 = 2^-24``, P the exact
probabilities, ``A = P |v|`` (the attention of |v|), ``g`` / ``g_lse`` the cotangents::

    forward   |out - out*| <= (C * u + 2 E + Lk u32) * A + t * sum_{j visible} |v_j|
    lse       |lse - lse*| <= E + u32 * (|lse*| + Lk)
    dv        |dv - dv*|   <= (C * u + 4 E + (Lq + Lk) u32) * P^T |g|        + t * sum_{i visible} |g_i|
    dq        |dq - dq*|   <= (C * u + 4 E + (Lq + Lk) u32) * scale |dS| |K| + t * scale * sum_{j visible} |k_j|
    dk        |dk - dk*|   <= (C * u + 4 E + (Lq + Lk) u32) * scale |dS|^T |Q| + t * scale * sum_{i visible} |q_i|

with ``|dS_ij| = P_ij (|g_i|.|v_j| + |g_i|.A_i + |g_lse_i|)`` (a bound on ``|P (dP - delta + g_lse)|``,
the softcap factor ``1 - tanh^2 <= 1`` included) and the kv-head quantities summed over their query
heads. Why these terms:

- ``C = 4``: u is the unit roundoff, the largest relative error of one rounding. The forward rounds
  the probabilities to the input dtype before ``P @ V`` and the output once (2 u); the backward rounds
  P (dv) or dS (dq, dk) before their matmuls, computes delta from the rounded output (u of |g| A, inside
  |dS|) and rounds each gradient once (at most 3 u). C = 4 covers that worst case with the fp32 terms'
  second order; measured errors stay below half the allowance, while a real bug (a lost rescaling, an
  off-by-one tile end, a wrong Jacobian) gives errors of order A, hundreds of allowances.
- ``E`` (per row; its maximum over all rows for gradients) is the fp32 logit error:
  ``u32 * (Dk * S1 + 8 * Smax)`` with ``S1 = scale * max_j sum_d |q_d| |k_jd|`` (the fp32 dot product,
  any order) and ``Smax = max_j |s_ij|`` over visible keys (the scale's rounding and product, tanh
  and ``* c``, the ALiBi product and sum, ``s - m`` before exp). A logit error E moves each probability
  by a factor within exp(+-2E): 2E for the output, 4E for dS (p and p times dP - delta).
- ``Lk u32`` / ``(Lq + Lk) u32``: fp32 sums over keys (and over queries for dk, dv).
- ``t`` is half the smallest subnormal spacing of the dtype (fp16: 2^-25; fp32: 2^-150, nothing): a
  probability or dS entry rounded to fp16 below its normal range has that absolute error, not u.
- The float64 reference itself is ~1e-15 relative, invisible at these scales (and its ``reliable``
  flag is checked).

A row with no visible key has A = 0, |dS| = 0 and no visible terms, so its output and gradients must be
exactly 0; the tests also check lse = -inf there.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from oracles import mp, naive, spec  # noqa: E402
from verify.targets import triton_flash as tf  # noqa: E402
from verify.targets.base import Contract  # noqa: E402

DEVICE = "cuda" if tf.COMPILED else "cpu"
C = 4.0
U32 = 2.0**-24
NP = {"fp16": np.float16, "fp32": np.float32}
TORCH = {"fp16": torch.float16, "fp32": torch.float32}
TINY = {"fp16": 2.0**-25, "fp32": 2.0**-150}


# ---------------------------------------------------------------- inputs, reference, allowances


def _inputs(rng, b, lq, lk, hq, hkv, dk, dv, dtype, q_scale=1.0):
    dt = NP[dtype]
    q = (q_scale * rng.standard_normal((b, lq, hq, dk))).astype(dt)
    k = rng.standard_normal((b, lk, hkv, dk)).astype(dt)
    v = rng.standard_normal((b, lk, hkv, dv)).astype(dt)
    g = rng.standard_normal((b, lq, hq, dv)).astype(dt)
    g_lse = rng.standard_normal((b, hq, lq)).astype(np.float32)
    return q, k, v, g, g_lse


def _spec_kwargs(kw: dict) -> dict:
    """The target's keyword arguments as the oracles take them (numpy slopes)."""
    out = {name: value for name, value in kw.items() if name != "alibi_slopes"}
    if kw.get("alibi_slopes") is not None:
        out["alibi_slopes"] = np.asarray(kw["alibi_slopes"], dtype=np.float32)
    return out


def _scales(q, k, v, g, g_lse, kw: dict) -> dict:
    """The componentwise scales of the module docstring, float64, in the outputs' layouts."""
    att = spec.normalize(q, k, v, **_spec_kwargs(kw))
    kvh = att.kv_head
    q64, k64, v64, g64 = (np.swapaxes(x.astype(np.float64), 1, 2) for x in (q, k, v, g))  # [B, H, L, D]
    k64, v64 = k64[:, kvh], v64[:, kvh]  # per query head
    scale = att.scale_float()
    vis = att.visible
    t = scale * (q64 @ np.swapaxes(k64, -1, -2))
    s = t if att.softcap is None else att.softcap * np.tanh(t / att.softcap)
    if att.alibi is not None:
        s = s + att.alibi
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)
    s1 = np.where(vis, scale * (np.abs(q64) @ np.swapaxes(np.abs(k64), -1, -2)), 0.0).max(axis=-1)
    smax = np.where(vis, np.abs(s), 0.0).max(axis=-1)
    dk_dim = q.shape[-1]
    err = U32 * (dk_dim * s1 + 8 * smax)  # [B, Hq, Lq]
    a = p @ np.abs(v64)  # [B, Hq, Lq, Dv]
    ga = np.abs(g64)
    gl = np.zeros(err.shape) if g_lse is None else np.abs(g_lse.astype(np.float64))
    ds = p * (ga @ np.swapaxes(np.abs(v64), -1, -2) + (ga * a).sum(-1, keepdims=True) + gl[..., None])
    visf = vis.astype(np.float64)
    hkv = k.shape[2]

    def group(x):  # [B, Hq, L, D] -> [B, L, Hkv, D], summed over each kv head's query heads
        b, hq = x.shape[:2]
        return np.swapaxes(x.reshape(b, hkv, hq // hkv, *x.shape[2:]).sum(axis=2), 1, 2)

    return {
        "att": att,
        "err": err,
        "ds_max": ds.max(initial=0.0),
        "A": np.swapaxes(a, 1, 2),
        "vis_v": np.swapaxes(visf @ np.abs(v64), 1, 2),
        "dv": group(np.swapaxes(p, -1, -2) @ ga),
        "dv_vis": group(np.swapaxes(visf, -1, -2) @ ga),
        "dq": np.swapaxes(scale * (ds @ np.abs(k64)), 1, 2),
        "dq_vis": np.swapaxes(scale * (visf @ np.abs(k64)), 1, 2),
        "dk": group(scale * (np.swapaxes(ds, -1, -2) @ np.abs(q64))),
        "dk_vis": group(scale * (np.swapaxes(visf, -1, -2) @ np.abs(q64))),
    }


def _assert_within(name: str, got: np.ndarray, want: np.ndarray, allow: np.ndarray) -> None:
    got = got.astype(np.float64)
    assert np.isfinite(got).all(), f"{name}: non-finite values at {np.argwhere(~np.isfinite(got))[:5].tolist()}"
    diff = np.abs(got - want)
    bad = diff > allow
    if bad.any():
        idx = np.unravel_index(np.argmax(np.where(bad, diff / np.maximum(allow, 1e-300), 0)), diff.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {diff.size} beyond allowance; worst at {list(idx)}: got {got[idx]:.8g}, "
            f"want {want[idx]:.8g} (diff {diff[idx]:.3g}, allowance {allow[idx]:.3g})"
        )


def _target_kwargs(kw: dict) -> dict:
    """The oracles' keyword arguments as the target takes them (slopes as a float32 tensor)."""
    out = dict(kw)
    if kw.get("alibi_slopes") is not None:
        out["alibi_slopes"] = torch.as_tensor(np.asarray(kw["alibi_slopes"], np.float32), device=DEVICE)
    return out


def _t(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE).requires_grad_(grad)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _run(q, k, v, g, g_lse, kw: dict):
    """The target's out, lse and (dq, dk, dv) for cotangents g (of out, may be None) and g_lse (may be None)."""
    tq, tk, tv = _t(q, True), _t(k, True), _t(v, True)
    out, lse = tf.attention(tq, tk, tv, return_lse=True, **kw)
    outs, cots = [], []
    if g is not None:
        outs.append(out)
        cots.append(_t(g))
    if g_lse is not None:
        outs.append(lse)
        cots.append(_t(g_lse))
    grads = torch.autograd.grad(outs, (tq, tk, tv), cots)
    return _np(out), _np(lse), [_np(x) for x in grads]


def _check(rng, shape, dtype="fp16", *, with_g=True, with_g_lse=True, q_scale=1.0, **kw):
    """Forward, lse and gradients of one random case against ``naive`` (float64), within the error model."""
    q, k, v, g, g_lse = _inputs(rng, *shape, dtype, q_scale)
    return _check_arrays(q, k, v, g if with_g else None, g_lse if with_g_lse else None, dtype, **kw)


def _check_arrays(q, k, v, g, g_lse, dtype, **kw):
    b, lq, hq, _ = q.shape
    lk, dv = v.shape[1], v.shape[3]
    out, lse, (dq, dkk, dvv) = _run(q, k, v, g, g_lse, _target_kwargs(kw))
    assert out.dtype == NP[dtype] and out.shape == (b, lq, hq, dv)
    assert lse.dtype == np.float32 and lse.shape == (b, hq, lq)
    g_ref = np.zeros(out.shape, NP[dtype]) if g is None else g
    ref = naive.attention_vjp(q, k, v, g_ref, g_lse=g_lse, dtype=None, **_spec_kwargs(kw))
    assert ref.reliable.all()
    sc = _scales(q, k, v, g_ref, g_lse, kw)
    u, tiny = spec.unit_roundoff(dtype), TINY[dtype]
    err = np.swapaxes(sc["err"], 1, 2)[..., None]  # [B, Lq, Hq, 1]
    _assert_within("out", out, ref.out, (C * u + 2 * err + lk * U32) * sc["A"] + tiny * sc["vis_v"])
    empty = sc["att"].masked_row  # [B, Hq, Lq]
    assert np.all(lse[empty] == -np.inf), "an empty row's lse must be -inf"
    full = ~empty
    lse_allow = sc["err"] + U32 * (np.abs(np.where(full, ref.lse, 0.0)) + lk)
    _assert_within("lse", lse[full], ref.lse[full], lse_allow[full])
    e_all = float(sc["err"].max(initial=0.0))
    rel = C * u + 4 * e_all + (lq + lk) * U32
    _assert_within("dv", dvv, ref.dv, rel * sc["dv"] + tiny * sc["dv_vis"])
    tiny_ds = tiny * max(1.0, float(sc["ds_max"]) * 2.0**-14)  # fp16 dS tiles are scaled to max|dS| <= 2^14
    _assert_within("dq", dq, ref.dq, rel * sc["dq"] + tiny_ds * sc["dq_vis"])
    _assert_within("dk", dkk, ref.dk, rel * sc["dk"] + tiny_ds * sc["dk_vis"])
    return {"out": out, "lse": lse, "dq": dq, "empty": empty}


# ---------------------------------------------------------------- what the target declares


def test_info_declares_the_features_policy_and_contract():
    info = tf.INFO
    assert info.name == "triton-flash" and info.framework == "torch"
    assert info.features == frozenset({"causal", "bottom-right", "window", "softcap", "alibi", "gqa", "lse", "grad"})
    assert info.masked_rows == "zeros"
    assert info.contract == Contract(accumulate="fp32", round_logits=False, round_probs=True)
    assert (tf.BLOCK_M, tf.BLOCK_N) == (64, 64)
    assert info.notes and info.description


@pytest.mark.skipif(tf.COMPILED, reason="the kernels are compiled here")
def test_bf16_is_not_declared_under_the_interpreter():
    """The interpreter does bf16 arithmetic on raw uint16, so bf16 is not declared (but still accepted)."""
    assert tf.INTERPRETED and tf.INFO.device == "cpu"
    assert tf.INFO.dtypes == ("fp16", "fp32")
    x = torch.ones(1, 2, 1, 16, dtype=torch.bfloat16)
    out = tf.attention(x, x, x)  # runs (the harness reports what it computes), whatever the values
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 1, 16)


@pytest.mark.skipif(tf.INTERPRETED, reason="the kernels run in Triton's interpreter here")
def test_bf16_is_declared_when_compiled():
    assert tf.INFO.dtypes == ("bf16", "fp16", "fp32") and tf.INFO.device == "cuda"


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"window": (-1, 0)}, ValueError),
        ({"window": (1,)}, ValueError),
        ({"align": "center"}, ValueError),
        ({"softcap": 0.0}, ValueError),
        ({"alibi_slopes": torch.zeros(3)}, ValueError),
    ],
)
def test_rejects_invalid_arguments(kw, error):
    x = torch.zeros(1, 2, 2, 16, device=DEVICE)
    with pytest.raises(error):
        tf.attention(x, x, x, **kw)


def test_rejects_fp64_and_mixed_dtypes():
    x = torch.zeros(1, 2, 1, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="fp32"):
        tf.attention(x, x, x)
    with pytest.raises(TypeError, match="share a dtype"):
        tf.attention(x.float(), x.half(), x.half())


# ---------------------------------------------------------------- shapes: tiles, head dims, GQA


@pytest.mark.parametrize(
    ("lq", "lk"), [(1, 1), (2, 2), (63, 63), (64, 64), (65, 65), (127, 127), (129, 129), (3, 130), (130, 3)]
)
def test_lengths_across_tile_boundaries(rng, lq, lk):
    _check(rng, (1, lq, lk, 1, 1, 16, 16))


@pytest.mark.parametrize(("dk", "dv"), [(16, 16), (59, 59), (72, 72), (40, 24)])
def test_head_dims_with_padded_tails(rng, dk, dv):
    _check(rng, (1, 70, 67, 1, 1, dk, dv), causal=dk == 59)


@pytest.mark.parametrize(("dtype", "hq", "hkv"), [("fp16", 2, 1), ("fp32", 2, 1), ("fp16", 4, 2)])
def test_grouped_query_attention(rng, dtype, hq, hkv):
    """Query head h reads kv head h // (Hq // Hkv); Hq=4, Hkv=2 tells that apart from h % Hkv."""
    lq, lk = (70, 130) if hq == 2 else (33, 40)
    _check(rng, (1, lq, lk, hq, hkv, 32, 16), dtype)


def test_batch_and_large_logits_rescaling(rng):
    """B = 2 (batch strides) with logits large enough that the running max changes across key tiles."""
    _check(rng, (2, 65, 129, 1, 1, 16, 16), q_scale=4.0)


def test_fp16_ds_beyond_the_fp16_range_keeps_gradients_finite(rng):
    """Values near fp16's max with small q, k: |dS| passes 65504 while dq, dk stay near 1e3 (FA2 gives inf)."""
    q = (1e-2 * rng.standard_normal((1, 70, 1, 16))).astype(np.float16)
    k = (1e-2 * rng.standard_normal((1, 70, 1, 16))).astype(np.float16)
    v = np.clip(3e4 * rng.standard_normal((1, 70, 1, 16)), -6e4, 6e4).astype(np.float16)
    g = (4 * rng.standard_normal((1, 70, 1, 16))).astype(np.float16)
    _check_arrays(q, k, v, g, None, "fp16", causal=True)
    sc = _scales(q, k, v, g, None, {"causal": True})
    assert sc["ds_max"] > 65504  # the case does reach beyond fp16


# ---------------------------------------------------------------- modern options, with gradients


@pytest.mark.parametrize("align", ["top-left", "bottom-right"])
@pytest.mark.parametrize(("lq", "lk"), [(65, 65), (3, 130), (130, 3)])
def test_causal(rng, align, lq, lk):
    res = _check(rng, (1, lq, lk, 1, 1, 16, 16), causal=True, align=align)
    if align == "bottom-right" and lq > lk:  # rows i < Lq - Lk see no key
        empty = res["empty"][0, 0]
        assert empty.sum() == lq - lk and empty[: lq - lk].all()


def test_empty_rows_are_exactly_zero_with_zero_gradients(rng):
    """Bottom-right causal with Lq > Lk: out 0, lse -inf, dq 0 for the first Lq - Lk rows, exactly."""
    res = _check(rng, (1, 130, 3, 2, 1, 16, 16), causal=True, align="bottom-right")
    rows = slice(0, 127)
    assert np.all(res["out"][0, rows] == 0) and np.all(res["lse"][0, :, rows] == -np.inf)
    assert np.all(res["dq"][0, rows] == 0)
    assert np.isfinite(res["lse"][0, :, 127:]).all()


@pytest.mark.parametrize(
    ("window", "align", "lq", "lk"),
    [
        ((0, 0), "top-left", 130, 3),  # only the diagonal; rows >= 3 are empty
        ((0, 0), "bottom-right", 65, 129),
        ((3, None), "top-left", 129, 129),
        ((1, 0), "top-left", 129, 129),  # row 64's window starts at key 63, the last key of the tile before
        ((3, None), "bottom-right", 130, 3),  # rows far above the bottom-right diagonal are empty
        ((None, 2), "top-left", 65, 130),
        ((2, 200), "top-left", 129, 129),  # right >= Lk: no key may be dropped
        ((70, 0), "bottom-right", 65, 200),  # a band that skips whole key tiles on both sides
    ],
)
def test_window(rng, window, align, lq, lk):
    _check(rng, (1, lq, lk, 1, 1, 16, 16), window=window, align=align)


def test_window_with_causal(rng):
    _check(rng, (1, 129, 129, 1, 1, 16, 16), causal=True, window=(5, 7))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("softcap", [1.0, 50.0])
def test_softcap(rng, dtype, softcap):
    _check(rng, (1, 65, 70, 1, 1, 16, 16), dtype, softcap=softcap, q_scale=3.0)


@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(rng, per_batch):
    """Slopes [Hq] (non-causal, top-left) and [B, Hq] (with GQA and bottom-right causal; a non-dyadic slope)."""
    if per_batch:
        slopes = np.array([[0.5, 0.0625], [0.25, 1.0 / 3.0]], np.float32)
        _check(rng, (2, 33, 70, 2, 1, 16, 16), alibi_slopes=slopes, causal=True, align="bottom-right")
    else:
        _check(rng, (1, 65, 70, 2, 2, 16, 16), alibi_slopes=np.array([0.5, 0.0625], np.float32))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_every_option_at_once(rng, dtype):
    _check(rng, (1, 100, 129, 2, 1, 59, 40), dtype, causal=True, align="bottom-right", window=(40, None),
           softcap=5.0, alibi_slopes=np.array([0.125, 0.5], np.float32), scale=0.3)


# ---------------------------------------------------------------- lse and its cotangent


@pytest.mark.parametrize(("with_g", "with_g_lse"), [(False, True), (True, False)])
def test_lse_cotangent_alone_and_out_cotangent_alone(rng, with_g, with_g_lse):
    _check(rng, (1, 70, 65, 2, 1, 16, 16), with_g=with_g, with_g_lse=with_g_lse, window=(None, 10))


def test_return_lse_false_returns_the_output_only():
    x = torch.ones(1, 3, 1, 16, device=DEVICE)
    out = tf.attention(x, x, x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 1, 16)


@pytest.mark.parametrize(
    "kw",
    [
        {"softcap": 2.0, "alibi_slopes": np.array([0.5], np.float32), "causal": True, "align": "bottom-right"},
        {"window": (1, 0)},
    ],
)
def test_tiny_cases_against_mpmath(rng, kw):
    """Lq = 3, Lk = 5 in fp32 against the arbitrary-precision oracle (values and lse cotangent)."""
    q, k, v, g, g_lse = _inputs(rng, 1, 3, 5, 1, 1, 16, 16, "fp32")
    out, lse, (dq, dkk, dvv) = _run(q, k, v, g, g_lse, _target_kwargs(kw))
    exact = mp.attention_vjp(q, k, v, g, g_lse=g_lse, **_spec_kwargs(kw))
    sc = _scales(q, k, v, g, g_lse, kw)
    u = U32
    err = np.swapaxes(sc["err"], 1, 2)[..., None]
    _assert_within("out", out, exact.out, (C * u + 2 * err + 5 * U32) * sc["A"])
    _assert_within("lse", lse, exact.lse, sc["err"] + U32 * (np.abs(exact.lse) + 5))
    rel = C * u + 4 * float(sc["err"].max()) + 8 * U32
    for name, got in (("dq", dq), ("dk", dkk), ("dv", dvv)):
        _assert_within(name, got, getattr(exact, name), rel * sc[name])


# ---------------------------------------------------------------- determinism and strided inputs


def test_two_calls_are_bitwise_equal(rng):
    q, k, v, g, g_lse = _inputs(rng, 1, 129, 130, 2, 1, 24, 16, "fp16")
    kw = {"causal": True, "align": "bottom-right", "softcap": 3.0}
    first, second = _run(q, k, v, g, g_lse, kw), _run(q, k, v, g, g_lse, kw)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]], strict=True):
        assert a.tobytes() == b.tobytes()


def test_strided_inputs_give_the_contiguous_result(rng):
    """A transposed view, a slice of a wider buffer and a stride-0 broadcast read like contiguous copies."""
    q = torch.from_numpy(rng.standard_normal((1, 2, 70, 16)).astype(np.float16)).to(DEVICE).transpose(1, 2)
    k = torch.from_numpy(rng.standard_normal((1, 65, 1, 40)).astype(np.float16)).to(DEVICE)[..., 3:19]
    v = torch.from_numpy(rng.standard_normal((1, 1, 1, 16)).astype(np.float16)).to(DEVICE).expand(1, 65, 1, 16)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    got = tf.attention(q, k, v, causal=True)
    want = tf.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert got.cpu().numpy().tobytes() == want.cpu().numpy().tobytes()
    views = [q, k, v]
    for t in views:
        t.requires_grad_()  # the views are leaves themselves (their bases need no grad): strides kept
    grads = []
    for args in (views, [t.detach().contiguous().requires_grad_() for t in views]):
        out = tf.attention(*args, causal=True)
        grads.append(torch.autograd.grad(out.sum(), args))  # out.sum(): a stride-0 cotangent
    for a, b in zip(*grads, strict=True):
        assert a.cpu().numpy().tobytes() == b.cpu().numpy().tobytes()
