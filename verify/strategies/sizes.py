"""Shapes and chunk sizes: where chunked kernels break, from length 1 to real kernels' tiles.

A case's *size* is itself a drawn choice that shrinks toward small (``SIZES``): 80 % of cases are
``small`` (cheap, readable reproducers: the 2022 menus below), 15 % ``large`` (real geometry) and
5 % ``decode`` (one to four queries against a long cache). Why 80/20: small cases find most bugs
and shrink to readable reproducers in seconds; large ones are what kernels with their own tiles
need, and cost ~100x more each (reference and target), so a fifth of the examples keeps a default
campaign within minutes while reaching L >= 1024 and head dim 128 in a few hundred examples.

- small: lengths from a fixed menu (1, 2, primes, 2^k and 2^k +- 1) up to 33 (65 with ``max_len``
  beyond), head dims 1..16, B <= 2, Hkv <= 2 with groups of 1 or 2; chunk sizes from
  ``chunk_menu(L)``: None (the target's default), 1, the largest proper divisor, the smallest
  non-divisor, L-1, L, L+1, 2L.
- large: lengths at tile boundaries (``LARGE_LENGTHS``: 2^j and 2^j +- 1, multiples of 64, 128, 256
  and 512 +- 1, where real kernels' tiles end) up to ``max_len`` (default 2048), or FlashAttention
  test pairs with Lq != Lk both ways (``FA_PAIRS``); head dims from ``LARGE_HEAD_DIMS`` (32 ... 256,
  odd ones included: 59, 72, 104, 111, 203) up to ``max_dim``, Dk != Dv sometimes; B x Hq up to 8 with
  GQA, but at most ``LARGE_WORK`` query-key pairs in all; chunk sizes from ``large_chunk_menu(L)``
  (None, tile sizes, a non-divisor, L-1, L: at least 64, so a chunked loop stays within ~1000 blocks).
- decode: Lq in 1..4, Lk from ``LARGE_LENGTHS`` between 255 and ``2 * max_len`` (4096 by default).
- a target that declares its fixed tiles (``TargetInfo.tiles``, e.g. 96 or 48) adds their multiples
  +- 1 to the large and decode lengths (``tile_lengths``), so every partial-tile edge of its own
  geometry is drawn, not only those of the common power-of-two tiles.

Query and key lengths are drawn independently, Hq is a multiple of Hkv (grouped-query attention)
and Dk, Dv are drawn independently, except where a target's constraints tie them.

``COMPACT_SHAPES`` are shape buckets for compiled targets: each jitted (shape, chunks, scale, mask
layout) is one XLA compilation of ~1 s here, so a campaign over the full menus compiles nearly
every case. The buckets keep the edges (length 1, primes, 2^k +- 1, Lq != Lk, GQA, Dk != Dv,
chunks of 1, non-divisors, equal to and larger than L) with a bounded number of programs.
"""

from __future__ import annotations

from hypothesis import strategies as st

from verify.strategies.menus import Pick, composite, hypothesis_pick, ints, one_of
from verify.targets.base import multiple_of

LENGTHS: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33)
SMALL_MAX_LEN = 65
SIZES = ("small", "large", "decode")  # drawn as 80 / 15 / 5 percent (a number in 0..99 that shrinks to 0)
LARGE_LENGTHS: tuple[int, ...] = tuple(sorted({n for m in (64, 128, 256, 512) for k in range(1, 33)
                                               for n in (m * k - 1, m * k, m * k + 1) if n <= 4097}))
FA_PAIRS: tuple[tuple[int, int], ...] = ((113, 203), (128, 217), (1023, 1024), (1, 147), (3, 799), (127, 513))
LARGE_HEAD_DIMS: tuple[int, ...] = (32, 40, 59, 64, 72, 80, 96, 104, 111, 128, 160, 192, 203, 256)
LARGE_WORK = 2**22  # at most this many (batch, query head, query, key) pairs in a large case
KV_HEADS: tuple[int, ...] = (1, 2)
GROUPS: tuple[int, ...] = (1, 2)
HEAD_DIMS: tuple[int, ...] = (1, 2, 3, 4, 8, 16)
# (B, Lq, Lk, Hq, Hkv, Dk, Dv), then the (query chunk, key chunk) pairs drawn with it.
COMPACT_SHAPES: tuple[tuple[tuple[int, ...], tuple[tuple[int | None, int | None], ...]], ...] = (
    ((1, 1, 1, 1, 1, 1, 1), ((None, None), (1, 1))),
    ((1, 3, 5, 1, 1, 2, 2), ((1, 2), (3, 6))),
    ((1, 8, 8, 2, 2, 4, 4), ((None, None), (3, 3), (8, 8))),
    ((2, 5, 17, 2, 1, 4, 3), ((2, 4), (5, 17))),
    ((1, 17, 9, 4, 2, 8, 8), ((4, 2), (17, 10))),
    ((1, 33, 33, 1, 1, 8, 8), ((16, 8), (33, 34))),
    ((2, 16, 33, 2, 2, 3, 5), ((5, 1), (16, 32))),
    ((1, 65, 64, 2, 1, 4, 4), ((64, 16), (1, 63))),
)
COMPACT_LARGE: tuple[tuple[tuple[int, ...], tuple[tuple[int | None, int | None], ...]], ...] = (
    ((1, 1, 1024, 2, 1, 128, 128), ((None, None), (1, 256))),  # decode against a long cache
    ((1, 193, 257, 2, 2, 72, 72), ((None, None), (64, 128))),  # head dim with a padded tail
    ((2, 129, 129, 4, 2, 104, 104), ((None, None), (64, 100))),
    ((1, 1025, 1025, 1, 1, 64, 64), ((None, None), (256, 512))),  # one past a power of two
    ((1, 2048, 2048, 1, 1, 128, 128), ((None, None), (512, 1024))),
)
Dims = dict[str, int]  # {"B", "Lq", "Lk", "Hq", "Hkv", "Dk", "Dv"}, as Case.dims


def length_menu(max_len: int = 33) -> tuple[int, ...]:
    """Sequence lengths up to ``max_len``: 1, 2, primes, 2^k and 2^k+-1 (beyond 33: 2^k and 2^k+-1)."""
    extra, p = [], 64
    while p - 1 <= max_len:
        extra += [p - 1, p, p + 1]
        p *= 2
    menu = tuple(n for n in (*LENGTHS, *extra) if n <= max_len)
    if not menu:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return menu


def tile_lengths(tiles: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """Multiples of each tile and one either side (k*T - 1, k*T, k*T + 1), up to ``limit``."""
    return tuple(sorted({n for t in tiles for k in range(1, limit // t + 2) for n in (k * t - 1, k * t, k * t + 1)
                         if 1 <= n <= limit}))


def large_chunk_menu(length: int) -> tuple[int | None, ...]:
    """Chunk sizes for a long sequence: None, 64, 128, 256, 512, a non-divisor, L-1, L (none below 64)."""
    non_divisor = next((c for c in range(max(64, length // 3), length) if length % c), None)
    sizes = {c for c in (64, 128, 256, 512, non_divisor, length - 1, length) if c and 64 <= c <= length}
    return (None, *sorted(sizes)) if sizes else chunk_menu(length)


def chunk_menu(length: int) -> tuple[int | None, ...]:
    """Chunk sizes for a length L: None (target default), 1, a divisor, a non-divisor, L-1, L, L+1, 2L."""
    divisor = max((d for d in range(2, length) if length % d == 0), default=1)
    non_divisor = min((d for d in range(2, length) if length % d), default=1)
    sizes = sorted({c for c in (1, divisor, non_divisor, length - 1, length, length + 1, 2 * length) if c > 0})
    return (None, *sizes)


def fits(dims: Dims, constraints: frozenset[str]) -> bool:
    """Whether ``dims`` satisfy a target's shape constraints (dk=dv, lq=lk, len%N, dim%N)."""
    nl, nd = multiple_of(constraints, "len"), multiple_of(constraints, "dim")
    return (("dk=dv" not in constraints or dims["Dk"] == dims["Dv"])
            and ("lq=lk" not in constraints or dims["Lq"] == dims["Lk"])
            and dims["Lq"] % nl == 0 and dims["Lk"] % nl == 0 and dims["Dk"] % nd == 0 and dims["Dv"] % nd == 0)


def pick_compact(pick: Pick, *, max_len: int, max_heads: int, max_dim: int, gqa: bool, min_dk: int,
                 chunked: bool, constraints: frozenset[str] = frozenset(),
                 size: str = "small") -> tuple[Dims, int | None, int | None]:
    """A bucket of ``COMPACT_SHAPES`` (``COMPACT_LARGE`` for a large size, if one fits) and one of its chunk pairs."""
    menu = COMPACT_SHAPES
    if size != "small":
        large = [x for x in COMPACT_LARGE if max(x[0][1], x[0][2]) <= max_len and max(x[0][5:]) <= max_dim]
        menu = tuple(large) or COMPACT_SHAPES
    buckets = []
    for (b, lq, lk, hq, hkv, dk, dv), chunks in menu:
        hq = hq if gqa else hkv
        dims = {"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hkv": hkv, "Dk": dk, "Dv": dv}
        if max(lq, lk) <= max_len and hq <= max_heads and max(dk, dv) <= max_dim and dk >= min_dk and fits(
                dims, constraints):
            buckets.append((dims, chunks))
    if not buckets:
        raise ValueError(f"no compact shape fits max_len={max_len}, max_heads={max_heads}, max_dim={max_dim} "
                         f"and constraints {sorted(constraints)}")
    dims, chunks = buckets[pick(one_of(range(len(buckets))))]
    qchunk, kchunk = pick(one_of(chunks)) if chunked else (None, None)
    return dims, qchunk, kchunk


def pick_size(pick: Pick) -> str:
    """``small`` (80 %), ``large`` (15 %) or ``decode`` (5 %); shrinks toward small."""
    n = pick(ints(0, 99))
    return "small" if n < 80 else "large" if n < 95 else "decode"


def _heads(pick: Pick, hkv_max: int, max_heads: int, gqa: bool) -> tuple[int, int]:
    hkv = pick(ints(1, max(1, min(hkv_max, max_heads))))
    group = pick(one_of(g for g in (1, 2, 4) if hkv * g <= max_heads)) if gqa else 1
    return hkv * group, hkv


def pick_large(pick: Pick, *, max_len: int, max_heads: int, max_dim: int, gqa: bool, min_dk: int,
               constraints: frozenset[str], decode: bool, tiles: tuple[int, ...] = ()) -> Dims | None:
    """Dims of a ``large`` (or ``decode``) case, or None when nothing fits the limits and constraints."""
    nl, nd = multiple_of(constraints, "len"), multiple_of(constraints, "dim")
    limit = 2 * max_len if decode else max_len
    extra = {n for n in tile_lengths(tiles, limit) if n >= LARGE_LENGTHS[0]}
    menu = sorted(set(LARGE_LENGTHS) | extra) if extra else LARGE_LENGTHS
    lengths = tuple(n for n in menu if n <= limit and n % nl == 0
                    and (n >= 255 or not decode))  # decoding reads a long cache
    dims = tuple(d for d in LARGE_HEAD_DIMS if d <= max_dim and d % nd == 0 and d >= min_dk)
    if not lengths or not dims:
        return None
    if decode:
        queries = tuple(n for n in range(1, 5) if n % nl == 0)
        if not queries or "lq=lk" in constraints:
            return None
        lq, lk = pick(one_of(queries)), pick(one_of(lengths))
    elif pick(one_of(("tiles", "fa-pair"))) == "fa-pair" and "lq=lk" not in constraints:
        pairs = [p for p in FA_PAIRS if max(p) <= max_len and p[0] % nl == 0 and p[1] % nl == 0]
        if not pairs:
            return None
        lq, lk = pick(one_of(pairs))
        if pick(one_of((False, True))):
            lq, lk = lk, lq
    else:
        lq = pick(one_of(lengths))
        lk = lq if "lq=lk" in constraints or pick(one_of(("same", "other"))) == "same" else pick(one_of(lengths))
    dk = pick(one_of(dims))
    dv = dk if "dk=dv" in constraints or pick(one_of(("same", "other"))) == "same" else pick(one_of(dims))
    budget = max(1, LARGE_WORK // (lq * lk))  # batch x query heads that fit the work cap
    hq, hkv = _heads(pick, 2, min(max_heads, 8, budget), gqa)
    b = pick(ints(1, max(1, min(2, budget // hq))))
    return {"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hkv": hkv, "Dk": dk, "Dv": dv}


def pick_shape(pick: Pick, *, max_len: int, max_heads: int, max_dim: int, gqa: bool, min_dk: int,
               constraints: frozenset[str] = frozenset()) -> Dims:
    """Dims from the small menus: B in 1..2, Lq and Lk independently, Hq = Hkv * group, Dk and Dv independently
    (tied where the constraints say so, and only multiples where they ask for them)."""
    nl, nd = multiple_of(constraints, "len"), multiple_of(constraints, "dim")
    lengths = tuple(n for n in length_menu(min(max_len, SMALL_MAX_LEN)) if n % nl == 0)
    kv_heads = tuple(h for h in KV_HEADS if h <= max_heads)
    dims = tuple(d for d in (*HEAD_DIMS, *LARGE_HEAD_DIMS) if d <= min(max_dim, 16) and d % nd == 0) or tuple(
        d for d in LARGE_HEAD_DIMS if d <= max_dim and d % nd == 0)[:1]
    if not lengths:  # a tile constraint no small length meets: the smallest large lengths that do
        lengths = tuple(n for n in LARGE_LENGTHS if n <= max_len and n % nl == 0)[:2]
    if not lengths or not kv_heads or not dims or max(dims) < min_dk:
        raise ValueError(f"no shape fits max_len={max_len}, max_heads={max_heads}, max_dim={max_dim}, "
                         f"min_dk={min_dk} and constraints {sorted(constraints)}")
    b = pick(ints(1, 2))
    lq = pick(one_of(lengths))
    lk = lq if "lq=lk" in constraints else pick(one_of(lengths))
    hkv = pick(one_of(kv_heads))
    group = pick(one_of(g for g in GROUPS if hkv * g <= max_heads)) if gqa else 1
    dk = pick(one_of(d for d in dims if d >= min_dk))
    dv = dk if "dk=dv" in constraints else pick(one_of(dims))
    return {"B": b, "Lq": lq, "Lk": lk, "Hq": hkv * group, "Hkv": hkv, "Dk": dk, "Dv": dv}


def _draw_shapes(draw, **limits) -> Dims:
    return pick_shape(hypothesis_pick(draw), **limits)


_shapes = composite("shapes", _draw_shapes)


def shapes(*, max_len: int = 33, max_heads: int = 4, max_dim: int = 16, gqa: bool = True,
           min_dk: int = 1) -> st.SearchStrategy[Dims]:
    """Dims ``{B, Lq, Lk, Hq, Hkv, Dk, Dv}`` (``Case.dims``): Lq, Lk drawn independently, Hq = Hkv * group."""
    limits = {"max_len": max_len, "max_heads": max_heads, "max_dim": max_dim, "gqa": gqa, "min_dk": min_dk}
    length_menu(max_len)  # argument errors now, not at the first draw
    return _shapes(**limits)


def chunk_sizes(length: int) -> st.SearchStrategy[int | None]:
    """A chunk size for a sequence of ``length`` from ``chunk_menu`` (None = the target's default)."""
    return st.sampled_from(chunk_menu(length))
