"""torch-sdpa (bottom-right), torch-sdpa-flash and torch-flex: every declared feature against the exact values,
the evidence behind each declaration, and short campaigns.

Small cases go through ``_exact_check``: the mp oracle decides (``verify.truth.decide`` with ``mp_max_len``), then
the same judge as ``verify.checks.run_case`` (forward, lse, gradients, determinism, masked rows). Cases beyond a
tile of the flash kernel (Lq around 192 / 768, Lk around 512) go through ``run_case`` itself, which takes its
exact values from the certified float64 reference there.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from oracles import naive, spec  # noqa: E402
from verify import checks, fuzz  # noqa: E402
from verify.case import Case  # noqa: E402
from verify.execution import InProcess  # noqa: E402
from verify.targets import (  # noqa: E402
    adapter_for,  # noqa: E402
    torch_flex,
    torch_sdpa,
    torch_sdpa_flash,
)
from verify.targets.base import Unsupported  # noqa: E402
from verify.targets.torch_adapter import to_torch  # noqa: E402
from verify.truth import decide  # noqa: E402

ATEN_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
LOW = ("fp32", "bf16", "fp16")
needs_math = pytest.mark.skipif(torch_sdpa.BACKEND != "math", reason="torch-sdpa evidence is for the math backend")
needs_eager = pytest.mark.skipif(torch_flex.MODE != "eager", reason="torch-flex evidence is for its eager mode")


@functools.cache
def _adapter(name: str):
    module = {"sdpa": torch_sdpa, "flash": torch_sdpa_flash, "flex": torch_flex}[name]
    return adapter_for(module.attention, module.INFO)


def _report(out: checks.Outcome) -> str:
    return "\n\n".join(f.message() for f in out.findings)


def _exact_check(adapter, case: Case, *, declined: bool = False) -> checks.Outcome:
    """``run_case`` with the mp oracle deciding: no finding, and a decline only where expected."""
    info = adapter.info
    passes = checks.passes_for(info, case, checks.CHECKS)
    truth = decide(case, info, any(p.startswith("grad") for p in passes), mp_max_len=10**6)
    assert truth.exact.reference == "mp"
    calls = InProcess(adapter).run(case, passes, checks.DEFAULT_TIMEOUT)
    out = checks.judge(info, case, truth.exact, truth.allow, calls)
    assert out.findings == [], _report(out)
    assert bool(out.declined) == declined, out.declined
    return out


def _run(adapter, case: Case, *, declined: bool = False) -> checks.Outcome:
    out = checks.run_case(adapter, case)
    assert out.findings == [], _report(out)
    assert bool(out.declined) == declined, out.declined
    return out


def _case(seed: int, dtype: str, *, b: int = 2, lq: int = 7, lk: int = 9, hq: int = 2, hkv: int = 1, dk: int = 8,
          dv: int = 8, grad: bool = True, lse: bool = False, bias: bool = False, mask: float | None = None,
          sigma: float = 1.0, **params: object) -> Case:
    rng = np.random.default_rng(seed)
    dt = spec.as_dtype(dtype)

    def arr(*shape: int, s: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32).astype(dt)

    kw = dict(params)
    if bias:
        kw["bias"] = arr(1, hq, lq, lk)
    if mask is not None:
        kw["mask"] = rng.random((b, 1, lq, lk)) < mask
    return Case(arr(b, lq, hq, dk, s=sigma), arr(b, lk, hkv, dk, s=sigma), arr(b, lk, hkv, dv),
                g=arr(b, lq, hq, dv) if grad else None,
                g_lse=rng.standard_normal((b, hq, lq)).astype(np.float64 if dtype == "fp64" else np.float32)
                if lse else None, **kw)


def _sdpa(backend, q, k, v, **kw):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _campaign(adapter, tmp_path, max_len: int, n: int = 40):
    camp = fuzz.run(adapter, fuzz.Settings(database=None, repro_dir=tmp_path, max_examples=n, isolate=False,
                                           max_len=max_len, seed=1))
    assert camp.findings == [], "\n\n".join(f.message() for f in camp.findings)
    assert camp.examples == {d: n for d in fuzz.Settings().dtypes}
    return camp


# ---------------------------------------------------------------- torch-sdpa: bottom-right


def test_sdpa_declares_bottom_right():
    assert torch_sdpa.INFO.features == {"mask", "bias", "causal", "gqa", "grad", "bottom-right"}


def test_causal_lower_right_is_the_spec_triangle_and_warns_for_lq_above_lk():
    from torch.nn.attention.bias import causal_lower_right

    for lq, lk in ((3, 7), (7, 3), (5, 5)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tri = causal_lower_right(lq, lk)._materialize()
        want = spec.position_visible(lq, lk, spec.offset(lq, lk, "bottom-right"), causal=True)
        assert np.array_equal(tri.numpy(), want)
        assert any("will produce NaNs" in str(w.message) for w in caught) == (lq > lk)


@needs_math
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize(("lq", "lk"), [(5, 9), (9, 5), (7, 7)])
@pytest.mark.parametrize("extra", ["alone", "mask", "bias"])
def test_sdpa_bottom_right_against_mp(dtype, lq, lk, extra):
    case = _case(lq * 10 + lk, dtype, lq=lq, lk=lk, causal=True, align="bottom-right", bias=extra == "bias",
                 mask=0.8 if extra == "mask" else None)
    _exact_check(_adapter("sdpa"), case)


@needs_math
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sdpa_bottom_right_empty_rows_are_zero_not_nan(dtype):
    """Lq > Lk: the first Lq - Lk rows see no key. causal_lower_right warns of NaNs; the math backend gives 0."""
    case = _case(3, dtype, lq=9, lk=5, causal=True, align="bottom-right")
    adapter = _adapter("sdpa")
    out = adapter.forward(case).out.astype(np.float32)
    assert (out[:, :4] == 0).all() and np.isfinite(out).all() and (out[:, 4:] != 0).any()
    grads = adapter.vjp(case)
    assert all(np.isfinite(g.astype(np.float32)).all() for g in grads.values())
    assert (grads["dq"][:, :4].astype(np.float32) == 0).all()
    _exact_check(adapter, case)


@needs_math
def test_sdpa_campaign(tmp_path):
    _campaign(_adapter("sdpa"), tmp_path, max_len=64)


# ---------------------------------------------------------------- torch-sdpa-flash: which kernel, what it takes


def _bhld(case: Case):
    return [to_torch(x).transpose(1, 2) for x in (case.q, case.k, case.v)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp64"])
def test_flash_kernel_is_the_one_that_runs(dtype):
    """Bitwise equal to aten::_scaled_dot_product_flash_attention_for_cpu, and not to the math backend."""
    differs_from_math = False
    for lq, lk, how in ((7, 9, "plain"), (200, 600, "mask"), (800, 513, "causal"), (50, 70, "gqa")):
        case = _case(lq + lk, dtype, b=1, lq=lq, lk=lk, hq=4 if how == "gqa" else 2, hkv=2, dk=16, dv=16,
                     causal=how == "causal", mask=0.7 if how == "mask" else None)
        q, k, v = _bhld(case)
        ours = torch_sdpa_flash.attention(*(to_torch(x) for x in (case.q, case.k, case.v)),
                                          mask=None if case.mask is None else to_torch(case.mask),
                                          causal=case.causal).transpose(1, 2)
        kw = {}
        if case.mask is not None:
            fdt = torch.float64 if dtype == "fp64" else torch.float32
            kw["attn_mask"] = torch.zeros(case.mask.shape, dtype=fdt).masked_fill(~to_torch(case.mask), -math.inf)
        if how == "gqa":
            k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        direct = ATEN_FLASH(q, k, v, is_causal=case.causal, **kw)[0]
        assert torch.equal(ours, direct), (lq, lk, how)
        math_out = _sdpa(SDPBackend.MATH, q, k, v, is_causal=case.causal, **kw)
        differs_from_math |= not torch.equal(ours, math_out)
    assert differs_from_math


def test_flash_key_tiles_are_512_and_probabilities_are_rounded():
    """Two visible keys per row, the larger logit second. When the pair straddles a key-tile boundary, each tile's
    probability is exp(0) = 1 and only the fp32 rescale carries the first key's weight; inside one tile that weight
    is exp(s_a - s_b) rounded to bf16 before P @ V. The kernel's rows match the first picture exactly at 512 and
    1024, the second at every other candidate boundary."""
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    lq, lk, d = 256, 1100, 16
    bounds = (128, 256, 384, 512, 640, 768, 896, 1024)
    q = np.abs(rng.standard_normal((lq, d))).astype(bf16)
    k = rng.standard_normal((lk, d)).astype(bf16)
    v = np.zeros((lk, d), bf16)
    mask = np.zeros((len(bounds), lq, lk), bool)
    for h, b in enumerate(bounds):
        k[b] = (k[b - 1].astype(np.float32) + rng.random(d).astype(np.float32) * 0.5).astype(bf16)  # s_b > s_a
        v[b - 1] = 1
        mask[h, :, [b - 1, b]] = True

    def heads(x: np.ndarray) -> torch.Tensor:
        return to_torch(x)[None, None].expand(1, len(bounds), *x.shape)

    out = _sdpa(SDPBackend.FLASH_ATTENTION, heads(q), heads(k), heads(v),
                attn_mask=torch.from_numpy(mask)[None])[0, :, :, 0].float().numpy()
    s = (q.astype(np.float32) @ k.astype(np.float32).T) * np.float32(1 / math.sqrt(d))
    for h, b in enumerate(bounds):
        e = np.exp(s[:, b - 1] - s[:, b]).astype(np.float32)
        r = (np.float32(1) / (np.float32(1) + e)).astype(np.float32)
        split = (e * r).astype(bf16).astype(np.float32)
        same = (e.astype(bf16).astype(np.float32) * r).astype(bf16).astype(np.float32)
        tell = split != same
        assert tell.mean() > 0.1, b  # rows where the two pictures differ
        want, other = (split, same) if b % 512 == 0 else (same, split)
        assert (out[h] == want)[tell].mean() >= 0.9, b
        assert (out[h] == other)[tell].mean() <= 0.1, b


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_flash_precision_beyond_one_output_rounding(dtype):
    """Rounded probabilities cost more than the output's single rounding (<= 1 u*A), logits stay unrounded."""
    case = _case(7, dtype, b=1, lq=1024, lk=1024, hq=2, hkv=2, dk=32, dv=32, sigma=3.0, grad=False)
    got = _adapter("flash").forward(case).out.astype(np.float64)
    exact = naive.attention(case.q, case.k, case.v).out
    scale = spec.unit_roundoff(dtype) * naive.attention(case.q, case.k, np.abs(case.v)).out
    rounded_logits = naive.attention(case.q, case.k, case.v, dtype=dtype, round_logits=True, round_probs=True)
    err = np.abs(got - exact) / scale
    assert 1.05 < err.max() < 2.0, err.max()
    assert err.max() < 0.1 * (np.abs(rounded_logits.out.astype(np.float64) - exact) / scale).max()


def test_flash_declines_what_it_cannot_take():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with pytest.raises(RuntimeError, match="No available kernel"):
        _sdpa(SDPBackend.FLASH_ATTENTION, q, k, torch.randn(1, 2, 8, 3))  # Dk != Dv
    with pytest.raises(RuntimeError, match="No available kernel"):  # a float mask that requires grad
        _sdpa(SDPBackend.FLASH_ATTENTION, q.requires_grad_(), k, v, attn_mask=torch.randn(8, 8, requires_grad=True))
    assert torch_sdpa_flash.INFO.constraints == {"dk=dv"}
    assert torch_sdpa_flash.INFO.features == {"mask", "bias", "causal", "bottom-right", "gqa", "grad"}
    dkdv = _case(1, "fp32", dv=5)
    assert checks.run_case(_adapter("flash"), dkdv).declined
    with pytest.raises(Unsupported):
        _adapter("flash").vjp(_case(2, "fp32", bias=True))


FLASH_FEATURES = {
    "plain": {},
    "mask": {"mask": 0.7},
    "causal": {"causal": True},
    "bottom-right": {"causal": True, "align": "bottom-right"},
    "bottom-right+mask": {"causal": True, "align": "bottom-right", "mask": 0.8},
    "causal+mask": {"causal": True, "mask": 0.8},
    "scale": {"scale": 0.3},
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("name", sorted(FLASH_FEATURES))
@pytest.mark.parametrize(("lq", "lk"), [(7, 9), (9, 5)])
def test_flash_features_against_mp(dtype, name, lq, lk):
    """GQA everywhere (Hq=2, Hkv=1); Lq > Lk with bottom-right leaves rows with no visible key."""
    _exact_check(_adapter("flash"), _case(len(name) + lq, dtype, lq=lq, lk=lk, **FLASH_FEATURES[name]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_flash_bias_forward_against_mp_and_its_gradient_declines(dtype):
    case = _case(11, dtype, bias=True, causal=True, mask=0.8)
    out = _exact_check(_adapter("flash"), case, declined=True)
    assert "no gradient for a float attn_mask" in out.declined
    assert out.ratios.get("out") is not None and "dq" not in out.ratios


@pytest.mark.parametrize(("lq", "lk", "opts"), [
    (191, 511, {"causal": True}), (192, 512, {"mask": 0.7}), (193, 513, {"causal": True, "align": "bottom-right"}),
    (767, 513, {}), (769, 512, {"causal": True, "mask": 0.9}), (64, 1025, {"causal": True, "align": "bottom-right"}),
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_flash_tile_boundaries(lq, lk, opts, dtype):
    case = _case(lq + lk, dtype, b=1, lq=lq, lk=lk, hq=2, hkv=1, dk=16, dv=16, **opts)
    assert _run(_adapter("flash"), case).reference.startswith("naive64")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_flash_mask_hiding_old_tokens_n640_has_no_nan(dtype):
    """pytorch/pytorch#127055: n = 640, each token sees itself and the 9 before it; rows past 512 see nothing in
    the first key tile. NaN rows in torch 2.3; in torch 2.13 every row is finite and correct."""
    n = 640
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    case = _case(640, dtype, b=1, lq=n, lk=n, hq=1, hkv=1, dk=4, dv=4).with_(mask=(d >= 0) & (d < 10))
    out = _run(_adapter("flash"), case)
    assert out.ratios["out"] is not None
    assert np.isfinite(_adapter("flash").forward(case).out.astype(np.float32)).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_flash_fully_masked_rows_are_zero_with_zero_grads(dtype):
    case = _case(5, dtype, b=1, lq=40, lk=600, hq=2, hkv=2, mask=0.5)
    mask = case.mask.copy()
    mask[0, 0, 3] = False  # a whole row
    mask[0, 0, 10:20, :512] = False  # the first key tile of some rows
    case = case.with_(mask=mask)
    adapter = _adapter("flash")
    assert (adapter.forward(case).out[0, 3].astype(np.float32) == 0).all()
    assert (adapter.vjp(case)["dq"][0, 3].astype(np.float32) == 0).all()
    _run(adapter, case)


def test_flash_campaign(tmp_path):
    camp = _campaign(_adapter("flash"), tmp_path, max_len=1100)
    declined = {why for reasons in camp.declined.values() for why in reasons}
    assert declined <= {"SDPA's CPU flash kernel has no gradient for a float attn_mask (bias): 'No available kernel'"}


# ---------------------------------------------------------------- torch-flex


def test_flex_declarations():
    info = torch_flex.INFO
    assert info.features == {"mask", "bias", "causal", "bottom-right", "window", "softcap", "alibi", "segments",
                             "gqa"} | ({"lse"} if torch_flex.MODE == "eager" else set())
    assert "grad" not in info.features and "sinks" not in info.features  # no CPU backward; no way to add a sink
    assert info.masked_rows == "zeros" and info.empty_lse is None  # out 0, lse -inf


def test_flex_has_no_backward_on_cpu():
    q, k, v = (torch.randn(1, 6, 2, 4, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        torch_flex.attention(q, k, v, causal=True).sum().backward()


FLEX_OPTIONS = {
    "plain": {},
    "mask": {"mask": 0.7},
    "bias": {"bias": True},
    "causal": {"causal": True},
    "bottom-right": {"causal": True, "align": "bottom-right"},
    "window": {"window": (2, 1)},
    "window-left": {"window": (1, None), "causal": True},
    "window-right-beyond": {"window": (None, 40), "align": "bottom-right"},
    "softcap-1": {"softcap": 1.0},
    "softcap-50": {"softcap": 50.0},
    "alibi": {"alibi": (2,)},
    "alibi-batch": {"alibi": (2, 2)},
    "segments": {"segments": True},
    "scale": {"scale": 0.3},
    "everything": {"causal": True, "align": "bottom-right", "window": (3, 2), "softcap": 20.0, "alibi": (2,),
                   "segments": True, "bias": True, "mask": 0.9, "scale": 0.5},
}


def _flex_case(name: str, dtype: str, lq: int, lk: int) -> Case:
    opts = dict(FLEX_OPTIONS[name])
    seed = sum(map(ord, name)) + lq * lk
    rng = np.random.default_rng(seed)
    extra = {}
    if "alibi" in opts:
        extra["alibi_slopes"] = (rng.random(opts.pop("alibi")) * 0.3).astype(np.float32)
    if opts.pop("segments", False):
        extra["q_segment_ids"] = np.repeat(np.arange(lq)[None] * 3 // lq, 2, axis=0).astype(np.int32)
        extra["kv_segment_ids"] = np.repeat(np.arange(lk)[None] * 3 // lk, 2, axis=0).astype(np.int32)
    return _case(seed, dtype, lq=lq, lk=lk, grad=False, lse=True, **opts, **extra)


@needs_eager
@pytest.mark.parametrize("name", sorted(FLEX_OPTIONS))
@pytest.mark.parametrize(("lq", "lk"), [(7, 7), (3, 11), (11, 3)])
def test_flex_options_against_mp(name, lq, lk):
    _exact_check(_adapter("flex"), _flex_case(name, "fp32", lq, lk))


@needs_eager
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp64"])
@pytest.mark.parametrize("name", ["everything", "plain", "softcap-1", "alibi-batch"])
def test_flex_in_each_dtype_against_mp(name, dtype):
    _exact_check(_adapter("flex"), _flex_case(name, dtype, 9, 13))


@needs_eager
def test_flex_lse_is_natural_log_in_fp32():
    q, k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    out, lse = torch_flex.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True)
    natural = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 10)
    assert torch.allclose(lse, natural, rtol=0, atol=1e-5)
    assert not torch.allclose(lse, natural / math.log(2), atol=0.1)


@needs_eager
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_flex_empty_rows_give_zero_and_minus_inf(dtype):
    case = _case(9, dtype, lq=9, lk=5, grad=False, lse=True, causal=True, align="bottom-right", mask=0.9, bias=True)
    mask, bias = case.mask.copy(), case.bias.copy()
    mask[1, 0, 6] = False  # an all-False mask row
    bias[0, 1, 7] = -np.inf  # a row the bias hides
    case = case.with_(mask=mask, bias=bias)
    res = _adapter("flex").forward(case)
    empty = spec.normalize(case.q, case.k, case.v, **case.semantics()).empty_row  # [B, Hq, Lq]
    assert empty[:, :, :4].all() and empty[1, :, 6].all() and empty[:, 1, 7].all()
    assert (res.out.astype(np.float32)[np.swapaxes(empty, 1, 2)] == 0).all()
    assert (res.lse[empty] == -np.inf).all() and np.isfinite(res.lse[~empty]).all()
    _exact_check(_adapter("flex"), case)


@needs_eager
def test_flex_probabilities_rounded_to_the_input_dtype():
    """The contract: bitwise the plain emulation with fp32 scores, unrounded logits, rounded probabilities."""
    case = _case(4, "bf16", b=1, lq=64, lk=64, hq=2, hkv=2, dk=32, dv=32, sigma=3.0, grad=False)
    got = _adapter("flex").forward(case).out.astype(np.float32)
    emu = naive.attention(case.q, case.k, case.v, dtype="bf16", round_logits=False, round_probs=True).out
    assert (got == emu.astype(np.float32)).mean() > 0.99


@needs_eager
def test_flex_target_is_bitwise_the_plain_flex_call():
    """The target runs flex's math_attention without dynamo's trace; the plain call (dynamo-traced mods) agrees."""
    from torch.nn.attention import flex_attention as flex_module

    adapter = _adapter("flex")
    for name, dtype in (("everything", "fp32"), ("everything", "bf16"), ("mask", "fp16"), ("alibi-batch", "fp64")):
        case = _flex_case(name, dtype, 9, 13)
        fast = adapter.forward(case)
        assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is False  # restored after the call
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch_flex, "_untraced", contextlib.nullcontext)
                plain = adapter.forward(case)
        assert np.array_equal(fast.out.astype(np.float64), plain.out.astype(np.float64)), name
        assert np.array_equal(fast.lse, plain.lse), name


@needs_eager
def test_flex_campaign(tmp_path):
    _campaign(_adapter("flex"), tmp_path, max_len=128)
