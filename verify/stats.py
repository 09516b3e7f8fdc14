"""What a campaign generated: counts per shape, chunk kind, mask kind, family and feature.

A campaign that passes only says something about the cases it ran; ``Stats`` records them so the
JSON (and ``--stats``) show the distribution: length and head-dim histograms (power-of-two
buckets), the largest L and Dk reached, chunk kinds relative to the length (default, 1, divisor,
non-divisor, >= L), mask kinds, value families, the features each example exercised, the passes
run, and the drawn parameters of the options (window sides relative to the length, scale and
softcap values, the kind of ALiBi slopes, sinks and segments). Two campaigns with the same
settings have the same statistics; ``verify.coverage`` compares samples of what they draw.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from verify.case import Case


def size_bucket(n: int) -> str:
    """The power-of-two bucket of a size: "1", "2", "3-4", "5-8", ..., "1025-2048"."""
    if n <= 2:
        return str(n)
    hi = 1 << (n - 1).bit_length()
    return f"{hi // 2 + 1}-{hi}"


def chunk_kind(chunk: int | None, length: int) -> str:
    """How a chunk size relates to its length: default, 1, divides, not dividing, >= L."""
    if chunk is None:
        return "default"
    if chunk >= length:
        return ">=L"
    if chunk == 1:
        return "1"
    return "divides" if length % chunk == 0 else "non-divisor"


def window_side(side: int | None, length: int) -> str:
    """How one side of a window relates to the key length: none (unbounded), 0, 1, L-1, >=L, between."""
    if side is None:
        return "none"
    if side >= length:
        return ">=L"
    if side in (0, 1):
        return str(side)
    return "L-1" if side == length - 1 else "between"


def features_of(case: Case) -> list[str]:
    """The semantic features a case exercises (what a report can say was tested)."""
    feats = [name for name, used in (
        ("mask", case.mask is not None), ("bias", case.bias is not None), ("causal", case.causal),
        ("gqa", case.dims["Hq"] != case.dims["Hkv"]), ("dk!=dv", case.dims["Dk"] != case.dims["Dv"]),
        ("scale", case.scale is not None), ("bottom-right", case.align != "top-left"),
        ("window", case.window is not None), ("softcap", case.softcap is not None),
        ("alibi", case.alibi_slopes is not None), ("sinks", case.sinks is not None),
        ("segments", case.q_segment_ids is not None), ("lse-cotangent", case.g_lse is not None)) if used]
    return feats


def _order(key: str) -> tuple:
    """Numeric buckets ("9-16") by their low end, everything else by name."""
    head = key.split("-")[0]
    return (0, int(head), key) if head.isdigit() else (1, 0, key)


@dataclass
class Stats:
    """Counters over the examples of a campaign."""

    examples: int = 0
    max_len: int = 0
    max_dim: int = 0
    counts: dict[str, Counter] = field(default_factory=dict)

    def _count(self, what: str, key: str) -> None:
        self.counts.setdefault(what, Counter())[key] += 1

    def add(self, case: Case, passes: tuple[str, ...]) -> None:
        d = case.dims
        self.examples += 1
        self.max_len = max(self.max_len, d["Lq"], d["Lk"])
        self.max_dim = max(self.max_dim, d["Dk"], d["Dv"])
        self._count("Lq", size_bucket(d["Lq"]))
        self._count("Lk", size_bucket(d["Lk"]))
        self._count("Dk", size_bucket(d["Dk"]))
        self._count("query_chunk", chunk_kind(case.query_chunk_size, d["Lq"]))
        self._count("key_chunk", chunk_kind(case.key_chunk_size, d["Lk"]))
        self._count("mask_kind", case.mask_kind)
        self._count("family", case.family)
        self._count("dtype", case.dtype)
        self._count("passes", "+".join(passes) or "none")
        self._count("layout", case.layout)
        for feat in features_of(case) or ["none"]:
            self._count("features", feat)
        if case.window is not None:
            self._count("window_left", window_side(case.window[0], d["Lk"]))
            self._count("window_right", window_side(case.window[1], d["Lk"]))
        for what, value in (("scale", case.scale), ("softcap", case.softcap)):
            if value is not None:
                self._count(what, f"{value:g}")
        for what, how in case.meta.get("option_params", {}).items():  # alibi, sinks, segments: which kind
            self._count(what, str(how))

    def to_json(self) -> dict:
        return {"examples": self.examples, "max_len": self.max_len, "max_dim": self.max_dim,
                "counts": {k: dict(sorted(v.items(), key=lambda kv: _order(kv[0])))
                           for k, v in sorted(self.counts.items())}}

    @classmethod
    def from_json(cls, d: dict) -> Stats:
        """The counters ``to_json`` wrote."""
        return cls(d["examples"], d["max_len"], d["max_dim"], {k: Counter(v) for k, v in d["counts"].items()})

    def lines(self) -> list[str]:
        """One line per counter, for ``--stats``."""
        out = [f"examples {self.examples}; largest L {self.max_len}, largest head dim {self.max_dim}"]
        for what, counter in sorted(self.counts.items()):
            total = sum(counter.values())
            parts = ", ".join(f"{k} {100 * n / total:.0f}%" for k, n in sorted(counter.items(),
                                                                                  key=lambda kv: _order(kv[0])))
            out.append(f"{what}: {parts}")
        return out
