"""Memory against sequence length, per (query chunk, key chunk) policy, and the seed question answered.

``run(target, settings, out)`` measures a target (and a dense reference of its framework) with
``measure``, reads the measurements with ``analysis`` and writes memory.json, memory.md and
memory.png with ``render``; it returns the JSON document. The ``attnverify memory`` command and
the main job both call it; nothing here parses command lines.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from verify.memory.analysis import PAPER_LENGTH, ratios
from verify.memory.measure import MEASURES, PASSES, Policy, Row, measure, parse_policies
from verify.memory.render import summary, write_report
from verify.targets import TargetSpec

DENSE = {"jax": "jax-dpa", "torch": "torch-sdpa"}
DEFAULT_LENGTHS = {"jax": (1024, 4096, 16384, 65536), "torch": (256, 1024, 4096)}  # powers of 4: isqrt(L) divides L

__all__ = ["DENSE", "DEFAULT_LENGTHS", "MEASURES", "PASSES", "Policy", "Settings", "run", "summary"]


@dataclass(frozen=True)
class Settings:
    """What to measure: lengths (None: the framework's default), policies, shape and the chunk sweeps."""

    lengths: tuple[int, ...] | None = None
    policies: str = "1024x4096,1024xsqrt,sqrtxsqrt,64x64"
    heads: int = 1
    dim: int = 64
    batch: int = 1
    dtype: str = "fp32"
    reference: str = "auto"  # dense target for the ratio: auto (by framework), a name, or "none"
    sweep_length: int | None = None  # L of the chunk sweeps (None: 16384 if measured, else the largest)
    query_chunks: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    key_chunks: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def run(target: TargetSpec, sett: Settings, out: Path) -> dict:
    """Measure ``target``, write memory.json / .md / .png into ``out``, return the JSON document."""
    adapter = target.load()
    framework = adapter.info.framework
    if framework not in MEASURES:
        raise ValueError(f"memory: target {target.name} is {framework}; only jax and torch targets are measured")
    lengths = sorted(set(sett.lengths or DEFAULT_LENGTHS[framework]))
    policies = parse_policies(sett.policies)
    shape = {"heads": sett.heads, "dim": sett.dim, "dtype": sett.dtype, "batch": sett.batch}
    chunked = "chunks" in adapter.info.features
    rows = measure(adapter, lengths, policies, **shape)
    reference = DENSE[framework] if sett.reference == "auto" else sett.reference
    ratio_rows: list[dict] = []
    if reference != "none" and reference != adapter.info.name:
        dense = measure(TargetSpec(reference).load(), lengths, [], **shape)
        ratio_rows = ratios(dense, rows) if chunked else []
        rows = rows + dense
    sweep: list[Row] = []
    if chunked:
        n = sett.sweep_length or (PAPER_LENGTH if PAPER_LENGTH in lengths else lengths[-1])
        root = str(math.isqrt(n))
        for prefix, sizes, make in (("q-sweep", sett.query_chunks, lambda c: Policy(str(c), root)),
                                    ("k-sweep", sett.key_chunks, lambda c: Policy("1024", str(c)))):
            for r in measure(adapter, [n], [make(c) for c in sizes if c <= n], **shape):
                sweep.append(Row(**{**asdict(r), "policy": f"{prefix} {r.policy}"}))
    meta = {"target": adapter.info.name, "reference": None if reference == "none" else reference,
            "framework": framework, "device": adapter.info.device, **shape, "lengths": lengths,
            "policies": [p.name for p in policies], "measures": MEASURES[framework]}
    return write_report(out, meta, rows, sweep, ratio_rows)
