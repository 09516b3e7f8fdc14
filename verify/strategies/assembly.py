"""Whole cases: a shape, chunk sizes, a scale, a value family, a mask kind and a cotangent, for a target.

``cases`` draws every choice with Hypothesis (so each shrinks toward the simplest: short lengths,
chunk None or 1, the first family and mask kind, ``scale=None``); ``example_case`` samples the
same menus from a numpy seed; ``make_case`` builds one case of an explicit shape, family, mask kind
and chunk sizes (accuracy sweeps); ``sample_cases`` draws independent cases from ``cases``' menus
(coverage comparisons). All four assemble the case in one function, ``_assemble``,
which also picks, in one place, the key block that chunk-aligned families and mask kinds align to:
the case's key chunk, or a block drawn from the chunk menu when the target chooses its own chunks
(recorded as ``meta["key_block"]``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from hypothesis import strategies as st

from oracles import spec
from verify.case import Case
from verify.strategies import mask_kinds as mk
from verify.strategies import value_families as vl
from verify.strategies.menus import SEED, Pick, composite, hypothesis_pick, known, numpy_pick, one_of
from verify.strategies.options import pick_options
from verify.strategies.sizes import (
    SIZES,
    SMALL_MAX_LEN,
    Dims,
    chunk_menu,
    large_chunk_menu,
    pick_compact,
    pick_large,
    pick_shape,
    pick_size,
)
from verify.targets import layouts as lay
from verify.targets.base import DEFAULT_DTYPES, FEATURES, check_constraints

SCALES: tuple[float, ...] = (1.0, 0.125, 0.3)  # explicit scales besides None (= 1/sqrt(Dk))


def _key_block(pick: Pick, key_chunk: int | None, lk: int, family: str, kind: str) -> int | None:
    """The key block a chunk-aligned family or mask kind aligns to: the key chunk, else one drawn."""
    if family not in vl.NEEDS_KEY_BLOCK and kind not in mk.NEEDS_KEY_BLOCK:
        return None
    return key_chunk if key_chunk is not None else pick(one_of(c for c in chunk_menu(lk) if c))


def _assemble(pick: Pick, dtype: str, dims: Dims, family: str, kind: str, chunks: tuple[int | None, int | None],
              scale: float | None, grad: bool, meta: dict, features: frozenset[str] = frozenset(),
              layouts: tuple[str, ...] = ("contiguous",), fixed: dict | None = None) -> Case:
    """One case from its structural choices; ``fixed`` sets modern options instead of drawing them."""
    key_block = _key_block(pick, chunks[1], dims["Lk"], family, kind)
    vals = vl.pick_values(pick, family, dtype, dims, scale, key_block)
    masking = mk.pick_masking(pick, kind, dtype, dims, key_block)
    causal = masking.causal or (kind not in ("none", "causal") and "causal" in features and bool(
        pick(one_of((False, True)))))  # a mask AND causal
    options, option_params = ({}, {}) if fixed is not None else pick_options(pick, features, dtype, dims, key_block,
                                                                              grad)
    g = None
    if grad:
        rng = np.random.default_rng(pick(SEED))
        g = vl.cast(rng.standard_normal((dims["B"], dims["Lq"], dims["Hq"], dims["Dv"])), dtype)
    layout = pick(one_of(x for x in layouts if lay.applies(x, dims))) if len(layouts) > 1 else layouts[0]
    meta = {**meta, "family_params": vals.params, "mask_params": masking.params}
    if option_params:
        meta["option_params"] = option_params
    if key_block is not None and key_block != chunks[1]:
        meta["key_block"] = key_block
    return Case(vals.q, vals.k, vals.v, g=g, mask=masking.mask, bias=masking.bias, scale=scale,
                causal=causal, query_chunk_size=chunks[0], key_chunk_size=chunks[1], family=family,
                mask_kind=kind, meta=meta, layout=layout, **options, **(fixed or {}))


def _options(dtypes: Sequence[str], features: Iterable[str], families: Sequence[str], mask_kinds: Sequence[str],
             max_len: int, max_heads: int, max_dim: int, grad: bool, compact: bool,
             constraints: Iterable[str] = (), layouts: Sequence[str] = ("contiguous",),
             tiles: Iterable[int] = (), sizes: Sequence[str] = SIZES) -> dict:
    """Validated options of ``cases``: ``ValueError`` naming the first bad one."""
    features = frozenset(features)
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown features {unknown}; known: {', '.join(FEATURES)}")
    constraints = frozenset(constraints)
    check_constraints(constraints)
    layouts = known("layout", layouts, lay.LAYOUTS)
    tiles = tuple(sorted(set(tiles)))
    sizes = known("size", sizes, SIZES)
    if any(not isinstance(t, int) or t < 1 for t in tiles):
        raise ValueError(f"tiles must be positive integers, got {list(tiles)}")
    families = tuple(f for f in known("family", families, vl.FAMILIES) if f != "row-offset" or max_dim >= 2)
    if not families:
        raise ValueError("row-offset needs max_dim >= 2")
    kinds = tuple(m for m in known("mask kind", mask_kinds, mk.MASK_KINDS) if mk.MASK_NEEDS[m] in features | {None})
    return {"dtypes": tuple(spec.dtype_name(d) for d in dtypes), "features": features, "families": families,
            "mask_kinds": kinds or ("none",), "max_len": max_len, "max_heads": max_heads, "max_dim": max_dim,
            "grad": bool(grad and "grad" in features), "compact": compact, "constraints": constraints,
            "layouts": layouts, "tiles": tiles, "sizes": sizes}


def _pick_case(pick: Pick, *, dtypes: tuple[str, ...], features: frozenset[str], families: tuple[str, ...],
               mask_kinds: tuple[str, ...], max_len: int, max_heads: int, max_dim: int, grad: bool,
               compact: bool, constraints: frozenset[str], layouts: tuple[str, ...], tiles: tuple[int, ...],
               sizes: tuple[str, ...]) -> Case:
    dtype = pick(one_of(dtypes))
    family = pick(one_of(families))
    kind = pick(one_of(mask_kinds))
    limits = {"max_len": max_len, "max_heads": max_heads, "max_dim": max_dim, "gqa": "gqa" in features,
              "min_dk": 2 if family == "row-offset" else 1, "constraints": constraints}
    chunked = "chunks" in features
    if max_len <= SMALL_MAX_LEN:
        size = "small"
    else:  # the drawn mix, or one of the sizes asked for (benchmarks: small or large only)
        size = pick_size(pick) if set(sizes) == set(SIZES) else pick(one_of(sizes))
    if compact:
        dims, qchunk, kchunk = pick_compact(pick, chunked=chunked, size=size, **limits)
    else:
        dims = None if size == "small" else pick_large(pick, decode=size == "decode", tiles=tiles, **limits)
        menu = large_chunk_menu if dims is not None else chunk_menu
        dims = dims or pick_shape(pick, **limits)
        qchunk = pick(one_of(menu(dims["Lq"]))) if chunked else None
        kchunk = pick(one_of(menu(dims["Lk"]))) if chunked else None
    explicit = "default-scale" not in constraints and pick(one_of((None, "explicit")))
    scale = pick(one_of(SCALES[:1] if compact else SCALES)) if explicit else None
    return _assemble(pick, dtype, dims, family, kind, (qchunk, kchunk), scale, grad, {}, features, layouts)


def _draw_case(draw, **options) -> Case:
    return _pick_case(hypothesis_pick(draw), **options)


_cases = composite("cases", _draw_case)


def cases(
    *,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    features: Iterable[str] = frozenset(FEATURES),
    families: Sequence[str] = vl.FAMILIES,
    mask_kinds: Sequence[str] = mk.MASK_KINDS,
    max_len: int = 33,
    max_heads: int = 8,
    max_dim: int = 256,
    grad: bool = True,
    compact: bool = False,
    constraints: Iterable[str] = (),
    layouts: Sequence[str] = ("contiguous",),
    tiles: Iterable[int] = (),
    sizes: Sequence[str] = SIZES,
) -> st.SearchStrategy[Case]:
    """Cases for a target declaring ``features``: nothing undeclared is generated (no mask without "mask",
    no bias masks without "bias", Hq == Hkv without "gqa", chunk sizes None without "chunks", g only with
    ``grad`` and "grad", no modern option without its feature) and nothing its ``constraints``
    (``targets.base.CONSTRAINTS``) exclude. ``compact`` draws shapes and chunks from ``COMPACT_SHAPES``
    (jitted targets); ``layouts`` are the memory layouts to draw (``verify.targets.layouts``); ``tiles``,
    a kernel's fixed tile sizes, add their multiples +- 1 to the large lengths (``sizes.tile_lengths``);
    ``sizes`` restricts the size mix (``strategies.SIZES``: the default draws 80 / 15 / 5 percent)."""
    options = _options(dtypes, features, families, mask_kinds, max_len, max_heads, max_dim, grad, compact,
                       constraints, layouts, tiles, sizes)
    _pick_case(numpy_pick(np.random.default_rng(0)), **options)  # bad limits fail now, not mid-campaign
    return _cases(**options)


def sample_cases(seed: int, examples: int, **kwargs: object) -> Iterator[Case]:
    """``examples`` independent cases from the menus that ``cases(**kwargs)`` draws from (numpy, no Hypothesis).

    Hypothesis explores: its draws within a run are correlated (it mutates and replays earlier
    choices), so one run is no sample of the menus' distribution. These draws are: what
    ``verify.coverage`` compares to tell whether a change altered what campaigns cover.
    """
    bound = inspect.signature(cases).bind(**kwargs)
    bound.apply_defaults()
    options = _options(**bound.arguments)
    rng = np.random.default_rng(seed)
    for _ in range(examples):
        yield _pick_case(numpy_pick(rng), **options)


def example_case(seed: int, dtype: str = "fp32", *, family: str | None = None, mask_kind: str | None = None,
                 features: Iterable[str] = frozenset(FEATURES), max_len: int = 33, max_heads: int = 4,
                 max_dim: int = 16, grad: bool = True) -> Case:
    """A case like ``cases`` would draw, from a numpy seed alone (no Hypothesis): for demos and tests."""
    options = _options((dtype,), features, (family,) if family else vl.FAMILIES,
                       (mask_kind,) if mask_kind else mk.MASK_KINDS, max_len, max_heads, max_dim, grad, False)
    return _pick_case(numpy_pick(np.random.default_rng(seed)), **options)


def make_case(seed: int, dtype: str, *, dims: Dims, family: str, mask_kind: str = "none",
              query_chunk_size: int | None = None, key_chunk_size: int | None = None,
              features: Iterable[str] = frozenset(FEATURES), grad: bool = True, **options: object) -> Case:
    """A deterministic case of an explicit shape, family, mask kind and chunk sizes (numpy only, for sweeps).

    The same ``seed`` gives the same q, k, v, masking and g for any chunk sizes, except where the family or
    mask kind aligns to the key chunk (``dominant-key``, ``masked-key-chunk``, ``single-key-edge``).
    ``ValueError`` when the mask kind needs a feature not in ``features``. ``options`` are modern options
    set explicitly (``softcap=50.0``, ``window=(3, 0)``, ...); none is drawn.
    """
    features = frozenset(features)
    family = known("family", (family,), vl.FAMILIES)[0]
    kind = known("mask kind", (mask_kind,), mk.MASK_KINDS)[0]
    if mk.MASK_NEEDS[kind] not in features | {None}:
        raise ValueError(f"mask kind {kind!r} needs feature {mk.MASK_NEEDS[kind]!r}, not in {sorted(features)}")
    return _assemble(numpy_pick(np.random.default_rng(seed)), spec.dtype_name(dtype), dims, family, kind,
                     (query_chunk_size, key_chunk_size), None, grad and "grad" in features, {"seed": seed},
                     fixed=dict(options))
