"""The bundled JAX targets against the mpmath oracle, through the JAX adapter.

Error bounds (u = unit roundoff of the input dtype; ``A`` = ``mp.attention(q, k, |v|).out``, the
same attention on absolute values, elementwise):

- forward, ordinary fp32 inputs, any target: ``|out - exact| <= 16 u A`` (``SMOKE_C``; measured up
  to 3.5 u A on these shapes);
- forward, chunked-jax, every dtype: ``|out - exact| <= 8 u A`` (``CHUNKED_C``; measured up to
  3.8 u A in fp32 and 1 u A in bf16/fp16, where float32 statistics leave only the final rounding);
- gradients: ``max |grad - exact| <= 32 u max |exact|`` per tensor (``GRAD_C``; measured up to
  9.5); the exact gradients cancel (``p (dp - delta)``), so an elementwise absolute-value scale is
  not available from the oracle and the tensor's max is the scale.
- fully masked rows (chunked-jax, policy ``zeros``): output and dq rows exactly 0, nothing NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from oracles import mp, spec
from verify.case import Case
from verify.targets import load
from verify.targets.base import TargetInfo, Unsupported
from verify.targets.jax_adapter import JaxAdapter

SMOKE_C = 16
CHUNKED_C = 8
GRAD_C = 32
TARGETS = ("chunked-jax", "paper-jax", "jax-dpa", "mea-jax")
SMOKE_FEATURES = ("plain", "mask", "bias", "causal", "gqa", "chunks")
DT = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def make_case(rng: np.random.Generator, *, dtype: str = "fp32", b: int = 2, lq: int = 8, lk: int = 8,
              hq: int = 2, hkv: int = 2, dk: int = 8, dv: int = 4, **params: object) -> Case:
    """Normal q, k, v and g of one dtype (exact in every wider format)."""
    dt = DT[dtype]

    def draw(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dt)

    return Case(q=draw(b, lq, hq, dk), k=draw(b, lk, hkv, dk), v=draw(b, lk, hkv, dv), g=draw(b, lq, hq, dv),
                **params)


def check(adapter: object, case: Case, out_c: float, grad_c: float | None = GRAD_C, masked_rows: str = "zeros",
          logit_err: float = 0.0) -> None:
    """Forward within ``(out_c u + 2 logit_err) A`` elementwise, gradients within ``grad_c u max|exact|``.

    ``logit_err`` is an absolute error the logits may carry (0 on ordinary inputs); softmax turns it
    into at most ``2 logit_err A`` in the output. ``grad_c=None`` skips the gradients.
    """
    sem = case.semantics()
    u = spec.unit_roundoff(case.dtype)
    exact = mp.attention_vjp(case.q, case.k, case.v, case.g, masked_rows=masked_rows, **sem)
    scale_a = mp.attention(case.q, case.k, np.abs(case.v), masked_rows=masked_rows, **sem).out
    out = adapter.forward(case).out
    assert out.dtype == case.q.dtype, f"output dtype {out.dtype} != input dtype {case.q.dtype}"
    assert out.shape == exact.out.shape
    err = np.abs(out.astype(np.float64) - exact.out)
    allowed = (out_c * u + 2 * logit_err) * scale_a
    worst = np.unravel_index(np.argmax(err - allowed), err.shape)
    assert (err <= allowed).all(), (
        f"forward {case.describe()}: worst {worst} got {out[worst]} exact {exact.out[worst]}, "
        f"allowed {allowed[worst]:.3g} = ({out_c} u + 2 * {logit_err:.3g}) A"
    )
    if grad_c is None:
        return
    for name, got in adapter.vjp(case).items():
        want = getattr(exact, name)
        assert got.dtype == (case.bias.dtype if name == "dbias" else case.q.dtype)
        assert np.isfinite(got.astype(np.float64)).all(), f"{name} not finite"
        gerr = np.abs(got.astype(np.float64) - want).max()
        allowed = grad_c * u * np.abs(want).max()
        assert gerr <= allowed, f"{name} {case.describe()}: error {gerr:.3g} > {grad_c} u max|exact| = {allowed:.3g}"


def smoke_case(rng: np.random.Generator, feature: str) -> Case:
    if feature == "mask":
        mask = rng.random((2, 1, 8, 8)) < 0.7
        mask[..., np.arange(8), np.arange(8)] = True  # no fully masked row: every policy agrees
        return make_case(rng, mask=mask, mask_kind="random")
    if feature == "bias":
        return make_case(rng, bias=rng.standard_normal((1, 2, 8, 8)).astype(np.float32))
    if feature == "causal":
        return make_case(rng, causal=True)
    if feature == "gqa":
        return make_case(rng, hq=4, hkv=2)
    if feature == "chunks":
        return make_case(rng, query_chunk_size=4, key_chunk_size=2)
    return make_case(rng)


@pytest.mark.parametrize("name", TARGETS)
def test_every_declared_feature_matches_mp(name: str, rng: np.random.Generator) -> None:
    adapter = load(name)
    declared = [f for f in SMOKE_FEATURES if f == "plain" or f in adapter.info.features]
    assert "grad" in adapter.info.features
    for feature in declared:
        check(adapter, smoke_case(rng, feature), SMOKE_C)


# chunked-jax: Lq=7, Lk=10 (Lq != Lk); chunk sizes 1, non-divisors, equal to and larger than L, default.
CHUNKS = [(1, 1), (3, 4), (7, 10), (9, 16), (None, None)]


def masked_case(rng: np.random.Generator, dtype: str, qc: int | None, kc: int | None) -> Case:
    """GQA, Dk != Dv, a fully masked row (by mask), one (by -inf bias), and a fully masked key chunk."""
    mask = rng.random((2, 4, 7, 10)) < 0.8
    mask[0, 1, 3, :] = False  # fully masked row
    mask[1, :, :, 4:8] = False  # the key chunk [4, 8) of key chunk size 4, in visible rows
    bias = rng.standard_normal((2, 1, 7, 10)).astype(DT[dtype])
    bias[1, 0, 5, :] = -np.inf  # fully masked row, by bias, in every head
    bias[0, 0, :, 0] = -np.inf
    return make_case(rng, dtype=dtype, lq=7, lk=10, hq=4, hkv=2, dk=6, dv=5, mask=mask, bias=bias,
                     query_chunk_size=qc, key_chunk_size=kc, mask_kind="rows+key-chunk")


def causal_case(rng: np.random.Generator, dtype: str, qc: int | None, kc: int | None) -> Case:
    bias = rng.standard_normal((1, 4, 1, 10)).astype(DT[dtype])
    return make_case(rng, dtype=dtype, lq=7, lk=10, hq=4, hkv=1, dk=6, dv=5, bias=bias, causal=True,
                     query_chunk_size=qc, key_chunk_size=kc, mask_kind="causal")


@pytest.fixture(scope="module")
def chunked() -> object:
    return load("chunked-jax")


@pytest.mark.parametrize("qc,kc", CHUNKS)
@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_chunked_any_chunks_fp32(chunked: object, rng: np.random.Generator, kind: str, qc: int, kc: int) -> None:
    build = masked_case if kind == "masked" else causal_case
    case = build(rng, "fp32", qc, kc)
    check(chunked, case, CHUNKED_C)
    if kind == "masked":
        assert_zero_rows(chunked, case)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_chunked_low_precision(chunked: object, rng: np.random.Generator, kind: str, dtype: str) -> None:
    build = masked_case if kind == "masked" else causal_case
    case = build(rng, dtype, 3, 4)
    check(chunked, case, CHUNKED_C)
    if kind == "masked":
        assert_zero_rows(chunked, case)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_chunked_statistics_are_fp32_on_long_rows(chunked: object, rng: np.random.Generator, dtype: str) -> None:
    """1024 key chunks of 1 key, positive values (no cancellation to hide behind): running sums kept in
    bf16/fp16 drift by tens of u A (measured 16-19 u A at 384 keys); float32 ones stay below 1 u A."""
    case = make_case(rng, dtype=dtype, b=1, lq=3, lk=1024, hq=1, hkv=1, dk=4, dv=4, query_chunk_size=3,
                     key_chunk_size=1)
    check(chunked, case.with_(v=(np.abs(case.v.astype(np.float32)) + 1).astype(DT[dtype])), CHUNKED_C)


def assert_zero_rows(adapter: object, case: Case) -> None:
    """Policy ``zeros``: rows with no visible key give exactly 0 output and 0 dq."""
    rows = spec.normalize(case.q, case.k, case.v, **case.semantics()).masked_row  # [B, Hq, Lq]
    assert rows.any()
    b, h, i = np.nonzero(rows)
    assert (adapter.forward(case).out[b, i, h] == 0).all()
    assert (adapter.vjp(case)["dq"][b, i, h] == 0).all()


def test_chunked_large_logits_do_not_overflow(chunked: object, rng: np.random.Generator) -> None:
    """Logits up to ~1e4 (exp overflows fp32 past ~88.7), non-dividing chunks: finite and accurate.

    Float32 logits of that size carry an absolute error up to Dk u32 max(scale sum|q||k|): charged.
    """
    case = make_case(rng, lq=5, lk=10, query_chunk_size=2, key_chunk_size=4)
    case = case.with_(q=case.q * np.float32(64), k=case.k * np.float32(64))
    q, k = case.q.astype(np.float64), case.k.astype(np.float64)
    biggest = np.einsum("bqhd,bkhd->bhqk", np.abs(q), np.abs(k)).max() / math.sqrt(q.shape[-1])
    assert biggest > 1e3
    check(chunked, case, CHUNKED_C, grad_c=None, logit_err=q.shape[-1] * spec.unit_roundoff("fp32") * biggest)


# paper-jax: the published listing's behaviour.


def _double_counted(case: Case) -> np.ndarray:
    """The listing's output predicted in float64: keys weighted by how many clamped chunks read them."""
    lk, c = case.k.shape[1], case.key_chunk_size
    counts = np.zeros(lk)
    for start in range(0, lk, c):
        s = min(start, lk - c)  # lax.dynamic_slice clamps the start so the slice fits
        counts[s:s + c] += 1
    q, k, v = (x.astype(np.float64) for x in (case.q, case.k, case.v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    w = counts * np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(axis=-1, keepdims=True), v)


def test_paper_double_counts_keys_of_a_non_dividing_chunk(rng: np.random.Generator) -> None:
    adapter = load("paper-jax")
    case = make_case(rng, lq=8, lk=10, query_chunk_size=4, key_chunk_size=4)  # starts 0, 4, 6: keys 6, 7 twice
    out = adapter.forward(case).out.astype(np.float64)
    predicted = _double_counted(case)
    scale_a = mp.attention(case.q, case.k, np.abs(case.v)).out
    assert (np.abs(out - predicted) <= SMOKE_C * spec.unit_roundoff("fp32") * scale_a).all()
    assert np.abs(out - mp.attention(case.q, case.k, case.v).out).max() > 1e-2


def test_paper_non_dividing_query_chunk_fails_to_reshape(rng: np.random.Generator) -> None:
    adapter = load("paper-jax")
    case = make_case(rng, lq=10, lk=8, query_chunk_size=4, key_chunk_size=4)
    with pytest.raises(TypeError, match=r"cannot reshape array of shape \(3, 4, 2, 4\)"):
        adapter.forward(case)


def test_listing_scale_only(rng: np.random.Generator) -> None:
    """paper-jax and mea-jax always scale by 1/sqrt(Dk): another scale is refused, that one accepted."""
    case = make_case(rng, lq=4, lk=4)
    for name in ("paper-jax", "mea-jax"):
        adapter = load(name)
        with pytest.raises(Unsupported, match="1/sqrt"):
            adapter.forward(case.with_(scale=1.0))
        check(adapter, case.with_(scale=1 / math.sqrt(8)), SMOKE_C)


# Declared masked-row policies of the wrapped libraries.


@pytest.mark.parametrize("name", ["jax-dpa", "mea-jax"])
def test_uniform_policy_for_mask_masked_rows(name: str, rng: np.random.Generator) -> None:
    adapter = load(name)
    assert adapter.info.masked_rows == "uniform"
    mask = np.ones((2, 2, 8, 8), bool)
    mask[0, 1, 3] = False
    mask[1, 0, 6] = False
    check(adapter, make_case(rng, mask=mask), SMOKE_C, masked_rows="uniform")


def test_mea_nan_for_a_minus_inf_key_chunk(rng: np.random.Generator) -> None:
    """mea-jax 0.1.3: a key chunk whose logits are all -inf (bias) turns its whole row NaN."""
    bias = np.zeros((1, 1, 8, 8), np.float32)
    bias[..., 4:] = -np.inf
    out = load("mea-jax").forward(make_case(rng, bias=bias, key_chunk_size=4)).out
    assert np.isnan(out).all()


# The adapter.


def test_adapter_keeps_dtypes_and_reuses_compiled_functions(rng: np.random.Generator) -> None:
    adapter = load("chunked-jax")
    case = make_case(rng, dtype="bf16", lq=4, lk=4, query_chunk_size=2)
    assert adapter.forward(case).out.dtype == np.dtype(ml_dtypes.bfloat16)
    adapter.forward(make_case(rng, dtype="bf16", lq=4, lk=4, query_chunk_size=2))
    assert len(adapter._forward_cache) + len(adapter._vjp_cache) == 1
    grads = adapter.vjp(case.with_(bias=np.zeros((1, 1, 1, 4), np.float32)))
    assert grads["dq"].dtype == np.dtype(ml_dtypes.bfloat16) and grads["dbias"].dtype == np.float32
    assert grads["dbias"].shape == (1, 1, 1, 4)


def test_adapter_refuses_what_it_cannot_run(rng: np.random.Generator) -> None:
    info = TargetInfo(name="gpu-only", framework="jax", device="gpu")
    adapter = JaxAdapter(lambda q, k, v, **_: q, info)
    if not any(d.platform == "gpu" for d in jax.devices()):
        assert "gpu" in adapter.unavailable_reason()
    with pytest.raises(Unsupported, match="gqa"):
        load("paper-jax").forward(make_case(rng, hq=4, hkv=2))
    with pytest.raises(Unsupported, match="fp64"):
        load("jax-dpa").forward(make_case(rng).with_(q=np.zeros((2, 8, 2, 8))))


# Memory: compiled temporaries, no execution.


def _temp_bytes(fn: object, length: int) -> int:
    """XLA's temporary bytes for ``fn(q, k, v, g)`` at B=1, L=length, H=1, D=64 fp32."""
    s = jax.ShapeDtypeStruct((1, length, 1, 64), jnp.float32)
    return jax.jit(fn).lower(s, s, s, s).compile().memory_analysis().temp_size_in_bytes


def _forward(att: object) -> object:
    return lambda q, k, v, g: att(q, k, v)


def _with_grad(att: object) -> object:
    """Forward + backward: the gradient of sum(out * g) with respect to q, k, v."""

    def f(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array) -> tuple:
        return jax.grad(lambda q, k, v: (att(q, k, v) * g).sum(), argnums=(0, 1, 2))(q, k, v)

    return f


def test_chunked_memory_is_a_fraction_of_dense() -> None:
    from verify.targets import chunked_jax, jax_dpa

    def chunked_fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return chunked_jax.attention(q, k, v, query_chunk_size=1024, key_chunk_size=128)

    for wrap in (_forward, _with_grad):
        small, dense = _temp_bytes(wrap(chunked_fn), 4096), _temp_bytes(wrap(jax_dpa.attention), 4096)
        assert small * 4 < dense, f"chunked-jax {small} bytes vs jax-dpa {dense} bytes"


def test_chunked_jax_fp16_gradient_overflow_stays_fixed():
    """The fuzzer's shrunk case: fp16 dk of -61464 came back -inf while the scans summed in fp16."""
    from pathlib import Path

    from verify import checks
    from verify.case import Case
    from verify.targets import load

    path = Path(__file__).resolve().parents[1] / "reports/findings/chunked-jax/chunked-jax-overflow-dk-fp16.npz"
    out = checks.run_case(load("chunked-jax"), Case.load(path))
    assert out.findings == [], "\n".join(f.message() for f in out.findings)
    assert out.ratios["dk"] < 1


def test_a_case_with_a_cotangent_compiles_one_program_for_both_passes(rng: np.random.Generator) -> None:
    adapter = load("chunked-jax")
    case = make_case(rng, dtype="fp32", lq=4, lk=5, query_chunk_size=2)
    assert case.g is not None
    out = adapter.forward(case).out
    grads = adapter.vjp(case)  # the forward pass's gradients
    assert len(adapter._vjp_cache) == 1 and not adapter._forward_cache
    assert adapter.vjp(case) is not grads  # no forward pass in between: computed afresh
    np.testing.assert_array_equal(adapter.forward(case).out, out)
    fresh = load("chunked-jax").vjp(case)
    for name, x in grads.items():
        np.testing.assert_array_equal(x, fresh[name])


def test_a_broken_backward_keeps_the_forward_pass(rng: np.random.Generator) -> None:
    @jax.custom_vjp
    def attention(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    def bwd(res, g):
        raise RuntimeError("backward not implemented")

    attention.defvjp(lambda q, k, v: (attention(q, k, v), None), bwd)

    def target(q, k, v, *, scale=None):
        return attention(q, k, v)

    adapter = JaxAdapter(target, TargetInfo(name="fwd-only", framework="jax", features=frozenset({"grad"})))
    case = make_case(rng, dtype="fp32", lq=4, lk=4)
    assert adapter.forward(case).out.shape == case.q.shape[:-1] + (case.v.shape[-1],)
    with pytest.raises(RuntimeError, match="backward not implemented"):
        adapter.vjp(case)
