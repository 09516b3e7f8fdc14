"""The project's own mutant zoo: a clean chunked PyTorch attention and copies with one seeded bug each.

``BASE`` is the clean implementation (``tests.mutants.chunked``: FlashAttention-1-style online
softmax, float32 statistics and accumulator, hand-written chunked backward; masked rows give 0).
``MUTANTS`` maps a name to a ``Mutant`` that differs from ``BASE`` in exactly one place, each of
a different kind, every bug reachable with lengths <= 33 and the usual chunk sizes (1, divisors,
non-divisors, L-1, L, L+1, 2L, None), masks, causal, GQA, bias, and bf16/fp16/fp32 edge values.
All declare the same features as ``BASE``; ``Mutant.info()`` gives the ``TargetInfo`` the harness
uses (fp32 accumulation, neither logits nor probabilities rounded, masked rows -> zeros).
``Mutant.witness`` builds a hand-made case on which the mutant is clearly wrong.

Two more zoos, each a clean base and its mutants, built the same way:

- ``MODERN_BASE`` / ``MODERN_MUTANTS`` (``tests.mutants.modern``): the extended canonical signature
  (bottom-right, window, softcap, ALiBi, sinks, segments, lse), bugs drawn from real reports
  (softcap as ``s tanh(s)``, a right window beyond Lk dropping keys, window ``(-1, 0)`` giving zeros,
  ...); every bug reachable with the default campaign's small shapes;
- ``TILED_BASE`` / ``TILED_MUTANTS`` (``tests.mutants.tiled``): a kernel that picks its own tiles
  (64 query rows x 128 keys, head dim in blocks of 64, split-KV decoding), no ``chunks`` feature;
  its bugs show only beyond one tile, at head dims > 64 or when decoding against a long cache.

``Mutant.near_miss`` (when given) builds a case next to the trigger on which the mutant must equal its
base bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tests.mutants import modern, tiled
from tests.mutants import modern_witnesses as mw
from tests.mutants import tiled_witnesses as tw
from tests.mutants import witnesses as w
from tests.mutants.chunked import make
from verify.case import Case
from verify.targets.base import Contract, TargetInfo

FEATURES = frozenset({"mask", "bias", "causal", "gqa", "chunks", "grad"})
CONTRACT = Contract(accumulate="fp32", round_logits=False, round_probs=False)


@dataclass(frozen=True)
class Mutant:
    """One implementation of the zoo: its callable, declared features, bug kind and a witness case."""

    name: str
    fn: Callable[..., torch.Tensor]
    features: frozenset[str]
    kind: str
    description: str
    witness: Callable[[], Case] | None = None
    near_miss: Callable[[], Case] | None = None
    tiles: tuple[int, ...] = ()  # declared fixed tiles (the tiled zoo)

    def info(self) -> TargetInfo:
        """The target description the harness runs this implementation under."""
        return TargetInfo(
            name=f"mutant-{self.name}",
            framework="torch",
            features=self.features,
            masked_rows="zeros",
            contract=CONTRACT,
            description=self.description,
            tiles=self.tiles,
        )


BASE = Mutant(
    "clean",
    make("none"),
    FEATURES,
    kind="none",
    description="chunked online softmax (FlashAttention-1 form), fp32 statistics and accumulator, chunked backward",
)

_TABLE: list[tuple[str, str, str, Callable[[], Case]]] = [
    ("key_chunk_end", "key-chunk-boundary",
     "a partial last key chunk ends one key early: the final key is dropped", w.key_chunk_end),
    ("query_chunk_clamp", "query-chunk-boundary",
     "a partial last query chunk starts at Lq - chunk (dynamic_slice clamp): its rows come from earlier queries",
     w.query_chunk_clamp),
    ("no_acc_rescale", "rescaling-accumulator",
     "the running output is not rescaled by exp(m_old - m_new) when the max increases", w.rising_max),
    ("no_sum_rescale", "rescaling-sum",
     "the running sum is not rescaled by exp(m_old - m_new) (the output is)", w.rising_max),
    ("mask_last_chunk", "masking", "the boolean mask is ignored for keys in the last key chunk", w.mask_last_chunk),
    ("causal_local_index", "causal-chunk-offset",
     "causal test compares the query index with the key's index inside its chunk", w.causal),
    ("causal_strict", "causal-diagonal", "causal test uses j < i instead of j <= i", w.causal),
    ("no_max_subtraction", "overflow", "exp of raw logits (no max subtraction): overflows past ~88.7", w.overflow),
    ("stats_input_dtype", "low-precision-statistics",
     "running max and sum rounded to the input dtype after every key chunk", w.fp16_stuck_sum),
    ("acc_input_dtype", "low-precision-accumulation",
     "running output (p @ v accumulator) rounded to the input dtype after every key chunk", w.fp16_stuck_output),
    ("grad_no_delta", "gradient-formula", "backward uses dS = P * dP, forgetting the -rowsum(dO * O) term", w.gradient),
    ("grad_dk_no_scale", "gradient-scale", "backward forgets the softmax scale in dk", w.dk_scale),
    ("dbias_scaled", "gradient-dbias", "backward multiplies dbias by the softmax scale", w.dbias),
    ("masked_rows_uniform", "masked-row",
     "masked logits filled with finfo.min: fully masked rows return the mean of v", w.masked_row),
    ("gqa_modulo", "gqa", "query head h reads kv head h % Hkv instead of h // (Hq // Hkv)", w.gqa),
    ("bias_first_chunk", "bias", "bias (and its -inf) applied only to the first key chunk", w.bias_chunks),
    ("scale_dv", "scale", "default scale 1/sqrt(Dv) instead of 1/sqrt(Dk)", w.scale_dk_dv),
]

MUTANTS: dict[str, Mutant] = {
    name: Mutant(name, make(name), FEATURES, kind, description, witness)
    for name, kind, description, witness in _TABLE
}


MODERN_FEATURES = frozenset({"mask", "bias", "causal", "gqa", "chunks", "grad", "lse", "bottom-right", "window",
                             "softcap", "alibi", "sinks", "segments"})

MODERN_BASE = Mutant(
    "modern-clean",
    modern.make("none"),
    MODERN_FEATURES,
    kind="none",
    description="chunked online softmax (FlashAttention-2 form) with every modern option, fp32 statistics, "
                "hand-written backward with dsinks and the lse cotangent",
)

# name, kind, description, witness, near miss
_MODERN_TABLE: list[tuple[str, str, str, Callable[[], Case], Callable[[], Case]]] = [
    ("softcap_s_tanh", "softcap-formula",
     "softcap computed as t * tanh(t) instead of c * tanh(t / c)", mw.softcap_value, mw.no_softcap),
    ("softcap_no_grad", "softcap-gradient",
     "backward forgets the softcap's 1 - tanh^2(t / c) in dq and dk", mw.softcap_grad, mw.softcap_forward_only),
    ("window_right_clip", "window-beyond-lk",
     "a right window >= Lk is clipped to Lk - Lq instead of being unbounded: rows above the last lose keys",
     mw.window_right_beyond, mw.window_right_within),
    ("window_none_literal", "window-unbounded",
     "an unbounded window side (None, FlashAttention's -1) is used as the size -1: window (None, 0) gives zeros",
     mw.window_unbounded_left, mw.window_right_within),
    ("causal_ignores_align", "causal-align",
     "the causal mask is always top-left, ignoring align='bottom-right' (wrong when Lq != Lk)",
     mw.causal_bottom_right, mw.causal_square),
    ("alibi_no_offset", "alibi-offset",
     "ALiBi on |i - j|, without the bottom-right offset", mw.alibi_offset, mw.alibi_square),
    ("alibi_sign", "alibi-sign", "ALiBi added with the wrong sign (+slope * |i + off - j|)", mw.alibi_sign,
     mw.no_alibi),
    ("sink_not_in_sum", "sinks-normaliser",
     "the sink takes part in the max but not in the normaliser: out and lse as without a sink",
     mw.sink_normaliser, mw.sinks_minus_inf),
    ("sink_not_in_max", "sinks-max",
     "the sink is left out of the running max: exp(sink - max) overflows for a dominant sink",
     mw.sink_dominant, mw.sinks_minus_inf),
    ("lse_no_sink", "sinks-lse", "lse returned without the sink (the output is right)", mw.sink_lse,
     mw.sinks_minus_inf),
    ("dsinks_sign", "sinks-gradient", "dsinks with the wrong sign", mw.dsinks, mw.sinks_mild_no_grad),
    ("segments_last_chunk", "segments",
     "segment ids ignored for keys in the last key chunk", mw.segments_last_chunk, mw.segments_last_chunk_uniform),
    ("empty_lse_posinf", "empty-row-lse",
     "the lse of a row with no visible key is +inf (the backward's internal value), not -inf", mw.empty_row_lse,
     mw.no_empty_rows),
]

MODERN_MUTANTS: dict[str, Mutant] = {
    name: Mutant(name, modern.make(name), MODERN_FEATURES, kind, description, witness, near)
    for name, kind, description, witness, near in _MODERN_TABLE
}

TILED_FEATURES = frozenset({"mask", "bias", "causal", "gqa", "grad", "lse", "bottom-right"})

TILES = (tiled.TILE_M, tiled.TILE_N)  # the tiled zoo declares its query and key tiles
TILED_BASE = Mutant(
    "tiled-clean",
    tiled.make("none"),
    TILED_FEATURES,
    kind="none",
    description="fixed tiles of 64 queries x 128 keys, head dim in blocks of 64, causal tile skipping, split-KV "
                "decoding (Lq <= 4, Lk >= 512), fp32 statistics, tiled backward",
    tiles=TILES,
)

_TILED_TABLE: list[tuple[str, str, str, Callable[[], Case], Callable[[], Case]]] = [
    ("key_tile_tail", "key-tile-tail",
     "the last, partial key tile is dropped when Lk > 128 and Lk % 128 != 0", tw.key_tile_tail, tw.full_key_tiles),
    ("dk_tail", "head-dim-tail-logits",
     "q.k skips the last, partial head-dim block when Dk > 64 and Dk % 64 != 0", tw.head_dim_tail,
     tw.full_head_dim_blocks),
    ("dq_dim_tail", "head-dim-tail-dq",
     "dq's last, partial head-dim block is not written when Dk > 64 and Dk % 64 != 0 (padded dq tails at 72/104)",
     tw.head_dim_tail_grad, tw.full_head_dim_blocks),
    ("split_no_rescale", "split-kv-combine",
     "split-KV decoding adds the parts' partial sums and outputs without rescaling them by exp(m_part - m)",
     tw.split_kv, tw.no_split_kv),
    ("max_frozen", "running-max",
     "the running max is not updated from the second key tile on: a larger logit later overflows exp",
     tw.rising_max_tiles, tw.one_key_tile),
    ("causal_skip_padded", "causal-tile-skip",
     "causal tile skipping takes the bottom-right offset from Lq rounded up to whole query tiles: with "
     "Lq % 64 != 0 and Lk > 128 a later key tile holding a row's diagonal can be skipped", tw.causal_skip,
     tw.causal_full_tiles),
    ("dq_last_query_tile", "dq-query-tile-tail",
     "dq of the last, partial query tile is not written when Lq > 64 and Lq % 64 != 0", tw.query_tile_tail_grad,
     tw.full_query_tiles),
]

TILED_MUTANTS: dict[str, Mutant] = {
    name: Mutant(name, tiled.make(name), TILED_FEATURES, kind, description, witness, near, TILES)
    for name, kind, description, witness, near in _TILED_TABLE
}
