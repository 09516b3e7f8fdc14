"""The case strategies: valid cases, declared features only, menus, the families' numeric edges, shrinking."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from oracles import spec
from verify import compat
from verify import strategies as vs
from verify.case import Case
from verify.strategies.sizes import LARGE_WORK
from verify.targets.base import FEATURES

FAST = settings(max_examples=25, deadline=None, derandomize=True)
# The features of 2022's semantics: the family and mask-kind properties below hold without windows,
# segments, softcap, ALiBi or sinks changing which keys are visible or how large the logits are.
BASE = frozenset({"mask", "bias", "causal", "gqa", "chunks", "grad"})


def logits(case: Case) -> np.ndarray:
    """float64 scale * q.k as [B, Hq, Lq, Lk] (no mask, no bias)."""
    s = 1.0 / np.sqrt(case.dims["Dk"]) if case.scale is None else case.scale
    q, k = case.q.astype(np.float64), case.k.astype(np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    return s * np.einsum("bqhd,bkhd->bhqk", q, k)


def assert_valid(case: Case) -> spec.Attention:
    """What every generated case must be: normalizable, one dtype, finite inputs, JSON-ready meta."""
    att = spec.normalize(case.q, case.k, case.v, **case.semantics())
    if case.g is not None:
        spec.check_cotangent(att, case.g)
    for arr in (case.q, case.k, case.v, case.g):
        if arr is not None:
            assert arr.dtype == spec.as_dtype(case.dtype)
            assert np.isfinite(arr.astype(np.float64)).all()
    if case.bias is not None:
        assert case.bias.dtype == spec.as_dtype(case.dtype)
    assert case.family in vs.FAMILIES and case.mask_kind in vs.MASK_KINDS
    json.dumps(case.meta)
    return att


def near_edge(j: int, block: int) -> bool:
    """Is key index j a multiple of block or next to one?"""
    return j % block in (0, 1, block - 1)


def test_chunk_menu_contents() -> None:
    assert vs.chunk_menu(1) == (None, 1, 2)
    assert vs.chunk_menu(2) == (None, 1, 2, 3, 4)
    assert vs.chunk_menu(8) == (None, 1, 3, 4, 7, 8, 9, 16)
    assert vs.chunk_menu(13) == (None, 1, 2, 12, 13, 14, 26)
    for n in vs.length_menu(200):
        sizes = vs.chunk_menu(n)[1:]
        assert vs.chunk_menu(n)[0] is None and list(sizes) == sorted(set(sizes)) and min(sizes) == 1
        assert {n, n + 1, 2 * n} <= set(sizes) and (n == 1 or n - 1 in sizes)
        assert n < 3 or any(n % c for c in sizes if c < n)  # a non-divisor, so the last chunk is ragged


def test_length_menu() -> None:
    assert vs.length_menu(1) == (1,)
    assert vs.length_menu(10) == (1, 2, 3, 4, 5, 7, 8, 9)
    assert vs.length_menu(64)[-3:] == (33, 63, 64)


@pytest.mark.parametrize("family", vs.FAMILIES)
def test_each_family_gives_valid_cases(family: str) -> None:
    @FAST
    @given(vs.cases(families=(family,), dtypes=("bf16", "fp16", "fp32", "fp64")))
    def check(case: Case) -> None:
        assert_valid(case)
        assert case.family == family

    check()


@pytest.mark.parametrize("kind", vs.MASK_KINDS)
def test_each_mask_kind_gives_valid_cases(kind: str) -> None:
    @FAST
    @given(vs.cases(mask_kinds=(kind,), features=BASE if kind == "causal" else BASE - {"causal"}))
    def check(case: Case) -> None:
        att = assert_valid(case)
        assert case.mask_kind == kind
        d = case.dims
        assert case.causal == (kind == "causal")
        assert (case.mask is not None) == (
            kind in ("random", "key-padding", "padding-random", "masked-rows", "masked-key-chunk", "single-key-edge")
        )
        assert (case.bias is not None) == kind.startswith("bias")
        bias = None if case.bias is None else case.bias.astype(np.float64)
        if kind == "key-padding":
            assert case.mask.shape == (d["B"], 1, 1, d["Lk"]) and case.mask[..., 0].all()
        elif kind == "masked-rows":
            assert att.empty_row.any()
        elif kind == "masked-key-chunk" and d["Lk"] > 1:
            start, stop = case.meta["mask_params"]["masked_keys"]
            assert stop > start and not att.visible[..., start:stop].any() and att.visible.any(-1).all()
        elif kind == "single-key-edge":
            assert (att.visible.sum(-1) == 1).all()
            block = case.key_chunk_size or case.meta["key_block"]
            assert all(j % block == 0 or (j + 1) % block == 0 or j == d["Lk"] - 1 for j in np.nonzero(att.visible)[-1])
        elif kind == "bias-inf":
            assert set(np.unique(bias)) <= {0.0, -np.inf}
        elif kind == "bias-finfo-min":
            assert np.isfinite(bias).all() and set(np.unique(bias)) <= {0.0, float(ml_dtypes.finfo(case.q.dtype).min)}
        elif kind == "bias-1e9":
            assert set(np.unique(bias)) <= ({0.0, -np.inf} if case.dtype == "fp16" else {0.0, bias.min()})
        elif kind == "bias":
            assert np.isfinite(bias).all()

    check()


def test_every_family_and_mask_kind_is_reached() -> None:
    seen_families, seen_kinds = set(), set()

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(vs.cases(max_len=9))
    def collect(case: Case) -> None:
        seen_families.add(case.family)
        seen_kinds.add(case.mask_kind)

    collect()
    assert seen_families == set(vs.FAMILIES) and seen_kinds == set(vs.MASK_KINDS)


@FAST
@given(vs.cases(features=frozenset()))
def test_nothing_undeclared_is_generated(case: Case) -> None:
    assert_valid(case)
    assert case.mask is None and case.bias is None and not case.causal and case.mask_kind == "none"
    assert case.dims["Hq"] == case.dims["Hkv"] and case.query_chunk_size is None and case.key_chunk_size is None
    assert case.g is None


@FAST
@given(st.data())
def test_only_declared_features_are_generated(data: st.DataObject) -> None:
    features = data.draw(st.frozensets(st.sampled_from(FEATURES)))
    case = data.draw(vs.cases(features=features))
    assert_valid(case)
    assert case.mask is None or "mask" in features
    assert case.bias is None or "bias" in features
    assert not case.causal or "causal" in features
    assert case.dims["Hq"] == case.dims["Hkv"] or "gqa" in features
    assert (case.query_chunk_size, case.key_chunk_size) == (None, None) or "chunks" in features
    assert (case.g is not None) == ("grad" in features)
    assert case.align == "top-left" or "bottom-right" in features
    assert case.window is None or "window" in features
    assert case.softcap is None or "softcap" in features
    assert case.alibi_slopes is None or "alibi" in features
    assert case.sinks is None or "sinks" in features
    assert case.q_segment_ids is None or "segments" in features
    assert (case.g_lse is not None) == ({"grad", "lse"} <= features)
    assert case.layout == "contiguous"


@FAST
@given(vs.cases(families=("large-logits",), mask_kinds=("none",), features=BASE))
def test_large_logits_reach_log_max(case: Case) -> None:
    log_max = np.log(float(ml_dtypes.finfo(case.q.dtype).max))
    assert np.abs(logits(case)).max() >= 0.8 * log_max


@FAST
@given(vs.cases(dtypes=("fp32",), families=("row-offset",), mask_kinds=("none",), features=BASE))
def test_row_offset_moves_whole_rows(case: Case) -> None:
    s = logits(case)
    assert ((s.min(-1) >= 100) | (s.max(-1) <= -100)).all()


def test_row_offset_reaches_a_row_offset_above_100() -> None:
    def has_high_row(case: Case) -> bool:
        att = spec.normalize(case.q, case.k, case.v, **case.semantics())
        return bool((np.where(att.visible, logits(case), np.inf).min(-1) >= 100).any())

    find(vs.cases(dtypes=("fp32",), families=("row-offset",), features=BASE), has_high_row, settings=FAST)


@FAST
@given(vs.cases(families=("dominant-key",), mask_kinds=("none",), features=BASE))
def test_dominant_key_is_at_a_chunk_boundary(case: Case) -> None:
    block = case.key_chunk_size or case.meta["key_block"]
    top = logits(case).argmax(-1)
    assert (top == case.meta["family_params"]["dominant_key"]).all()
    assert near_edge(int(top.flat[0]), block)


def test_bias_masks_hide_whole_rows_even_at_high_density() -> None:
    def dense_with_hidden_row(case: Case) -> bool:
        hidden = (case.bias.astype(np.float64) == float(ml_dtypes.finfo(case.q.dtype).min)).all(-1)
        return case.meta["mask_params"]["density"] == 0.9 and case.dims["Lk"] >= 16 and bool(hidden.any())

    find(vs.cases(mask_kinds=("bias-finfo-min",)), dense_with_hidden_row, settings=FAST)


def test_tiny_values_reach_subnormals() -> None:
    def has_subnormal(case: Case) -> bool:
        v = np.abs(case.v.astype(np.float64))
        return bool(((v > 0) & (v < float(ml_dtypes.finfo(case.v.dtype).smallest_normal))).any())

    find(vs.cases(families=("tiny-values",)), has_subnormal, settings=FAST)


@FAST
@given(vs.cases(families=("big-values",), features=BASE))
def test_big_values_are_big_but_summable_in_fp32(case: Case) -> None:
    v = np.abs(case.v.astype(np.float64))
    assert v.max() >= (16000 if case.dtype == "fp16" else 1e35)
    assert v.max() * max(case.dims["Lk"], case.dims["Dv"]) * 8 < np.finfo(np.float32).max  # g.v with |g| < 8


def test_shrinks_to_a_small_readable_case() -> None:
    case = find(vs.cases(), lambda c: c.dims["Lk"] >= 5, settings=settings(derandomize=True, deadline=None))
    assert case.dims == {"B": 1, "Lq": 1, "Lk": 5, "Hq": 1, "Hkv": 1, "Dk": 1, "Dv": 1}
    assert (case.family, case.mask_kind, case.scale, case.key_chunk_size) == ("normal", "none", None, None)


@FAST
@given(st.data())
def test_building_blocks_compose(data: st.DataObject) -> None:
    dims = data.draw(vs.shapes(max_len=9, gqa=False))
    family = data.draw(vs.families(("dominant-key", "cancel")))
    key_chunk = data.draw(vs.chunk_sizes(dims["Lk"]))
    qkv = data.draw(vs.values(family, "fp16", dims, key_block=key_chunk))
    masking = data.draw(vs.masks("single-key-edge", "fp16", dims, key_block=key_chunk))
    att = spec.normalize(qkv.q, qkv.k, qkv.v, mask=masking.mask, bias=masking.bias, causal=masking.causal)
    assert qkv.q.dtype == np.float16 and att.dims == dims and (att.visible.sum(-1) == 1).all()


def test_example_case_is_plain_and_deterministic() -> None:
    for seed in range(30):
        a, b = vs.example_case(seed, "bf16"), vs.example_case(seed, "bf16")
        assert_valid(a)
        assert a.describe() == b.describe() and all(np.array_equal(x, y) for x, y in ((a.q, b.q), (a.v, b.v)))
    case = vs.example_case(1, family="spread", mask_kind="causal", features={"causal"})
    assert (case.family, case.mask_kind, case.causal, case.dtype) == ("spread", "causal", True, "fp32")


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown features"):
        vs.cases(features={"masks"})
    with pytest.raises(ValueError, match="family"):
        vs.cases(families=("gaussian",))


def test_every_modern_option_and_its_menu_is_reached() -> None:
    seen: dict[str, set] = {k: set() for k in ("align", "left", "right", "softcap", "alibi", "sinks", "segments")}

    @settings(max_examples=500, deadline=None, derandomize=True)
    @given(vs.cases(max_len=9))
    def collect(case: Case) -> None:
        assert_valid(case)
        params = case.meta.get("option_params", {})
        seen["align"].add(case.align)
        lk = case.dims["Lk"]
        if case.window is not None:
            for side, w in zip(("left", "right"), case.window, strict=True):
                seen[side].add("None" if w is None else "L-1" if w == lk - 1 and w > 1 else ">=L" if w >= lk
                               else str(w) if w <= 1 else "drawn")
        seen["softcap"].add(case.softcap)
        for what in ("alibi", "sinks", "segments"):
            seen[what].add(params.get(what))
        if case.sinks is not None:
            assert case.sinks.dtype == case.q.dtype and case.sinks.shape == (case.dims["Hq"],)
        if case.alibi_slopes is not None:
            assert case.alibi_slopes.dtype == np.float32
        if case.q_segment_ids is not None:
            assert case.q_segment_ids.dtype == np.int32 and case.q_segment_ids.shape == (case.dims["B"],
                                                                                         case.dims["Lq"])

    collect()
    assert seen["align"] == {"top-left", "bottom-right"}
    assert {"None", "0", "1", ">=L"} <= seen["left"] and {"None", "0", "1", ">=L"} <= seen["right"]
    assert seen["softcap"] == {None, 1.0, 5.0, 20.0, 50.0, 1e4}
    assert seen["alibi"] == {None, "rand", "geometric"}
    assert seen["sinks"] == {None, "mild", "dominant", "negligible", "spread"}
    assert seen["segments"] == {None, "blocks", "one-per-token", "chunk-edge", "missing"}


@pytest.mark.parametrize("constraints", [("dk=dv",), ("lq=lk",), ("len%4", "dim%2"), ("default-scale",)])
def test_constraints_are_respected(constraints: tuple[str, ...]) -> None:
    @FAST
    @given(vs.cases(constraints=constraints))
    def check(case: Case) -> None:
        d = case.dims
        assert "dk=dv" not in constraints or d["Dk"] == d["Dv"]
        assert "lq=lk" not in constraints or d["Lq"] == d["Lk"]
        assert "len%4" not in constraints or d["Lq"] % 4 == d["Lk"] % 4 == 0
        assert "dim%2" not in constraints or d["Dk"] % 2 == d["Dv"] % 2 == 0
        assert "default-scale" not in constraints or case.scale is None

    check()
    with pytest.raises(ValueError, match="no shape fits"):
        vs.cases(constraints=("len%128",), max_len=65)
    with pytest.raises(ValueError, match="unknown constraint 'dk==dv'"):
        vs.cases(constraints=("dk==dv",))


def test_layouts_are_drawn_where_they_apply() -> None:
    seen = set()

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(vs.cases(layouts=("contiguous", "transposed", "sliced", "broadcast-kv", "strided-g")))
    def collect(case: Case) -> None:
        seen.add(case.layout)
        if case.layout == "broadcast-kv":
            assert case.dims["Hkv"] == 1 < case.dims["Hq"]

    with compat.fixed_generation_constants():  # the draws must not depend on which modules earlier tests imported
        collect()
    assert seen == {"contiguous", "transposed", "sliced", "broadcast-kv", "strided-g"}


def test_mask_kinds_combine_with_causal() -> None:
    combos = set()

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(vs.cases(features=BASE, max_len=9))
    def collect(case: Case) -> None:
        if case.causal and case.mask_kind != "causal":
            combos.add(case.mask_kind)

    collect()
    assert {"random", "key-padding", "padding-random", "bias-inf"} <= combos and len(combos) >= 6, combos


def test_rising_logits_raise_the_running_max_in_every_chunk() -> None:
    @FAST
    @given(vs.cases(families=("rising", "falling"), mask_kinds=("none",), features=BASE, dtypes=("fp32",)))
    def check(case: Case) -> None:
        s = logits(case)
        lk = case.dims["Lk"]
        if lk < 8:
            return
        quarters = [s[..., i * lk // 4:(i + 1) * lk // 4].max(-1) for i in range(4)]
        rising = all((quarters[i + 1] > quarters[i]).all() for i in range(3))
        falling = all((quarters[i + 1] < quarters[i]).all() for i in range(3))
        assert rising if case.family == "rising" else falling

    check()


def test_large_and_decode_shapes_are_drawn_and_shrink_away() -> None:
    seen = {"large": 0, "decode": 0, "dim128": 0}

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(vs.cases(max_len=2048, features=BASE, mask_kinds=("none",), families=("normal",)))
    def collect(case: Case) -> None:
        d = case.dims
        seen["large"] += max(d["Lq"], d["Lk"]) >= 1024
        seen["decode"] += d["Lq"] <= 4 and d["Lk"] >= 255
        seen["dim128"] += d["Dk"] >= 128
        assert d["B"] * d["Hq"] * d["Lq"] * d["Lk"] <= LARGE_WORK or max(d["Lq"], d["Lk"]) <= 65
        for size, length in ((case.query_chunk_size, d["Lq"]), (case.key_chunk_size, d["Lk"])):
            assert size is None or length <= 65 or size >= min(64, length)

    collect()
    assert seen["large"] and seen["decode"] and seen["dim128"], seen
    small = find(vs.cases(max_len=2048, features=BASE), lambda c: True, settings=settings(derandomize=True,
                                                                                          deadline=None))
    assert max(small.dims["Lq"], small.dims["Lk"]) <= 2  # the size shrinks to small


def test_declared_tiles_put_their_edges_among_the_large_lengths():
    from verify.strategies.menus import numpy_pick
    from verify.strategies.sizes import LARGE_LENGTHS, pick_large, tile_lengths

    assert tile_lengths((96,), 200) == (95, 96, 97, 191, 192, 193)
    limits = {"max_len": 2048, "max_heads": 4, "max_dim": 128, "gqa": True, "min_dk": 1,
              "constraints": frozenset(), "decode": False}
    pick = numpy_pick(np.random.default_rng(3))
    seen = {n for _ in range(400) for n in (lambda d: (d["Lq"], d["Lk"]))(pick_large(pick, tiles=(96,), **limits))}
    own = set(tile_lengths((96,), 2048)) - set(LARGE_LENGTHS)  # 95, 97, 191, 289, ...: no power-of-two tile's
    assert len(seen & own) >= 10
    pick = numpy_pick(np.random.default_rng(3))
    plain = {n for _ in range(400) for n in (lambda d: (d["Lq"], d["Lk"]))(pick_large(pick, **limits))}
    assert not plain & own  # without the declaration the menu is the common tiles' alone
    with pytest.raises(ValueError, match="tiles must be positive"):
        vs.cases(tiles=(0,))


def test_sizes_restrict_the_mix() -> None:
    lengths = {"small": [], "large": []}

    def drawn(size: str) -> None:
        @settings(max_examples=40, deadline=None, derandomize=True)
        @given(vs.cases(max_len=2048, sizes=(size,), features=BASE, mask_kinds=("none",), families=("normal",)))
        def collect(case: Case) -> None:
            lengths[size].append(max(case.dims["Lq"], case.dims["Lk"]))

        with compat.fixed_generation_constants():
            collect()

    drawn("small")
    drawn("large")
    assert max(lengths["small"]) <= 65 and min(lengths["large"]) >= 63 and max(lengths["large"]) >= 512
    with pytest.raises(ValueError, match="unknown or empty size names"):
        vs.cases(sizes=("huge",))
