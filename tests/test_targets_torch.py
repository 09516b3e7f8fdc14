"""The PyTorch targets against the mpmath oracle, and the torch / numpy adapters.

Error bounds (u: unit roundoff of the input dtype; u_acc: of the accumulation dtype, fp32 for
bf16/fp16/fp32 inputs and fp64 for fp64; Lk keys; Dk head dim):

    forward   |out - out*| <= (C_OUT * u + u_acc * (Lk + 2 * Dk * S)) * A        elementwise
    gradient  |d - d*|     <= (C_GRAD * u' + u_acc * (Lq + Lk + 2 * Dk * S)) * max|d*|   per tensor

(u' = the larger of u and the gradient dtype's unit roundoff: dbias comes in the bias's dtype.)
``A = mp.attention(q, k, |v|).out`` is the absolute-value scale of each output (0 for a row with
no visible key under policy ``zeros``, so such rows must be exactly 0). ``S`` is the largest
logit magnitude ``scale * sum_d |q_d k_d| + |bias|`` over the row's visible keys (over everything
for gradients): ``C * u`` pays the final rounding to the input dtype, ``Lk * u_acc`` the
summations, ``2 * Dk * u_acc * S`` the logit error (each logit loses up to ``Dk * u_acc * S``,
and the output moves by about twice that times A). Observed values are well inside the bounds;
a real bug (a wrong rescaling, an off-by-one chunk end) gives errors of order A.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oracles import mp, spec  # noqa: E402
from verify.case import Case  # noqa: E402
from verify.targets import TargetError, Unsupported, load  # noqa: E402
from verify.targets.base import TargetInfo  # noqa: E402
from verify.targets.numpy_adapter import NumpyAdapter  # noqa: E402
from verify.targets.torch_adapter import TorchAdapter, to_numpy, to_torch  # noqa: E402

C_OUT = 2.0
C_GRAD = 2.0
BF16 = ml_dtypes.bfloat16
DTYPES = {"bf16": BF16, "fp16": np.float16, "fp32": np.float32, "fp64": np.float64}
EXAMPLE = "examples.my_attention:attention"
EXAMPLE_FEATURES = ["mask", "bias", "causal", "chunks"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_root_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``examples`` is imported the way a user's module is: from the working directory."""
    monkeypatch.syspath_prepend(str(ROOT))


def _example(features: list[str]):
    return load(EXAMPLE, framework="torch", features=features)


# ---------------------------------------------------------------- cases and the oracle


def _arr(rng: np.random.Generator, shape: tuple, dtype: object, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def _case(
    seed: int,
    dtype: object,
    *,
    b: int = 1,
    lq: int = 12,
    lk: int = 12,
    hq: int = 2,
    hkv: int = 2,
    dk: int = 8,
    dv: int = 8,
    **params: object,
) -> Case:
    rng = np.random.default_rng(seed)
    return Case(
        q=_arr(rng, (b, lq, hq, dk), dtype),
        k=_arr(rng, (b, lk, hkv, dk), dtype),
        v=_arr(rng, (b, lk, hkv, dv), dtype),
        g=_arr(rng, (b, lq, hq, dv), dtype),
        **params,
    )


def _random_mask(seed: int, shape: tuple, density: float = 0.7) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


@functools.cache
def feature_case(feature: str) -> Case:
    """An ordinary fp32 case exercising one feature (chunk sizes divide the lengths)."""
    if feature == "plain":
        return _case(1, np.float32)
    if feature == "mask":
        mask = _random_mask(2, (2, 1, 12, 12))
        mask[0, 0, 5] = False  # one fully masked row
        return _case(2, np.float32, b=2, mask=mask)
    if feature == "bias":
        rng = np.random.default_rng(3)
        return _case(3, np.float32, bias=_arr(rng, (1, 2, 12, 12), np.float32, 2.0))
    if feature == "causal":
        return _case(4, np.float32, lq=10, lk=12, causal=True)
    if feature == "gqa":
        return _case(5, np.float32, hq=4, hkv=2, dv=6)
    if feature == "chunks":
        return _case(6, np.float32, lq=12, lk=16, query_chunk_size=4, key_chunk_size=8)
    raise KeyError(feature)


_ORACLE: dict[tuple, dict] = {}


def oracle(key: tuple, case: Case, policy: str = "zeros") -> dict:
    """Exact values (mp) and the error scales A and S for a case, cached under ``(key, policy)``."""
    if (key, policy) not in _ORACLE:
        _ORACLE[key, policy] = _oracle_values(case, policy)
    return _ORACLE[key, policy]


def _oracle_values(case: Case, policy: str) -> dict:
    sem = dict(case.semantics(), masked_rows=policy)
    grads = mp.attention_vjp(case.q, case.k, case.v, case.g, **sem)
    scale_abs = mp.attention(case.q, case.k, np.abs(case.v), **sem).out
    att = spec.normalize(case.q, case.k, case.v, **case.semantics())
    q = np.abs(att.q.astype(np.float64))
    k = np.abs(att.k.astype(np.float64))[:, :, att.kv_head]
    s = np.einsum("bihd,bjhd->bhij", q, k) * abs(att.scale_float())
    if att.bias is not None:
        s = s + np.where(att.visible, np.abs(att.bias.astype(np.float64)), 0.0)
    row_s = np.where(att.visible, s, 0.0).max(axis=-1)  # [B, Hq, Lq]
    return {
        "out": grads.out,
        "A": scale_abs,
        "S": np.swapaxes(row_s, 1, 2)[..., None],  # [B, Lq, Hq, 1]
        "dq": grads.dq,
        "dk": grads.dk,
        "dv": grads.dv,
        "dbias": grads.dbias,
    }


def _assert_within(what: str, got: np.ndarray, want: np.ndarray, allow: np.ndarray) -> None:
    got = np.asarray(got).astype(np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite values at {np.argwhere(~np.isfinite(got))[:5].tolist()}"
    err = np.abs(got - want)
    allow = np.broadcast_to(allow, err.shape)
    bad = err > allow
    if bad.any():
        ratio = np.where(allow > 0, err / np.where(allow > 0, allow, 1.0), np.inf)
        i = np.unravel_index(np.argmax(np.where(bad, ratio, -1.0)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} beyond allowance; worst at {list(i)}: got {got[i]!r}, "
            f"exact {want[i]!r}, |err| {err[i]:.3g}, allowance {allow[i]:.3g}"
        )


def check_target(adapter, case: Case, ref: dict, grads: bool = True) -> None:
    """Forward (and gradient) of ``adapter`` on ``case`` within the bounds in the module doc."""
    u = spec.unit_roundoff(case.dtype)
    u_acc = spec.unit_roundoff("fp64" if case.dtype == "fp64" else "fp32")
    d = case.dims
    label = f"{adapter.info.name} {case.dtype} {case.describe()}"
    out = adapter.forward(case).out
    assert spec.dtype_name(out.dtype) == case.dtype, f"{label}: output dtype {out.dtype}"
    allow = (C_OUT * u + u_acc * (d["Lk"] + 2 * d["Dk"] * ref["S"])) * ref["A"]
    _assert_within(f"{label}: out", out, ref["out"], allow)
    if not grads:
        return
    got = adapter.vjp(case)
    s_max = float(ref["S"].max())
    for name in ("dq", "dk", "dv") + (("dbias",) if case.bias is not None else ()):
        want = ref[name]
        scale = np.abs(want).max()
        u_out = max(u, spec.unit_roundoff(got[name].dtype))  # dbias is rounded to the bias's dtype
        allow = (C_GRAD * u_out + u_acc * (d["Lq"] + d["Lk"] + 2 * d["Dk"] * s_max)) * scale
        _assert_within(f"{label}: {name}", got[name], want, allow)


# ---------------------------------------------------------------- every torch target, every declared feature

TARGETS = ("chunked-torch", "torch-sdpa", "mea-torch", "example")
_DECLARED = {
    "chunked-torch": {"mask", "bias", "causal", "gqa", "chunks"},
    "torch-sdpa": {"mask", "bias", "causal", "gqa"},
    "mea-torch": {"mask", "bias", "causal", "chunks"},
    "example": set(EXAMPLE_FEATURES),
}


def _adapter(target: str):
    if target == "example":
        return _example(EXAMPLE_FEATURES + ["grad"])
    return load(target)


MODERN = {"bottom-right", "window", "softcap", "alibi", "sinks", "segments"}  # tests/test_targets_torch_modern.py


def test_declared_features_match_this_file():
    for target in TARGETS:
        assert set(_adapter(target).info.features) - {"grad", "lse"} - MODERN == _DECLARED[target], target


@pytest.mark.parametrize(
    "target,feature",
    [(t, f) for t in TARGETS for f in ["plain", *sorted(_DECLARED[t])]],
)
def test_target_agrees_with_mp_fp32(target: str, feature: str):
    adapter = _adapter(target)
    case = feature_case(feature)
    check_target(adapter, case, oracle(("feature", feature), case, adapter.info.masked_rows))


# ---------------------------------------------------------------- chunked-torch: chunk sizes, masks, dtypes


def _scenario(name: str, dtype_name: str) -> Case:
    dtype = DTYPES[dtype_name]
    if name == "mask+bias":
        # GQA, Lq != Lk, Dk != Dv; mask with fully masked rows and a fully masked key chunk
        # (keys 4..7 for batch 1: chunk 1 when key_chunk_size=4); bias in fp32 with -inf entries,
        # a row that only the bias masks, and a -inf key column.
        lq, lk = 7, 13
        mask = _random_mask(11, (2, 1, lq, lk), 0.8)
        mask[0, 0, 3] = False
        mask[1, 0, :, 4:8] = False
        bias = _arr(np.random.default_rng(12), (1, 4, lq, lk), np.float32, 1.5)
        bias[0, 1, 5] = -np.inf
        bias[0, 2, :, 0] = -np.inf
        return _case(10, dtype, b=2, lq=lq, lk=lk, hq=4, hkv=2, dk=8, dv=5, mask=mask, bias=bias)
    if name == "causal+mask":
        mask = _random_mask(21, (1, 3, 9, 13), 0.75)
        mask[0, 1, 0] = False
        return _case(20, dtype, lq=9, lk=13, hq=3, hkv=1, dk=6, dv=4, mask=mask, causal=True)
    if name == "plain":
        return _case(30, dtype, lq=16, lk=16, hq=2, hkv=2, dk=16, dv=16)
    raise KeyError(name)


def _chunk_configs(lq: int, lk: int) -> list[tuple]:
    return [(1, 1), (3, 4), (lq - 1, lk - 1), (lq, lk), (lq + 5, lk + 7), (None, None), (2, 5)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scenario", ["mask+bias", "causal+mask", "plain"])
def test_chunked_torch_chunk_sizes_dtypes(scenario: str, dtype: str):
    adapter = load("chunked-torch")
    case = _scenario(scenario, dtype)
    ref = oracle(("scenario", scenario, dtype), case)
    d = case.dims
    for qc, kc in _chunk_configs(d["Lq"], d["Lk"]):
        check_target(adapter, case.with_(query_chunk_size=qc, key_chunk_size=kc), ref)


def test_chunked_torch_masked_rows_are_exactly_zero_with_zero_grads():
    adapter = load("chunked-torch")
    case = _scenario("mask+bias", "bf16").with_(query_chunk_size=2, key_chunk_size=4)
    att = spec.normalize(case.q, case.k, case.v, **case.semantics())
    rows = np.swapaxes(att.masked_row, 1, 2)  # [B, Lq, Hq]
    assert rows.sum() >= 3
    out = adapter.forward(case).out.astype(np.float32)
    assert (out[rows] == 0).all()
    dq = adapter.vjp(case)["dq"].astype(np.float32)
    assert (dq[rows] == 0).all() and np.isfinite(dq).all()


def test_chunked_torch_gradient_is_recomputed_not_stored():
    """The autograd graph holds the inputs, output and lse only: no [Lq, Lk] tensor is saved."""
    from verify.targets.chunked_torch import attention

    lq = lk = 256
    q, k, v = (torch.randn(1, lq, 1, 4, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        attention(q, k, v, causal=True, query_chunk_size=16, key_chunk_size=16).sum().backward()
    assert saved and sum(saved) < lq * lk / 8, saved  # inputs + out + lse ~ 4.4k; p would be ~33k


# ---------------------------------------------------------------- torch-sdpa: masked rows and precision


@pytest.mark.parametrize("how", ["bool-mask", "-inf-bias"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_torch_sdpa_masked_rows_zeros_with_zero_grads(how: str, dtype: str):
    case = _case(40, DTYPES[dtype], lq=5, lk=6)
    visible = np.ones((1, 2, 5, 6), dtype=bool)
    visible[0, 1, 2] = False
    if how == "bool-mask":
        case = case.with_(mask=visible)
    else:
        case = case.with_(bias=np.where(visible, 0.0, -np.inf).astype(np.float32))
    adapter = load("torch-sdpa")
    out = adapter.forward(case).out.astype(np.float32)
    assert (out[0, 2, 1] == 0).all() and np.isfinite(out).all()
    grads = adapter.vjp(case)
    for name, g in grads.items():
        assert np.isfinite(g.astype(np.float32)).all(), name
    assert (grads["dq"][0, 2, 1] == 0).all()
    if "dbias" in grads:
        assert (grads["dbias"][0, 1, 2] == 0).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_torch_sdpa_math_keeps_low_precision_in_fp32(dtype: str):
    """The evidence for the contract in torch_sdpa.INFO.notes: one rounding, at the output."""
    from verify.targets.torch_sdpa import attention

    case = _case(50, DTYPES[dtype], lq=32, lk=32, dk=16, dv=16)
    q, k, v = (to_torch(x) for x in (case.q, case.k, case.v))
    low = attention(q, k, v)
    high = attention(q.float(), k.float(), v.float()).to(low.dtype)
    assert torch.equal(low, high)
    ref = oracle(("sdpa-precision", dtype), case)
    u = spec.unit_roundoff(dtype)
    _assert_within("out", to_numpy(low), ref["out"], 1.0 * u * ref["A"])


# ---------------------------------------------------------------- mea-torch: documented defects


def test_mea_torch_masked_row_is_uniform_in_fp32():
    adapter = load("mea-torch")
    case = feature_case("mask").with_(query_chunk_size=4, key_chunk_size=4)
    assert adapter.info.masked_rows == "uniform"
    check_target(adapter, case, oracle(("feature", "mask"), feature_case("mask"), "uniform"))


def test_mea_torch_fp64_masked_key_chunk_gives_nan():
    mask = np.ones((1, 1, 8, 8), dtype=bool)
    mask[..., :4] = False  # first key chunk masked in every row; rows stay visible
    case = _case(60, np.float64, lq=8, lk=8, mask=mask, query_chunk_size=4, key_chunk_size=4)
    out = load("mea-torch").forward(case).out
    assert np.isnan(out).all()
    fp32 = load("mea-torch").forward(_case(60, np.float32, lq=8, lk=8, mask=mask, query_chunk_size=4,
                                           key_chunk_size=4)).out
    assert np.isfinite(fp32).all()


def test_mea_torch_neg_inf_bias_key_chunk_gives_nan():
    bias = np.zeros((1, 1, 8, 8), dtype=np.float32)
    bias[..., 4:] = -np.inf
    case = _case(61, np.float32, lq=8, lk=8, bias=bias, query_chunk_size=4, key_chunk_size=4)
    assert np.isnan(load("mea-torch").forward(case).out).all()
    assert np.isfinite(load("chunked-torch").forward(case).out).all()


def test_mea_torch_non_divisor_chunks_are_wrong():
    adapter = load("mea-torch")
    case = feature_case("chunks")  # Lq=12, Lk=16
    out = adapter.forward(case.with_(query_chunk_size=5, key_chunk_size=8)).out
    assert out.shape[1] == 15  # ceil(12 / 5) * 5 rows: the clamped last chunk repeats rows 7..11
    ref = oracle(("feature", "chunks"), case)
    out = adapter.forward(case.with_(query_chunk_size=4, key_chunk_size=6)).out.astype(np.float64)
    # keys 10 and 11 are counted twice: the last key chunk is clamped to 10..15
    assert np.abs(out - ref["out"]).max() > 0.01 * ref["A"].max()


def test_mea_torch_rejects_other_scales():
    case = feature_case("plain").with_(scale=0.5)
    with pytest.raises(Unsupported, match="1/sqrt"):
        load("mea-torch").forward(case)
    ok = feature_case("plain").with_(scale=1 / math.sqrt(8))
    assert load("mea-torch").forward(ok).out.shape == ok.q.shape


# ---------------------------------------------------------------- the adapters


@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_round_trip_is_exact_for_every_bit_pattern(dtype):
    bits = np.arange(2**16, dtype=np.uint16).view(dtype)
    bits = bits[~np.isnan(bits.astype(np.float32))]
    t = to_torch(bits)
    assert t.dtype == {BF16: torch.bfloat16, np.float16: torch.float16}[dtype]
    back = to_numpy(t)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.view(np.uint16), bits.view(np.uint16))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_output_and_gradient_dtypes_are_preserved(dtype: str):
    adapter = load("chunked-torch")
    case = _case(70, DTYPES[dtype], lq=4, lk=5, bias=np.zeros((4, 5), dtype=np.float32))
    assert spec.dtype_name(adapter.forward(case).out.dtype) == dtype
    grads = adapter.vjp(case)
    assert {n: spec.dtype_name(g.dtype) for n, g in grads.items()} == {
        "dq": dtype,
        "dk": dtype,
        "dv": dtype,
        "dbias": "fp32",
    }


def test_unsupported_when_a_case_uses_an_undeclared_feature_or_dtype():
    gqa = feature_case("gqa")
    with pytest.raises(Unsupported, match="gqa"):
        load("mea-torch").forward(gqa)
    no_bias = _example(["mask"])
    with pytest.raises(Unsupported, match="bias"):
        no_bias.forward(feature_case("bias"))
    with pytest.raises(Unsupported, match="causal"):
        no_bias.forward(feature_case("causal"))
    with pytest.raises(Unsupported, match="grad"):
        no_bias.vjp(feature_case("plain"))
    with pytest.raises(Unsupported, match="fp64"):
        no_bias.forward(_case(71, np.float64))


def test_example_user_target_loads_with_flags_only():
    adapter = _example(EXAMPLE_FEATURES)
    assert isinstance(adapter, TorchAdapter)
    assert adapter.info.framework == "torch" and set(adapter.info.features) == set(EXAMPLE_FEATURES)
    assert "gqa" in adapter.info.unexercised() and "grad" in adapter.info.unexercised()
    case = feature_case("causal").with_(query_chunk_size=3)
    check_target(adapter, case, oracle(("feature", "causal"), feature_case("causal")), grads=False)


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("no-such-target", {"framework": "torch"}, "unknown target 'no-such-target'"),
        ("no_such_module_xyz:attention", {"framework": "torch"}, "cannot import module 'no_such_module_xyz'"),
        ("examples.my_attention:nope", {"framework": "torch"}, "no attribute 'nope'"),
        (EXAMPLE, {}, "--framework"),
        (EXAMPLE, {"framework": "torch", "features": ["flash"]}, "unknown features"),
        ("chunked-torch", {"framework": "torch"}, "bundled"),
    ],
)
def test_load_errors_name_the_problem(name: str, kwargs: dict, message: str):
    with pytest.raises(TargetError, match=message.replace("(", r"\(")):
        load(name, **kwargs)


def test_cuda_target_unavailable_without_cuda():
    info = TargetInfo(name="t", framework="torch", device="cuda")
    reason = TorchAdapter(lambda *a, **k: None, info).unavailable_reason()
    assert (reason is None) == torch.cuda.is_available()
    if reason is not None:
        assert "cuda" in reason


def _numpy_attention(q, k, v, *, scale=None):
    """A float64 numpy reference (no mask, equal heads) used to exercise NumpyAdapter."""
    s = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64))
    s *= 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, v.astype(np.float64)).astype(q.dtype)


def test_numpy_adapter_forward_and_vjp_attribute():
    info = TargetInfo(name="np-ref", framework="numpy", features=frozenset({"grad"}))
    case = feature_case("plain")
    ref = oracle(("feature", "plain"), case)
    fn = functools.partial(_numpy_attention)
    adapter = NumpyAdapter(fn, info)
    out = adapter.forward(case).out
    assert out.dtype == np.float32
    _assert_within("numpy out", out, ref["out"], (C_OUT * 2.0**-24 + 2.0**-40) * ref["A"])
    with pytest.raises(Unsupported, match="vjp"):
        adapter.vjp(case)
    calls = []

    def vjp(q, k, v, g, **kw):
        calls.append(kw)
        return {"dq": np.zeros_like(q), "dk": np.zeros_like(k), "dv": np.ones_like(v)}

    fn.vjp = vjp
    grads = adapter.vjp(case)
    assert calls == [{"scale": None}] and (grads["dv"] == 1).all()
