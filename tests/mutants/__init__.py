"""The project's own mutant zoo: a clean chunked PyTorch attention and copies with one seeded bug each.

``BASE`` is the clean implementation (``tests.mutants.chunked``: FlashAttention-1-style online
softmax, float32 statistics and accumulator, hand-written chunked backward; masked rows give 0).
``MUTANTS`` maps a name to a ``Mutant`` that differs from ``BASE`` in exactly one place, each of
a different kind, every bug reachable with lengths <= 33 and the usual chunk sizes (1, divisors,
non-divisors, L-1, L, L+1, 2L, None), masks, causal, GQA, bias, and bf16/fp16/fp32 edge values.
All declare the same features as ``BASE``; ``Mutant.info()`` gives the ``TargetInfo`` the harness
uses (fp32 accumulation, neither logits nor probabilities rounded, masked rows -> zeros).
``Mutant.witness`` builds a hand-made case on which the mutant is clearly wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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

    def info(self) -> TargetInfo:
        """The target description the harness runs this implementation under."""
        return TargetInfo(
            name=f"mutant-{self.name}",
            framework="torch",
            features=self.features,
            masked_rows="zeros",
            contract=CONTRACT,
            description=self.description,
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
