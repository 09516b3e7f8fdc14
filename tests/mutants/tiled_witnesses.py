"""Witness cases for the fixed-tile mutants (``tests.mutants.tiled``), and their near misses.

The bugs live beyond one tile (64 queries x 128 keys, head-dim blocks of 64) or in split-KV decoding
(Lq <= 4 against Lk >= 512), so the witnesses are large: Lk = 150 or 200, Dk = 72, Lq = 100, a decode
against Lk = 700. They are bf16 (the kernel computes in fp32 and rounds once, so a correct result is
within about ``u * A`` of the exact one, ``u = 2^-8``) and are checked against the float64
``oracles.naive`` reference (``meta["check"]``: ``forward``, ``grad`` or ``finite``, as in
``tests.mutants.witnesses``). Each witness puts its signal where the bug acts: the keys of the dropped
tile, the dims of the dropped head-dim block, a decode part with its own maximum.

A *near miss* sits next to the trigger without reaching it (a multiple of the tile, a single tile, no
split): there the mutant equals the clean base bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from verify.case import Case

_BF16 = np.dtype(ml_dtypes.bfloat16)


def _arrays(seed: int, lq: int, lk: int, hq: int = 2, hkv: int = 1, dk: int = 16, dv: int = 16,
            dtype: object = _BF16) -> dict:
    """Random normal q, k, v, g (exactly representable in ``dtype``)."""
    r = np.random.default_rng(seed)

    def arr(*shape: int) -> np.ndarray:
        return r.standard_normal(shape).astype(np.float32).astype(dtype)

    return {"q": arr(1, lq, hq, dk), "k": arr(1, lk, hkv, dk), "v": arr(1, lk, hkv, dv), "g": arr(1, lq, hq, dv)}


def _channel(lq: int, lk: int, logits: list[tuple[slice | int, float]], hq: int = 2, dk: int = 16) -> tuple:
    """bf16 q, k whose logits (default scale 1/sqrt(dk)) are 0 except ``logits[keys]`` for the given keys."""
    q = np.zeros((1, lq, hq, dk))
    q[..., 0] = 1.0
    k = np.zeros((1, lk, 1, dk))
    for keys, value in logits:
        k[:, keys, :, 0] = value * np.sqrt(dk)
    return q.astype(_BF16), k.astype(_BF16)


def _case(check: str, **kw: object) -> Case:
    return Case(family="witness", meta={"check": check}, **kw)


def _split_values(lk: int, at: int, dv: int = 16) -> np.ndarray:
    """v = -1 before key ``at`` and +1 from it on: the output says how much weight the later keys got."""
    v = np.where(np.arange(lk) < at, -1.0, 1.0)[None, :, None, None]
    return np.broadcast_to(v, (1, lk, 1, dv)).astype(_BF16)


# --- witnesses ---------------------------------------------------------------------------------------------


def key_tile_tail() -> Case:
    """Lk = 200 (a full key tile and one of 72): v = -1 in the first tile, +1 in the partial one."""
    a = _arrays(41, 3, 200)
    return _case("forward", q=a["q"], k=a["k"], v=_split_values(200, 128))


def _tail_signal(seed: int, lq: int, lk: int, dk: int = 72) -> dict:
    """Random bf16 arrays whose logits come mostly from head dims 64..dk-1 (the partial block)."""
    a = _arrays(seed, lq, lk, dk=dk)
    r = np.random.default_rng(seed + 1)
    q = a["q"].astype(np.float64) * 0.25
    k = a["k"].astype(np.float64) * 0.25
    q[..., 64:] = 1.0
    k[..., 64:] = (3.0 * r.standard_normal((1, lk, 1, 1))).round(1)
    return dict(a, q=q.astype(_BF16), k=k.astype(_BF16))


def head_dim_tail() -> Case:
    """Dk = 72: the logits' signal is in dims 64..71; without them the weights are nearly uniform."""
    a = _tail_signal(42, 3, 40)
    del a["g"]
    return _case("forward", **a)


def head_dim_tail_grad() -> Case:
    """Dk = 72 as above, with a cotangent: dq's columns 64..71 carry the largest gradient."""
    return _case("grad", **_tail_signal(43, 3, 40))


def split_kv() -> Case:
    """Decode Lq = 1 against Lk = 700 (4 parts of 1-2 key tiles): key 10 is 8 above the rest, in part 0 only."""
    q, k = _channel(1, 700, [(10, 8.0)])
    v = _arrays(44, 1, 700)["v"]
    return _case("forward", q=q, k=k, v=v)


def rising_max_tiles() -> Case:
    """Lk = 200: logits 0 in the first key tile, key 150 at 100: exp(100 - 0) overflows fp32."""
    q, k = _channel(2, 200, [(150, 100.0)])
    return _case("finite", q=q, k=k, v=_arrays(45, 2, 200)["v"])


def causal_skip() -> Case:
    """Lq = 3, Lk = 150, causal bottom-right: every row sees the second key tile (keys 128..), which has
    logits 2 and v = +1 against v = -1 before it."""
    q, k = _channel(3, 150, [(slice(128, None), 2.0)])
    return _case("forward", q=q, k=k, v=_split_values(150, 128), causal=True, align="bottom-right")


def query_tile_tail_grad() -> Case:
    """Lq = 100 (a full query tile and one of 36), random, with a cotangent: dq of rows 64..99."""
    return _case("grad", **_arrays(46, 100, 40))


# --- near misses -------------------------------------------------------------------------------------------


def _near(seed: int, lq: int, lk: int, **kw: object) -> Case:
    extra = {n: kw.pop(n) for n in ("dk", "dv") if n in kw}
    return Case(**_arrays(seed, lq, lk, dtype=np.float32, **extra), family="near-miss", **kw)


def full_key_tiles() -> Case:
    """Lk = 256 (two full key tiles), two query tiles, causal."""
    return _near(50, 70, 256, causal=True)


def full_head_dim_blocks() -> Case:
    """Dk = 128 (two full head-dim blocks), Dv = 72, Lq and Lk beyond one tile."""
    return _near(51, 65, 130, dk=128, dv=72)


def no_split_kv() -> Case:
    """Lq = 5 against Lk = 700: one row too many to decode, so no split."""
    return _near(52, 5, 700)


def one_key_tile() -> Case:
    """Lk = 128 (one key tile), two query tiles."""
    return _near(53, 100, 128)


def causal_full_tiles() -> Case:
    """Causal bottom-right with Lq = 128 (whole query tiles) against Lk = 300."""
    return _near(54, 128, 300, causal=True, align="bottom-right")


def full_query_tiles() -> Case:
    """Lq = 128 (two full query tiles), with a cotangent."""
    return _near(55, 128, 40)
