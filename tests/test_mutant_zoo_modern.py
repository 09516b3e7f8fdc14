"""The modern and the fixed-tile mutant zoos are what they claim (``tests.mutants``: ``MODERN_*``, ``TILED_*``).

What is checked, for each zoo:

- the clean base agrees with the exact answer on sanity cases, through the harness's own judgement
  (``verify.checks.run_case``: forward, lse, every gradient and the determinism repeat, under the error
  model). Modern: every option alone and combined, fp32/bf16/fp16, mp oracle. Tiled: lengths
  63/64/65/127/128/129/255/257, head dims 59/64/72/128, decode shapes, fp32/bf16, decided by the float64
  naive reference (certified by ``verify.truth``); plus an lse cotangent in the sanity allowances below.
  Each base's hand-written backward is the gradient of its forward (float64 ``gradcheck``);
- every mutant's witness kills it, in the terms of ``test_mutant_zoo_sanity.py``: the clean base within
  the allowance, the mutant beyond 10x it (``finite``: non-finite where the exact value is finite);
  for the modern zoo the harness's ``run_case`` also flags the mutant and not the base;
- every mutant equals its base bit for bit (output, lse, gradients) on its near miss, a case next to
  its trigger that does not reach it; tiled mutants also on every case within a single tile;
- modern zoo only: a default campaign (``fuzz.Settings(database=None, max_findings=1)``) kills each
  mutant, and the clean base gives no finding in 60 examples per dtype. The tiled mutants' campaign
  kills need large shapes from the strategies and are not tested here.

Allowances against the exact values (elementwise, as in ``test_mutant_zoo_sanity.py``):

- forward: ``|out - exact| <= c * u * A``, ``A`` the attention of ``|v|``, ``c = 32`` at fp32 and 2 at
  bf16/fp16 (fp32 arithmetic, one rounding of the output);
- lse (fp32): ``|lse - exact| <= 64 * 2^-24 * (1 + |exact|)``; equal infinities agree;
- gradients: per tensor ``max |grad - exact| <= r * max |exact|``, ``r = 1e-4`` at fp32, ``2u`` at bf16/fp16.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from oracles import mp, naive, spec
from tests.mutants import MODERN_BASE, MODERN_MUTANTS, TILED_BASE, TILED_MUTANTS, Mutant, tiled
from verify import checks, fuzz
from verify.case import Case
from verify.targets import adapter_for

FORWARD_C = {"fp32": 32.0, "bf16": 2.0, "fp16": 2.0}
LSE_C = 64.0 * 2.0**-24
GRAD_FP32 = 1e-4
GRAD_LOWP_C = 2.0
KILL_FACTOR = 10.0
ZOOS = {"modern": (MODERN_BASE, MODERN_MUTANTS), "tiled": (TILED_BASE, TILED_MUTANTS)}
ALL = [(zoo, name) for zoo, (_, mutants) in ZOOS.items() for name in mutants]


def _adapter(m: Mutant):
    return adapter_for(m.fn, m.info())


def _run(m: Mutant, case: Case, grad: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Output and lse (float64) and, with ``grad``, the gradients for ``case.g`` (and ``case.g_lse``)."""
    ad = _adapter(m)
    res = ad.forward(case)
    grads = {n: g.astype(np.float64) for n, g in ad.vjp(case).items()} if grad else {}
    return res.out.astype(np.float64), res.lse.astype(np.float64), grads


class _Exact:
    """The exact values of a case from the mp oracle or the float64 naive reference."""

    def __init__(self, case: Case, oracle: str, grad: bool) -> None:
        kw = case.semantics()
        ref = mp if oracle == "mp" else naive
        fwd = ref.attention(case.q, case.k, case.v, **kw)
        self.out, self.lse = fwd.out, fwd.lse
        self.scale = ref.attention(case.q, case.k, np.abs(case.v), **kw).out
        self.grads = {}
        if grad:
            r = ref.attention_vjp(case.q, case.k, case.v, case.g, g_lse=case.g_lse, **kw)
            self.grads = {n: getattr(r, n) for n in ("dq", "dk", "dv", "dbias", "dsinks") if getattr(r, n) is not None}


def _ratio(err: np.ndarray, allowed: np.ndarray) -> float:
    """Largest ``err / allowed`` (inf where ``allowed`` is 0 and ``err`` is not, or ``err`` is NaN)."""
    err = np.where(np.isnan(err), np.inf, err)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(err == 0, 0.0, err / allowed)
    return float(r.max())


def _diff(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``|got - want|``, 0 where both are the same infinity."""
    with np.errstate(invalid="ignore"):
        return np.where(got == want, 0.0, np.abs(got - want))


def _forward_ratio(case: Case, ex: _Exact, out: np.ndarray) -> float:
    u = spec.unit_roundoff(case.dtype)
    return _ratio(_diff(out, ex.out), FORWARD_C[case.dtype] * u * ex.scale)


def _lse_ratio(ex: _Exact, lse: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):
        allowed = LSE_C * (1 + np.where(np.isfinite(ex.lse), np.abs(ex.lse), 0.0))
    return _ratio(_diff(lse, ex.lse), allowed)


def _grad_ratio(case: Case, ex: _Exact, grads: dict[str, np.ndarray]) -> float:
    r = GRAD_FP32 if case.dtype == "fp32" else GRAD_LOWP_C * spec.unit_roundoff(case.dtype)
    assert set(grads) == set(ex.grads), (sorted(grads), sorted(ex.grads))
    return max(_ratio(_diff(got, ex.grads[n]), r * np.abs(ex.grads[n]).max()) for n, got in grads.items())


def _as(case: Case, dtype: str) -> Case:
    dt = spec.as_dtype(dtype)
    names = ("q", "k", "v", "g", "bias", "sinks")
    return case.with_(**{n: getattr(case, n).astype(dt) for n in names if getattr(case, n) is not None})


def _naive_judge(m: Mutant, case: Case) -> checks.Outcome:
    """``run_case``, asserting that the float64 naive reference decided (the mp oracle is too slow at these sizes)."""
    out = checks.run_case(_adapter(m), case)
    assert out.reference == "naive64", out.reference
    return out


def _messages(out: checks.Outcome) -> str:
    return "\n\n".join(f.message() for f in out.findings)


# --- the zoos' shape ---------------------------------------------------------------------------------------


def test_zoo_shape() -> None:
    for base, mutants in ZOOS.values():
        assert len({m.kind for m in mutants.values()}) == len(mutants)
        for name, m in mutants.items():
            assert m.name == name and m.features == base.features and m.witness and m.near_miss
    assert not set(MODERN_MUTANTS) & set(TILED_MUTANTS)
    assert MODERN_BASE.info().unexercised() == []
    assert set(TILED_BASE.info().unexercised()) == {"chunks", "window", "softcap", "alibi", "sinks", "segments"}
    assert len(MODERN_MUTANTS) >= 12 and len(TILED_MUTANTS) >= 6


# --- part 1: the modern zoo --------------------------------------------------------------------------------


def _modern_sanity() -> dict[str, Case]:
    """fp32 cases, each option alone and combined, chunk sizes 1 / non-divisor / None, GQA, Lq != Lk both ways."""
    r = np.random.default_rng(17)
    f = np.float32

    def make(lq: int, lk: int, chunk: int | None = 3, hq: int = 4, hkv: int = 2, **kw: object) -> Case:
        b, dk, dv = 2, 3, 2
        return Case(q=r.standard_normal((b, lq, hq, dk)).astype(f), k=r.standard_normal((b, lk, hkv, dk)).astype(f),
                    v=r.standard_normal((b, lk, hkv, dv)).astype(f), g=r.standard_normal((b, lq, hq, dv)).astype(f),
                    g_lse=r.standard_normal((b, hq, lq)).astype(f), key_chunk_size=chunk, query_chunk_size=2, **kw)

    def seg(n: int, cuts: tuple[int, ...]) -> np.ndarray:
        ids = np.zeros(n, np.int32)
        for c in cuts:
            ids[c:] += 1
        return np.stack([ids, ids[::-1].copy()])

    mask = r.random((2, 1, 5, 7)) < 0.6
    mask[0, :, 1] = False  # a fully masked row
    bias = r.standard_normal((1, 4, 5, 7)).astype(f)
    bias[..., 2] = -np.inf
    slopes = (r.random(4) * 0.3).astype(f)
    sinks = (2 * r.standard_normal(4)).astype(f)
    return {
        "plain": make(5, 7),
        "mask-bias": make(5, 7, mask=mask, bias=bias, mask_kind="masked-rows"),
        "causal-bottom-right-wide": make(3, 8, causal=True, align="bottom-right"),
        "causal-bottom-right-tall": make(8, 3, 1, causal=True, align="bottom-right"),
        "causal-top-left": make(6, 4, causal=True),
        "window": make(6, 9, 2, window=(2, 1)),
        "window-unbounded-left": make(6, 9, window=(None, 0)),
        "window-unbounded-right": make(6, 9, 4, window=(1, None), causal=True),
        "window-beyond-lk": make(6, 9, window=(0, 12)),
        "window-bottom-right": make(4, 9, 4, window=(3, 0), align="bottom-right"),
        "softcap-1": make(5, 7, softcap=1.0),
        "softcap-50": make(5, 7, None, softcap=50.0),
        "alibi": make(5, 7, alibi_slopes=slopes),
        "alibi-batch-bottom-right": make(4, 9, alibi_slopes=(r.random((2, 4)) * 0.3).astype(f), align="bottom-right"),
        "sinks": make(5, 7, sinks=sinks),
        "sinks-dominant-with-empty-rows": make(5, 7, mask=mask, sinks=np.full(4, 30.0, f)),
        "sinks-minus-inf": make(5, 7, sinks=np.array([-np.inf, 0.5, -np.inf, -1.0], f)),
        "segments": make(6, 9, q_segment_ids=seg(6, (2, 4)), kv_segment_ids=seg(9, (3, 6))),
        "segments-missing": make(6, 9, 1, q_segment_ids=seg(6, (2, 4)) + 5 * (np.arange(6) == 3),
                                 kv_segment_ids=seg(9, (3, 6))),
        "everything": make(6, 9, 2, causal=True, align="bottom-right", window=(3, 2), softcap=20.0,
                           bias=r.standard_normal((2, 1, 6, 9)).astype(f), alibi_slopes=slopes, sinks=sinks,
                           q_segment_ids=seg(6, (3,)), kv_segment_ids=seg(9, (5,))),
    }


MODERN_SANITY = _modern_sanity()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_modern_base_matches_oracle(dtype: str) -> None:
    """The harness's own judgement (mp oracle, error model, determinism): no finding on any option."""
    ad = _adapter(MODERN_BASE)
    for name, case in MODERN_SANITY.items():
        case = _as(case, dtype)
        out = checks.run_case(ad, case)
        assert out.findings == [], f"{name}:\n{_messages(out)}"
        assert set(out.ratios) >= {"out", "lse", "dq", "dk", "dv"}, name
        assert ad.forward(case).lse.dtype == np.float32


def test_modern_base_backward_is_gradient() -> None:
    """float64 gradcheck of (out, lse) in q, k, v, bias and sinks, with every option on (no empty row)."""
    r = np.random.default_rng(19)

    def t(*shape: int) -> torch.Tensor:
        return torch.from_numpy(r.standard_normal(shape)).requires_grad_()

    q, k, v, bias, sinks = t(1, 4, 4, 3), t(1, 6, 2, 3), t(1, 6, 2, 2), t(1, 1, 4, 6), t(4)
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q_seg, kv_seg = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 0, 1, 1, 1]])

    def f(q, k, v, bias, sinks):
        return MODERN_BASE.fn(q, k, v, bias=bias, causal=True, align="bottom-right", window=(3, 1), softcap=2.0,
                              alibi_slopes=slopes, sinks=sinks, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                              return_lse=True, key_chunk_size=4)

    assert torch.autograd.gradcheck(f, (q, k, v, bias, sinks))


@pytest.mark.parametrize("name", list(MODERN_MUTANTS))
def test_modern_witness_kills_mutant(name: str) -> None:
    m = MODERN_MUTANTS[name]
    case = m.witness()
    check = case.meta["check"]
    grad = check == "grad"
    ex = _Exact(case, "mp", grad)
    clean_out, clean_lse, clean_grads = _run(MODERN_BASE, case, grad)
    out, lse, grads = _run(m, case, grad)
    assert _lse_ratio(ex, clean_lse) <= 1.0
    if check != "finite":
        assert _forward_ratio(case, ex, clean_out) <= 1.0
    if check == "forward":
        assert _forward_ratio(case, ex, out) > KILL_FACTOR
    elif check == "lse":
        assert _lse_ratio(ex, lse) > KILL_FACTOR
    elif check == "grad":
        assert _grad_ratio(case, ex, clean_grads) <= 1.0
        assert _grad_ratio(case, ex, grads) > KILL_FACTOR
    else:
        assert np.isfinite(ex.out).all() and np.isfinite(ex.lse).all()
        assert np.isfinite(clean_out).all() and np.isfinite(clean_lse).all()
        assert not (np.isfinite(out).all() and np.isfinite(lse).all())
    # ... and the harness sees it the same way
    assert checks.run_case(_adapter(MODERN_BASE), case).findings == []
    assert checks.run_case(_adapter(m), case).findings


# --- part 2: the tiled zoo ---------------------------------------------------------------------------------


def _tiled_sanity() -> dict[str, Case]:
    """fp32 cases at tile boundaries, odd and blocked head dims, decode shapes, causal, mask, bias, GQA."""
    r = np.random.default_rng(23)
    f = np.float32

    def make(lq: int, lk: int, d: int, hq: int = 2, hkv: int = 1, dv: int | None = None, **kw: object) -> Case:
        dv = d if dv is None else dv
        return Case(q=r.standard_normal((1, lq, hq, d)).astype(f), k=r.standard_normal((1, lk, hkv, d)).astype(f),
                    v=r.standard_normal((1, lk, hkv, dv)).astype(f), g=r.standard_normal((1, lq, hq, dv)).astype(f),
                    **kw)

    padding = np.ones((1, 1, 1, 700), bool)
    padding[..., 650:] = False
    bias = r.standard_normal((1, 2, 129, 129)).astype(f)
    bias[..., 5] = -np.inf
    mask = r.random((1, 1, 65, 255)) < 0.7
    mask[..., 64, :] = False  # a fully masked row in the second query tile
    return {
        "L63-D59": make(63, 63, 59),
        "L64-D64-causal": make(64, 64, 64, causal=True),
        "L65-D72": make(65, 65, 72, hq=4, hkv=2),
        "L127-D128-causal": make(127, 127, 128, causal=True),
        "L128-D72-Dv16": make(128, 128, 72, dv=16),
        "L129-D59-bias": make(129, 129, 59, bias=bias),
        "Lq255-Lk65-D64-causal-bottom-right": make(255, 65, 64, causal=True, align="bottom-right"),
        "L257-D72-causal-bottom-right": make(257, 257, 72, causal=True, align="bottom-right"),
        "Lq65-Lk255-mask": make(65, 255, 16, mask=mask, mask_kind="masked-rows"),
        "Lq100-Lk300-causal-bottom-right": make(100, 300, 16, causal=True, align="bottom-right"),
        "Lq129-Lk200-causal-top-left": make(129, 200, 16, causal=True),
        "decode-1x512": make(1, 512, 64, hq=4, hkv=1),
        "decode-3x700-causal": make(3, 700, 72, causal=True, align="bottom-right"),
        "decode-4x1025-D128": make(4, 1025, 128),
        "decode-2x700-padding": make(2, 700, 16, mask=padding, mask_kind="key-padding"),
        "no-decode-5x700": make(5, 700, 16),
    }


TILED_SANITY = _tiled_sanity()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(TILED_SANITY))
def test_tiled_base_matches_naive(name: str, dtype: str) -> None:
    """The harness's judgement with the float64 naive reference: no finding, forward, lse, gradients."""
    case = _as(TILED_SANITY[name], dtype)
    out = _naive_judge(TILED_BASE, case)
    assert out.findings == [], _messages(out)
    assert set(out.ratios) >= {"out", "lse", "dq", "dk", "dv"}


def test_tiled_base_lse_cotangent_and_sanity_ratios() -> None:
    """An lse cotangent beyond one tile, in the sanity-test allowances (bf16: within 2u A and 2u max|grad|)."""
    r = np.random.default_rng(29)
    case = _as(TILED_SANITY["L129-D59-bias"], "bf16").with_(g_lse=r.standard_normal((1, 2, 129)).astype(np.float32))
    ex = _Exact(case, "naive", True)
    out, lse, grads = _run(TILED_BASE, case, True)
    assert _forward_ratio(case, ex, out) <= 1.0
    assert _lse_ratio(ex, lse) <= 1.0
    assert _grad_ratio(case, ex, grads) <= 1.0


def test_tiled_base_backward_is_gradient() -> None:
    """float64 gradcheck (fast mode) of (out, lse) beyond one tile: two query and key tiles, Dk = 72 (two blocks)."""
    r = np.random.default_rng(31)

    def t(*shape: int) -> torch.Tensor:
        return torch.from_numpy(r.standard_normal(shape)).requires_grad_()

    q, k, v, bias = t(1, 70, 2, 72), t(1, 140, 1, 72), t(1, 140, 1, 8), t(1, 1, 70, 140)
    mask = torch.from_numpy(r.random((1, 1, 70, 140)) < 0.8)

    def f(q, k, v, bias):
        out, lse = TILED_BASE.fn(q, k, v, bias=bias, mask=mask, causal=True, align="bottom-right", return_lse=True)
        return out, lse.masked_fill(lse == -torch.inf, 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v, bias), fast_mode=True)


@pytest.mark.parametrize("name", list(TILED_MUTANTS))
def test_tiled_witness_kills_mutant(name: str) -> None:
    m = TILED_MUTANTS[name]
    case = m.witness()
    check = case.meta["check"]
    grad = check == "grad"
    ex = _Exact(case, "naive", grad)
    clean_out, clean_lse, clean_grads = _run(TILED_BASE, case, grad)
    out, lse, grads = _run(m, case, grad)
    assert _forward_ratio(case, ex, clean_out) <= 1.0
    assert _lse_ratio(ex, clean_lse) <= 1.0
    if check == "forward":
        assert _forward_ratio(case, ex, out) > KILL_FACTOR
    elif check == "grad":
        assert _grad_ratio(case, ex, clean_grads) <= 1.0
        assert _grad_ratio(case, ex, grads) > KILL_FACTOR
    else:
        assert np.isfinite(ex.out).all() and not np.isfinite(out).all()


def test_tiled_witnesses_need_more_than_one_tile() -> None:
    """Each witness goes beyond one tile: a second query or key tile, a head dim > 64, or a split-KV decode."""
    for m in TILED_MUTANTS.values():
        d = m.witness().dims
        assert (d["Lq"] > tiled.TILE_M or d["Lk"] > tiled.TILE_N or d["Dk"] > tiled.TILE_D
                or (d["Lq"] <= tiled.DECODE_MAX_LQ and d["Lk"] >= tiled.DECODE_MIN_LK)), m.name


def _single_tile_cases() -> list[Case]:
    """fp32 cases within one tile (Lq <= 64, Lk <= 128, head dims <= 64, no decode), every tiled feature."""
    r = np.random.default_rng(37)
    f = np.float32
    cases = []
    for lq, lk, d, kw in [(1, 1, 1, {"causal": True, "align": "bottom-right"}), (5, 7, 33, {"causal": True}),
                          (64, 128, 64, {"causal": True, "align": "bottom-right"}), (4, 100, 16, {}),
                          (63, 40, 59, {"causal": True, "align": "bottom-right"}), (17, 128, 64, {"mask": True})]:
        if kw.pop("mask", False):
            kw["mask"] = r.random((1, 1, lq, lk)) < 0.5
        cases.append(Case(q=r.standard_normal((1, lq, 2, d)).astype(f), k=r.standard_normal((1, lk, 1, d)).astype(f),
                          v=r.standard_normal((1, lk, 1, d)).astype(f), g=r.standard_normal((1, lq, 2, d)).astype(f),
                          bias=r.standard_normal((1, 2, lq, lk)).astype(f), **kw))
    return cases


def test_tiled_mutants_equal_base_within_one_tile() -> None:
    """No tiled bug shows within a single tile: every mutant is the base bit for bit there (every feature on)."""
    for case in _single_tile_cases():
        ref = _run(TILED_BASE, case, True)
        for m in TILED_MUTANTS.values():
            got = _run(m, case, True)
            np.testing.assert_array_equal(got[0], ref[0], err_msg=f"{m.name} out {case.describe()}")
            np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{m.name} lse {case.describe()}")
            for n, gr in got[2].items():
                np.testing.assert_array_equal(gr, ref[2][n], err_msg=f"{m.name} {n} {case.describe()}")


# --- both zoos: no difference off the trigger --------------------------------------------------------------


@pytest.mark.parametrize(("zoo", "name"), ALL, ids=[f"{z}-{n}" for z, n in ALL])
def test_mutant_equals_base_off_trigger(zoo: str, name: str) -> None:
    """On the near miss the mutant's output, lse and gradients are the base's, bit for bit."""
    base, mutants = ZOOS[zoo]
    m = mutants[name]
    case = m.near_miss()
    grad = case.g is not None
    ref, ref_lse, ref_grads = _run(base, case, grad)
    out, lse, grads = _run(m, case, grad)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(lse, ref_lse)
    assert grads.keys() == ref_grads.keys()
    for n, gr in grads.items():
        np.testing.assert_array_equal(gr, ref_grads[n], err_msg=n)


# --- part 1: campaigns ---------------------------------------------------------------------------------------


def _settings(tmp_path: Path, **kw: object) -> fuzz.Settings:
    return fuzz.Settings(database=None, repro_dir=tmp_path, **kw)


@pytest.mark.parametrize("name", list(MODERN_MUTANTS))
def test_default_campaign_kills_modern_mutant(name: str, tmp_path: Path) -> None:
    m = MODERN_MUTANTS[name]
    t0 = time.monotonic()
    camp = fuzz.run(_adapter(m), _settings(tmp_path, max_findings=1))
    seconds = time.monotonic() - t0
    assert camp.findings, f"modern mutant {name} ({m.kind}) survived {camp.examples} examples"
    f = camp.findings[0]
    print(f"\ncampaign {name}: {f.category}/{f.output} {f.dtype} after {camp.examples} examples, {seconds:.1f} s; "
          f"{f.describe}")


def test_modern_base_campaign_gives_no_findings(tmp_path: Path) -> None:
    camp = fuzz.run(_adapter(MODERN_BASE), _settings(tmp_path, max_examples=60))
    assert camp.findings == [], "\n\n".join(f.message() for f in camp.findings)
    assert camp.examples == {"bf16": 60, "fp16": 60, "fp32": 60}
