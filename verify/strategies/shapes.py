"""Shapes and chunk sizes: where chunked kernels break (length 1, primes, 2^k +- 1, non-dividing chunks).

Lengths come from a fixed menu (1, 2, primes, 2^k and 2^k +- 1), extended by 2^k and 2^k +- 1 for
``max_len`` > 33, so a jitted target recompiles a bounded number of times. Chunk sizes come from
``chunk_menu(L)``: None (the target's default) first, then 1, the largest proper divisor, the
smallest non-divisor, L-1, L, L+1, 2L. Query and key lengths are drawn independently, Hq is a
multiple of Hkv (grouped-query attention) and Dk, Dv are drawn independently.

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
                 chunked: bool, constraints: frozenset[str] = frozenset()) -> tuple[Dims, int | None, int | None]:
    """A bucket of ``COMPACT_SHAPES`` that fits the limits and constraints, and one of its chunk pairs."""
    buckets = []
    for (b, lq, lk, hq, hkv, dk, dv), chunks in COMPACT_SHAPES:
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


def pick_shape(pick: Pick, *, max_len: int, max_heads: int, max_dim: int, gqa: bool, min_dk: int,
               constraints: frozenset[str] = frozenset()) -> Dims:
    """Dims from the full menus: B in 1..2, Lq and Lk independently, Hq = Hkv * group, Dk and Dv independently
    (tied where the constraints say so, and only multiples where they ask for them)."""
    nl, nd = multiple_of(constraints, "len"), multiple_of(constraints, "dim")
    lengths = tuple(n for n in length_menu(max_len) if n % nl == 0)
    kv_heads = tuple(h for h in KV_HEADS if h <= max_heads)
    dims = tuple(d for d in HEAD_DIMS if d <= max_dim and d % nd == 0)
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
