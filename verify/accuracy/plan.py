"""What a sweep runs: its settings, the grid of cells, their ids and the seeds of their inputs.

A *cell* is (dtype, query chunk, key chunk, L, family, mask kind) with Lq = Lk = L and B/H/D fixed
(Hq = Hkv, Dk = Dv), computed on ``seeds`` cases. The inputs of a seed depend only on (``seed``,
dtype, L, family, mask kind, seed index) -- not on the chunk sizes or the target -- so chunk
settings, targets and baselines are compared on the very same inputs (``strategies.make_case``;
``dominant-key`` and the chunk-aligned mask kinds align to the key chunk, so there they differ).
Chunk sizes are numbers or ``L``; a size splitting L into more than ``max_chunks`` chunks is skipped.
Targets without the ``chunks`` feature get one row (None); only declared dtypes and mask kinds run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from oracles import spec
from verify.checks import DEFAULT_TIMEOUT
from verify.strategies import FAMILIES, MASK_KINDS, MASK_NEEDS
from verify.targets import DEFAULT_DTYPES, TargetInfo, TargetSpec

SCHEMA_VERSION = 2
CELL_AXES = ("dtype", "query_chunk", "key_chunk", "length", "family", "mask")


@dataclass(frozen=True)
class Settings:
    """The sweep: grid axes, seeds per cell, fixed dims and how references and chunk sizes are chosen."""

    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    lengths: tuple[int, ...] = (16, 64, 256)
    query_chunks: tuple[str, ...] = ("16", "24", "L")  # 24 divides no default length: the last chunk is short
    key_chunks: tuple[str, ...] = ("1", "16", "24", "L")
    families: tuple[str, ...] = ("normal", "large-logits", "row-offset")
    masks: tuple[str, ...] = ("none", "causal")
    seeds: int = 2
    seed: int = 0
    batch: int = 1
    heads: int = 2
    head_dim: int = 16
    mp_max_len: int = 64  # the mp oracle decides up to this L; above, the certified float64 reference
    max_chunks: int = 16
    timeout: float = DEFAULT_TIMEOUT

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        for d in self.dtypes:
            spec.dtype_name(d)
        for what, names, known in (("family", self.families, FAMILIES), ("mask kind", self.masks, MASK_KINDS)):
            bad = [n for n in names if n not in known]
            if bad or not names:
                raise ValueError(f"unknown or empty {what} list {bad or list(names)}; known: {', '.join(known)}")
        for c in self.query_chunks + self.key_chunks:
            if c != "L" and not (c.isdigit() and int(c) > 0):
                raise ValueError(f"chunk size {c!r}: give a positive integer or L")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive, got {list(self.lengths)}")
        if min(self.seeds, self.batch, self.heads, self.head_dim, self.max_chunks) < 1:
            raise ValueError("seeds, batch, heads, head-dim and max-chunks must be >= 1")
        if "row-offset" in self.families and self.head_dim < 2:
            raise ValueError("row-offset needs --head-dim >= 2")

    def dims(self, length: int) -> dict[str, int]:
        return {"B": self.batch, "Lq": length, "Lk": length, "Hq": self.heads, "Hkv": self.heads,
                "Dk": self.head_dim, "Dv": self.head_dim}


def _chunks(specs: tuple[str, ...], length: int, max_chunks: int) -> tuple[list[int], list[int]]:
    """(kept, skipped) chunk sizes for L: ``L`` resolved, duplicates dropped, too many chunks skipped."""
    sizes = sorted({length if c == "L" else int(c) for c in specs})
    return [c for c in sizes if -(-length // c) <= max_chunks], [c for c in sizes if -(-length // c) > max_chunks]


def plan(info: TargetInfo, sett: Settings) -> tuple[list[dict], dict]:
    """The cells (keys, in report order) for a target, and what was left out and why."""
    dtypes = [d for d in (spec.dtype_name(x) for x in sett.dtypes) if d in info.dtypes]
    masks = [m for m in sett.masks if MASK_NEEDS[m] in info.features | {None}]
    skipped: dict = {
        "dtypes": [d for d in sett.dtypes if spec.dtype_name(d) not in info.dtypes],
        "masks": [m for m in sett.masks if m not in masks],
        "chunks": [],
    }
    cells = []
    for dtype in dtypes:
        for length in sorted(set(sett.lengths)):
            if "chunks" in info.features:
                qcs, qskip = _chunks(sett.query_chunks, length, sett.max_chunks)
                kcs, kskip = _chunks(sett.key_chunks, length, sett.max_chunks)
                if dtype == dtypes[0]:
                    skipped["chunks"] += [f"L={length}: {axis} chunk {c} (> {sett.max_chunks} chunks)"
                                          for axis, cs in (("query", qskip), ("key", kskip)) for c in cs]
            else:
                qcs, kcs = [None], [None]
            for qc in qcs:
                for kc in kcs:
                    for family in sett.families:
                        for mask in masks:
                            cells.append({"dtype": dtype, "query_chunk": qc, "key_chunk": kc, "length": length,
                                          "family": family, "mask": mask})
    return cells, skipped


def cell_key(cell: dict) -> tuple:
    """What identifies a cell across reports: (dtype, query chunk, key chunk, length, family, mask)."""
    return tuple(cell[k] for k in CELL_AXES)


def key_chunks(cell: dict) -> int:
    """How many key chunks the cell's key chunk size splits L into (1 for a target's own chunking)."""
    return 1 if cell["key_chunk"] is None else -(-cell["length"] // cell["key_chunk"])


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def context(target: TargetSpec, sett: Settings) -> dict:
    """Everything besides the cell key that changes a cell's figures (part of its id)."""
    return {"schema_version": SCHEMA_VERSION, "target": target.to_meta(), "seeds": sett.seeds, "seed": sett.seed,
            "batch": sett.batch, "heads": sett.heads, "head_dim": sett.head_dim, "mp_max_len": sett.mp_max_len,
            "timeout": sett.timeout}


def cell_id(ctx: dict, cell: dict) -> str:
    """The cell's file name stem under ``OUT/cells``."""
    return _digest({"context": ctx, "cell": [cell[k] for k in sorted(cell)]})[:20]


def data_seed(base: int, dtype: str, length: int, family: str, mask: str, index: int) -> int:
    """The numpy seed of a cell's ``index``-th case: independent of chunk sizes and target."""
    return int(_digest([base, dtype, length, family, mask, index])[:8], 16)

