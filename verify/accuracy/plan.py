"""What a sweep runs: its settings, the grid of cells, their ids and the seeds of their inputs.

A *cell* is (dtype, query chunk, key chunk, L, family, mask kind, softcap, window) with Lq = Lk = L
and B/H/D fixed (Hq = Hkv, Dk = Dv), computed on ``seeds`` cases. The inputs of a seed depend only
on (``seed``, dtype, L, family, mask kind, seed index) -- not on the chunk sizes, softcap, window or
the target -- so chunk settings, softcaps, windows, targets and baselines are compared on the very
same q, k, v, masking and g (``strategies.make_case`` draws no option it is given; ``dominant-key``
and the chunk-aligned mask kinds align to the key chunk, so there they differ).
Chunk sizes are numbers or ``L``; a size splitting L into more than ``max_chunks`` chunks is skipped.
Softcaps are ``none`` or a number c > 0; windows ``none`` or ``LEFT:RIGHT`` (query i sees keys
i - LEFT .. i + RIGHT, an empty side unbounded: ``16:0``, ``:4``, ``64:``). In a cell a softcap is a
float or None and a window a ``[left, right]`` list or None.
Targets without the ``chunks`` feature get one row (None), targets without ``softcap`` or ``window``
only ``none`` of those; only declared dtypes and mask kinds run. What is left out is listed as skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from oracles import spec
from verify.checks import DEFAULT_TIMEOUT
from verify.strategies import FAMILIES, MASK_KINDS, MASK_NEEDS
from verify.targets import DEFAULT_DTYPES, TargetInfo, TargetSpec

SCHEMA_VERSION = 3  # 3: softcap and window axes (every cell id changed)
CELL_AXES = ("dtype", "query_chunk", "key_chunk", "length", "family", "mask", "softcap", "window")


def parse_softcap(text: str) -> float | None:
    """``none`` -> None, else the cap c > 0; ValueError saying what to give."""
    if text.lower() == "none":
        return None
    try:
        cap = float(text)
    except ValueError:
        cap = math.nan
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap {text!r}: give a finite number > 0 or none")
    return cap


def parse_window(text: str) -> list[int | None] | None:
    """``none`` -> None, ``LEFT:RIGHT`` -> [left, right] (an empty side: None, unbounded); ValueError else."""
    if text.lower() == "none":
        return None
    sides = re.fullmatch(r"(\d*):(\d*)", text, re.ASCII)
    if sides is None:
        raise ValueError(f"window {text!r}: give LEFT:RIGHT (ints >= 0, an empty side unbounded: 16:0, :4, 64:) "
                         "or none")
    return [int(x) if x else None for x in sides.groups()]


def softcap_label(cap: float | None) -> str:
    """``none`` or the cap as ``--softcaps`` takes it (``50``, ``2.5``)."""
    return "none" if cap is None else f"{cap:g}"


def window_label(window: list[int | None] | tuple[int | None, int | None] | None) -> str:
    """``none`` or ``LEFT:RIGHT`` with an empty side for unbounded: what ``--windows`` takes back."""
    return "none" if window is None else ":".join("" if w is None else str(w) for w in window)


@dataclass(frozen=True)
class Settings:
    """The sweep: grid axes, seeds per cell, fixed dims and how references and chunk sizes are chosen."""

    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    lengths: tuple[int, ...] = (16, 64, 256)
    query_chunks: tuple[str, ...] = ("16", "24", "L")  # 24 divides no default length: the last chunk is short
    key_chunks: tuple[str, ...] = ("1", "16", "24", "L")
    families: tuple[str, ...] = ("normal", "large-logits", "row-offset", "rising")  # rising: chunks = rescalings
    masks: tuple[str, ...] = ("none", "causal")
    softcaps: tuple[str, ...] = ("none",)  # none or c > 0
    windows: tuple[str, ...] = ("none",)  # none or LEFT:RIGHT, an empty side unbounded
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
        for what, values, parse in (("softcap", self.softcaps, parse_softcap), ("window", self.windows, parse_window)):
            if not values:
                raise ValueError(f"empty {what} list: give none or values")
            for x in values:
                parse(x)
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


def _options(texts: tuple[str, ...], parse: Callable, label: Callable, declared: bool) -> tuple[list, list[str]]:
    """(values to run, labels skipped) of a softcap or window list: duplicates dropped, only None if undeclared."""
    values = list({label(v): v for v in map(parse, texts)}.values())
    kept = values if declared else [None]
    return kept, [label(v) for v in values if v not in kept]


def plan(info: TargetInfo, sett: Settings) -> tuple[list[dict], dict]:
    """The cells (keys, in report order) for a target, and what was left out and why."""
    dtypes = [d for d in (spec.dtype_name(x) for x in sett.dtypes) if d in info.dtypes]
    masks = [m for m in sett.masks if MASK_NEEDS[m] in info.features | {None}]
    softcaps, skipped_caps = _options(sett.softcaps, parse_softcap, softcap_label, "softcap" in info.features)
    windows, skipped_windows = _options(sett.windows, parse_window, window_label, "window" in info.features)
    skipped: dict = {
        "dtypes": [d for d in sett.dtypes if spec.dtype_name(d) not in info.dtypes],
        "masks": [m for m in sett.masks if m not in masks],
        "chunks": [],
        "softcaps": skipped_caps,
        "windows": skipped_windows,
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
                            cells += [{"dtype": dtype, "query_chunk": qc, "key_chunk": kc, "length": length,
                                       "family": family, "mask": mask, "softcap": cap, "window": window}
                                      for cap in softcaps for window in windows]
    return cells, skipped


def cell_key(cell: dict) -> tuple:
    """What identifies a cell across reports: its ``CELL_AXES`` values (a window as a tuple, to be hashable)."""
    return tuple(tuple(cell[k]) if isinstance(cell[k], list) else cell[k] for k in CELL_AXES)


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

