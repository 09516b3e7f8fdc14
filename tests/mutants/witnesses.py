"""Hand-made witness cases: for each seeded bug, one small case on which the mutant is clearly wrong.

Each function returns a ``verify.case.Case`` whose ``meta["check"]`` says what goes wrong:
``forward`` (output beyond the allowance), ``grad`` (a gradient beyond it) or ``finite``
(non-finite output where the exact one is finite). ``tests/test_mutant_zoo_sanity.py`` checks
that the clean base passes and the mutant fails each one by more than 10x the allowance.
"""

from __future__ import annotations

import numpy as np

from verify.case import Case

_FP16_STUCK = -7.63671875  # exp(this) = 0.99 * 2**-11: adding it to 1 in fp16 changes nothing
_STUCK_KEYS = 64


def _seq(values: list[float], dtype: object = np.float32) -> np.ndarray:
    """A ``[1, L, 1, 1]`` array: one batch, one head, one feature."""
    return np.asarray(values, dtype=np.float64).reshape(1, -1, 1, 1).astype(dtype)


def _random(seed: int, lq: int, lk: int, hq: int = 1, hkv: int = 1, dk: int = 3, dv: int = 3) -> dict:
    r = np.random.default_rng(seed)
    return {
        "q": r.standard_normal((1, lq, hq, dk)).astype(np.float32),
        "k": r.standard_normal((1, lk, hkv, dk)).astype(np.float32),
        "v": r.standard_normal((1, lk, hkv, dv)).astype(np.float32),
        "g": r.standard_normal((1, lq, hq, dv)).astype(np.float32),
    }


def _case(check: str, **kw: object) -> Case:
    return Case(family="witness", meta={"check": check}, **kw)


def key_chunk_end() -> Case:
    """Lk=5, key chunk 2: the dominant last key is dropped."""
    return _case("forward", q=_seq([1]), k=_seq([0, 0, 0, 0, 3]), v=_seq([0, 0, 0, 0, 1]), key_chunk_size=2)


def query_chunk_clamp() -> Case:
    """Lq=5, query chunk 2: row 4 is computed from query row 3."""
    return _case("forward", q=_seq([0, 0.5, 1, -1, 2]), k=_seq([-1, 1]), v=_seq([-1, 1]), query_chunk_size=2)


def rising_max() -> Case:
    """Key chunk 1, the second key's logit is 3 above the first: the running max increases."""
    return _case("forward", q=_seq([1]), k=_seq([0, 3]), v=_seq([1, -1]), key_chunk_size=1)


def mask_last_chunk() -> Case:
    """Lk=4, key chunk 2: the masked, dominant key 3 lies in the last chunk."""
    mask = np.array([True, True, True, False]).reshape(1, 1, 1, 4)
    return _case("forward", q=_seq([1]), k=_seq([0, 0, 0, 3]), v=_seq([1, 2, 3, 10]), mask=mask, key_chunk_size=2)


def causal() -> Case:
    """Causal 4x4 with equal logits, key chunk 2: row i is the mean of v[0..i]."""
    return _case("forward", q=_seq([1, 1, 1, 1]), k=_seq([0, 0, 0, 0]), v=_seq([1, 2, 3, 4]), causal=True,
                 key_chunk_size=2)


def overflow() -> Case:
    """fp32 logits 100 and 90: exp overflows without the max subtraction."""
    return _case("finite", q=_seq([10]), k=_seq([10, 9]), v=_seq([1, 2]), scale=1.0)


def fp16_stuck_sum() -> Case:
    """fp16, key chunk 1: a weight-1 key, then 64 keys of weight 0.99 * 2**-11, all v = 1.

    An fp16 running sum stays at 1, so the output drifts to 1 + 64 * 0.99 * 2**-11 (exact: 1).
    """
    k = _seq([0] + [_FP16_STUCK] * _STUCK_KEYS, np.float16)
    return _case("forward", q=_seq([1], np.float16), k=k, v=_seq([1] * (_STUCK_KEYS + 1), np.float16), key_chunk_size=1)


def fp16_stuck_output() -> Case:
    """fp16, key chunk 1: as ``fp16_stuck_sum`` but the light keys have v = 2.

    Each step would raise the output by less than half an fp16 ulp of 1, so an fp16 accumulator stays at 1
    (exact: about 1.030).
    """
    k = _seq([0] + [_FP16_STUCK] * _STUCK_KEYS, np.float16)
    v = _seq([1] + [2] * _STUCK_KEYS, np.float16)
    return _case("forward", q=_seq([1], np.float16), k=k, v=v, key_chunk_size=1)


def gradient() -> Case:
    """Random fp32, 3 queries, 4 keys, Dk=Dv=3, two key chunks: checks dq, dk, dv."""
    return _case("grad", **_random(1, 3, 4), key_chunk_size=2)


def dk_scale() -> Case:
    """Random fp32 with Dk=4 (scale 1/2): dk without the scale is twice too large."""
    return _case("grad", **_random(2, 3, 4, dk=4), key_chunk_size=3)


def dbias() -> Case:
    """Random fp32 with a full bias and Dk=4: checks dbias."""
    bias = np.random.default_rng(3).standard_normal((1, 1, 3, 4)).astype(np.float32)
    return _case("grad", **_random(4, 3, 4, dk=4), bias=bias, key_chunk_size=2)


def masked_row() -> Case:
    """Query row 1 has no visible key: its output must be 0."""
    mask = np.array([[True, True, True], [False, False, False]]).reshape(1, 1, 2, 3)
    return _case("forward", q=_seq([1, 1]), k=_seq([0, 1, 2]), v=_seq([1, 2, 3]), mask=mask, mask_kind="masked-row")


def gqa() -> Case:
    """Random fp32 with Hq=4, Hkv=2: query head 1 must read kv head 0."""
    arrays = _random(5, 2, 3, hq=4, hkv=2)
    del arrays["g"]
    return _case("forward", **arrays)


def bias_chunks() -> Case:
    """Lk=4, key chunk 2: the bias of the second chunk (including a -inf) matters."""
    bias = np.array([0, 1, 2, -np.inf], dtype=np.float32).reshape(1, 1, 1, 4)
    return _case("forward", q=_seq([0]), k=_seq([0, 0, 0, 0]), v=_seq([1, 2, 3, 4]), bias=bias, key_chunk_size=2)


def scale_dk_dv() -> Case:
    """Dk=4, Dv=1, default scale: 1/sqrt(Dk) = 1/2, not 1/sqrt(Dv) = 1."""
    q = np.ones((1, 1, 1, 4), dtype=np.float32)
    k = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=np.float32).reshape(1, 2, 1, 4)
    return _case("forward", q=q, k=k, v=_seq([1, 0]))
