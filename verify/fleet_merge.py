"""A fleet's state and merged result: one smallest reproducer per finding key, the workers' campaigns summed.

``verify.fleet`` runs the workers and hands each message they send (progress, finding, done, error) to
``Fleet.receive``; this module is what the fleet keeps of them.

- **Findings**: the merge keeps one per ``Finding.key`` (category x dtype x output), the smallest
  reproducer (fewest q/k/v elements, then shortest sequences, then the shorter description), and writes
  only those, with the case files the worker sent, into ``sett.repro_dir``; a replaced reproducer's
  files are removed. Duplicates are counted, not kept. A worker's unshrunk findings (sent with its final
  campaign) are kept the same way as provisional ones, for keys no shrunk finding has.
- **Result**: ``Fleet.to_json`` is a campaign JSON (``fuzz.Campaign.to_json``: examples, seconds,
  declines, references and statistics summed over the workers, worst ratios maxed, the merged
  findings) plus ``fleet``: where it ran, raw and merged finding counts, and one row per worker
  (seed, examples, coverage, findings, error).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from verify import fuzz
from verify.findings import CATEGORIES, Finding
from verify.stats import Stats
from verify.targets import TargetInfo


def reproducer_size(f: Finding) -> tuple[int, int, int]:
    """What "smaller" means between two reproducers of one key: q/k/v elements, Lq + Lk, description length."""
    d = f.dims
    elements = d["B"] * (d["Lq"] * d["Hq"] * d["Dk"] + d["Lk"] * d["Hkv"] * (d["Dk"] + d["Dv"]))
    return elements, d["Lq"] + d["Lk"], len(f.describe)


@dataclass
class Row:
    """One worker: its seed, its latest campaign (a progress report or its final one), and how it ended."""

    index: int
    seed: int | None
    campaign: fuzz.Campaign | None = None
    dtype: str = "starting"  # the dtype it is on
    done: bool = False
    error: str | None = None
    stopped: bool = False  # ended by the fleet's interruption without sending its final campaign

    def to_json(self, kept: dict[tuple[str, str, str], int]) -> dict:
        c = self.campaign
        keys = [f.key for f in c.findings] if c else []
        return {"worker": self.index, "seed": self.seed, "examples": c.examples if c else {},
                "coverage": c.coverage if c else {}, "seconds": c.seconds if c else {},
                "interrupted": self.stopped or bool(c and c.interrupted), "error": self.error,
                "findings": ["/".join(k) for k in keys],
                "kept": ["/".join(k) for k in keys if kept.get(k) == self.index],
                "case_sequence": c.case_sequence if c else ""}


@dataclass
class Fleet:
    """A fleet's state while it runs and its result after: the workers' rows and the merged findings."""

    info: TargetInfo
    settings: fuzz.Settings
    where: str
    rows: list[Row]
    best: dict[tuple[str, str, str], Finding] = field(default_factory=dict)  # key -> kept reproducer
    origin: dict[tuple[str, str, str], int] = field(default_factory=dict)  # key -> the worker it came from
    unshrunk: dict[tuple[str, str, str], Finding] = field(default_factory=dict)
    raw: int = 0  # findings the workers sent, duplicates included
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.error is not None]

    @property
    def finished(self) -> bool:
        return all(r.done for r in self.rows)

    def current(self) -> str:
        """The dtypes the running workers are on, with how many workers each: ``fp32 (2)``."""
        counts = Counter(r.dtype for r in self.rows if not r.done)
        return ", ".join(f"{d} ({n})" for d, n in counts.items()) or "done"

    def receive(self, msg: dict, on_finding: Callable[[Finding, Finding | None], None] | None) -> bool:
        """Take one worker message; True when it changed what the JSON says (a finding, an end)."""
        row = self.rows[msg["worker"]]
        kind = msg["kind"]
        if kind == "progress":
            row.campaign, row.dtype = fuzz.Campaign.from_json(msg["campaign"]), msg["dtype"]
            return False
        if kind == "finding":
            self.raw += 1
            f = Finding.from_json(msg["finding"])
            old = self.best.get(f.key)
            if self._offer(self.best, f, msg["files"]):
                self.origin[f.key] = row.index
                unshrunk = self.unshrunk.pop(f.key, None)
                if unshrunk is not None and unshrunk.case_file != f.case_file:
                    _remove(unshrunk.case_file)
                if on_finding:
                    on_finding(f, old)
            return True
        row.done = True
        if kind == "error":
            row.error = msg["error"]
        elif msg["campaign"] is not None:
            row.campaign = fuzz.Campaign.from_json(msg["campaign"])
            for f in row.campaign.provisional:
                if f.key not in self.best:
                    self._offer(self.unshrunk, f, msg["files"])
        return True

    def _offer(self, kept: dict, f: Finding, files: dict[str, bytes]) -> bool:
        """Keep ``f`` in ``kept`` if it is the first or a smaller reproducer of its key; write its files."""
        old = kept.get(f.key)
        if old is not None and reproducer_size(old) <= reproducer_size(f):
            return False
        stem = Path(f.case_file).name.removesuffix(".npz")
        repro_dir = self.settings.repro_dir
        repro_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if name.startswith(stem + "."):
                write_atomic(repro_dir / name, bytes(data))
        f.case_file = str(repro_dir / f"{stem}.npz")
        if old is not None and old.case_file != f.case_file:
            _remove(old.case_file)
        kept[f.key] = f
        return True

    def campaign(self) -> fuzz.Campaign:
        """The merged campaign: the workers' accounts summed, the merged findings (in dtype, category order)."""
        s = self.settings
        info = self.info
        parts = [r.campaign for r in self.rows if r.campaign is not None]
        camp = fuzz.Campaign(info.name, {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
                             [c for c in s.checks if c != "grad" or "grad" in info.features], info.unexercised())
        for dtype in (d for d in s.dtypes if d in info.dtypes):
            ran = [c for c in parts if dtype in c.examples]
            if ran:
                camp.examples[dtype] = sum(c.examples[dtype] for c in ran)
                camp.worst_ratio[dtype] = _worst([c.worst_ratio.get(dtype, {}) for c in ran])
            ends = Counter(c.coverage[dtype] for c in parts if dtype in c.coverage)
            if ends:
                camp.coverage[dtype] = next(iter(ends)) if len(ends) == 1 else ", ".join(
                    f"{why} ({n})" for why, n in ends.most_common())
        order = {d: i for i, d in enumerate(s.dtypes)}
        rank = {c: i for i, c in enumerate(CATEGORIES)}

        def ordered(fs: dict) -> list[Finding]:
            return sorted(fs.values(), key=lambda f: (order.get(f.dtype, len(order)), rank[f.category], f.output))

        camp.findings, camp.provisional = ordered(self.best), ordered(self.unshrunk)
        camp.interrupted = self.interrupted or any(c.interrupted for c in parts)
        for c in parts:
            for k, v in c.seconds.items():
                camp.seconds[k] = camp.seconds.get(k, 0.0) + v
            for dtype, reasons in c.declined.items():
                mine = camp.declined.setdefault(dtype, {})
                for reason, n in reasons.items():
                    mine[reason] = mine.get(reason, 0) + n
            for ref, n in c.references.items():
                camp.references[ref] = camp.references.get(ref, 0) + n
            for k, n in c.workers.items():
                camp.workers[k] = camp.workers.get(k, 0) + n
            camp.unconstrained_rows += c.unconstrained_rows
            camp.timeouts += c.timeouts
        camp.seconds["total"] = self.seconds or time.monotonic() - self.started
        camp.stats = _merged_stats([c.stats for c in parts])
        camp.case_sequence = hashlib.sha256("".join(c.case_sequence for c in parts).encode()).hexdigest()[:16]
        return camp

    def to_json(self) -> dict:
        data = self.campaign().to_json()
        data["fleet"] = {"workers": len(self.rows), "where": self.where,
                         "database": None if self.settings.database is None else str(self.settings.database),
                         "raw_findings": self.raw, "duplicates": self.raw - len(self.best),
                         "failed": [r.index for r in self.failed],
                         "rows": [r.to_json(self.origin) for r in self.rows]}
        return data


def _worst(parts: list[dict[str, float | None]]) -> dict[str, float | None]:
    """The largest ratio per output over the workers (None where no worker had a finite result)."""
    worst: dict[str, float | None] = {}
    for part in parts:
        for name, r in part.items():
            if r is not None:
                worst[name] = max(worst.get(name) or 0.0, r)
            else:
                worst.setdefault(name, None)
    return worst


def _merged_stats(parts: list[Stats]) -> Stats:
    merged = Stats()
    for s in parts:
        merged.examples += s.examples
        merged.max_len, merged.max_dim = max(merged.max_len, s.max_len), max(merged.max_dim, s.max_dim)
        for what, counter in s.counts.items():
            merged.counts.setdefault(what, Counter()).update(counter)
    return merged


def _case_files(case_file: str) -> list[Path]:
    stem = Path(case_file).name.removesuffix(".npz")
    return [Path(case_file).with_name(stem + ext) for ext in (".npz", ".json")]


def finding_files(findings: list[Finding]) -> dict[str, bytes]:
    """The case files of ``findings``, by name, to send to the fleet."""
    return {p.name: p.read_bytes() for f in findings if f.case_file for p in _case_files(f.case_file) if p.exists()}


def _remove(case_file: str) -> None:
    for path in _case_files(case_file):
        path.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Atomically: an interrupted write never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
