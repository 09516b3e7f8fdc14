"""Witness cases for the modern-option mutants (``tests.mutants.modern``), and their near misses.

Each witness is a small hand-made ``verify.case.Case`` whose ``meta["check"]`` says what goes wrong:
``forward`` (output beyond the allowance), ``lse`` (lse beyond it, or an empty row's lse not -inf),
``grad`` (a gradient, ``dsinks`` included, beyond it) or ``finite`` (a non-finite output or lse where
the exact one is finite). ``tests/test_mutant_zoo_modern.py`` checks that the clean base passes each
and the mutant fails it by more than 10x (and that the harness's own ``run_case`` agrees).

A *near miss* is a case as close to the trigger as the bug allows without reaching it (the option on,
the shape or value that triggers it off): there the mutant must equal the clean base bit for bit.
"""

from __future__ import annotations

import numpy as np

from verify.case import Case


def _seq(values: list[float], dtype: object = np.float32) -> np.ndarray:
    """A ``[1, L, 1, 1]`` array: one batch, one head, one feature."""
    return np.asarray(values, dtype=np.float64).reshape(1, -1, 1, 1).astype(dtype)


def _random(seed: int, lq: int, lk: int, hq: int = 2, hkv: int = 1, dk: int = 4, dv: int = 3,
            logit_scale: float = 1.0) -> dict:
    """Random fp32 q, k, v, g and g_lse (``logit_scale`` multiplies q: logits of about that size)."""
    r = np.random.default_rng(seed)
    f = np.float32
    return {
        "q": (logit_scale * r.standard_normal((1, lq, hq, dk))).astype(f),
        "k": r.standard_normal((1, lk, hkv, dk)).astype(f),
        "v": r.standard_normal((1, lk, hkv, dv)).astype(f),
        "g": r.standard_normal((1, lq, hq, dv)).astype(f),
        "g_lse": r.standard_normal((1, hq, lq)).astype(f),
    }


def _case(check: str, **kw: object) -> Case:
    return Case(family="witness", meta={"check": check}, **kw)


def _equal_logits(lq: int, lk: int, check: str = "forward", **kw: object) -> Case:
    """q = 0 (every logit 0 before the options act), v = 1, 2, ..., Lk: the output names the weights."""
    return _case(check, q=_seq([0] * lq), k=_seq([1] * lk), v=_seq(list(range(1, lk + 1))), **kw)


# --- witnesses ---------------------------------------------------------------------------------------------


def softcap_value() -> Case:
    """softcap=5 on logits of about 2: ``t tanh(t)`` is about ``t^2``, not ``5 tanh(t / 5)``."""
    return _case("forward", **_random(21, 3, 5, logit_scale=2.0), softcap=5.0)


def softcap_grad() -> Case:
    """softcap=1 on logits of about 3: ``1 - tanh^2`` is far below 1, so dq and dk without it are far off."""
    return _case("grad", **_random(22, 3, 5, logit_scale=3.0), softcap=1.0)


def window_right_beyond() -> Case:
    """Lq = Lk = 4, window (None, 6): every key is visible; clipped to (None, 0) it is causal."""
    return _equal_logits(4, 4, window=(None, 6))


def window_unbounded_left() -> Case:
    """Window (None, 0), FlashAttention's (-1, 0): causal, not all rows empty."""
    return _equal_logits(4, 4, window=(None, 0))


def causal_bottom_right() -> Case:
    """Lq=2, Lk=5, causal bottom-right: row i sees keys 0..i+3, not 0..i."""
    return _equal_logits(2, 5, causal=True, align="bottom-right")


def alibi_offset() -> Case:
    """Lq=2, Lk=5, bottom-right ALiBi with slope 1: weights exp(-|i + 3 - j|), not exp(-|i - j|)."""
    return _equal_logits(2, 5, align="bottom-right", alibi_slopes=np.array([1.0], np.float32))


def alibi_sign() -> Case:
    """Lq = Lk = 4, ALiBi slope 1: weights exp(-|i - j|), not exp(+|i - j|)."""
    return _equal_logits(4, 4, alibi_slopes=np.array([1.0], np.float32))


def sink_normaliser() -> Case:
    """Three equal logits and a sink of 1: out = (1 + 2 + 3) / (e + 3), not (1 + 2 + 3) / 3."""
    return _equal_logits(1, 3, sinks=np.array([1.0], np.float32))


def sink_lse() -> Case:
    """The same call, checking lse: log(e + 3), not log 3."""
    return _equal_logits(1, 3, "lse", sinks=np.array([1.0], np.float32))


def sink_dominant() -> Case:
    """A sink of 100 over logits of 0: ``exp(sink - max of the keys)`` overflows fp32; the exact lse is 100."""
    return _equal_logits(1, 3, "finite", sinks=np.array([100.0], np.float32))


def dsinks() -> Case:
    """Random fp32 with mild sinks and an lse cotangent: checks dsinks (and every other gradient)."""
    return _case("grad", **_random(23, 3, 5), sinks=np.array([0.5, -1.0], np.float32))


def segments_last_chunk() -> Case:
    """Key chunk 2, segments q [0, 1], kv [0, 0, 1, 1]: query 0 must not see keys 2, 3 (the last chunk)."""
    return _case("forward", q=_seq([0, 0]), k=_seq([1, 1, 1, 1]), v=_seq([1, 2, 10, 20]), key_chunk_size=2,
                 q_segment_ids=np.array([[0, 1]], np.int32), kv_segment_ids=np.array([[0, 0, 1, 1]], np.int32))


def empty_row_lse() -> Case:
    """Query row 1 sees no key (and there is no sink): its lse must be -inf."""
    mask = np.array([[True, True, True], [False, False, False]]).reshape(1, 1, 2, 3)
    return _case("lse", q=_seq([1, 1]), k=_seq([0, 1, 2]), v=_seq([1, 2, 3]), mask=mask, mask_kind="masked-row")


# --- near misses: the option on, its trigger off -----------------------------------------------------------


def _near(seed: int, lq: int = 4, lk: int = 6, **kw: object) -> Case:
    return Case(**_random(seed, lq, lk), key_chunk_size=4, family="near-miss", **kw)


def no_softcap() -> Case:
    """Everything but a softcap (bias, causal bottom-right, window, ALiBi, sinks): softcap bugs cannot act."""
    r = np.random.default_rng(30)
    return _near(30, causal=True, align="bottom-right", window=(3, 1), bias=r.standard_normal((1, 2, 4, 6)).astype(
        np.float32), alibi_slopes=np.array([0.25, 0.5], np.float32), sinks=np.array([0.5, 1.0], np.float32))


def softcap_forward_only() -> Case:
    """A softcap, no cotangent: the forward of a backward-only bug is the clean one."""
    return _near(31, softcap=2.0).with_(g=None, g_lse=None)


def window_right_within() -> Case:
    """Windows whose sides are all given and within Lk (right = Lk - 1 included)."""
    return _near(32, window=(2, 5))


def causal_square() -> Case:
    """Causal bottom-right with Lq == Lk (both alignments agree), plus a window and ALiBi."""
    return _near(33, lq=6, lk=6, causal=True, align="bottom-right", window=(2, None),
                 alibi_slopes=np.array([0.25, 0.5], np.float32))


def alibi_square() -> Case:
    """ALiBi with Lq == Lk and bottom-right (offset 0), slopes per batch and head."""
    return _near(34, lq=6, lk=6, align="bottom-right", alibi_slopes=np.array([[0.25, 0.5]], np.float32))


def no_alibi() -> Case:
    """Bottom-right causal and a window, no ALiBi."""
    return _near(35, lq=3, lk=6, causal=True, align="bottom-right", window=(4, 0))


def sinks_minus_inf() -> Case:
    """Sinks of -inf: exactly no sink, forward and backward."""
    return _near(36, sinks=np.array([-np.inf, -np.inf], np.float32), causal=True)


def sinks_mild_no_grad() -> Case:
    """Mild sinks, forward only: dsinks is never computed."""
    return _near(37, sinks=np.array([0.5, -1.0], np.float32)).with_(g=None, g_lse=None)


def segments_last_chunk_uniform() -> Case:
    """Segments that differ only in keys before the last key chunk (which all share every query's segment)."""
    return _near(38, lq=4, lk=6, q_segment_ids=np.array([[1, 1, 1, 1]], np.int32),
                 kv_segment_ids=np.array([[0, 2, 0, 1, 1, 1]], np.int32))


def no_empty_rows() -> Case:
    """A mask that leaves every row a key, causal top-left, lse cotangent: no empty row's lse to return."""
    mask = np.random.default_rng(39).random((1, 2, 4, 6)) < 0.6
    mask[..., 0] = True
    return _near(39, mask=mask, causal=True)
