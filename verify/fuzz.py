"""Campaigns: Hypothesis searches for cases on which a target breaks a check, one dtype at a time.

How distinct bugs are found rather than only the first one: a search fails on any finding whose
category has not been found yet for that dtype; Hypothesis shrinks it to a minimal case, the
finding is saved, its category joins the found set, and the search starts again until nothing
new turns up or the budget is spent. So every category × dtype gets its own minimal reproducer.

Persistence: Hypothesis's example database lives in a directory (``--database``), keyed by
target, dtype and the categories found before, so the next campaign replays earlier failures
first. A finding is written (case file + JSON) the moment it is first seen and rewritten when
shrinking improves it; Ctrl-C ends the campaign with everything found so far written out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from verify import strategies
from verify.case import Case
from verify.checks import CHECKS, DEFAULT_TIMEOUT, run_case
from verify.findings import Finding
from verify.targets.base import Adapter

DEFAULT_DATABASE = Path(".attnverify/hypothesis")


class _BudgetSpent(KeyboardInterrupt):
    """Stops a Hypothesis run at once without saving or shrinking (it is a KeyboardInterrupt)."""


class _NewFinding(Exception):
    """Raised inside the property when a case shows a category not found before."""


@dataclass
class Settings:
    """What a campaign runs: dtypes, checks, size, seed and where it keeps things."""

    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
    checks: tuple[str, ...] = CHECKS
    max_examples: int = 200  # per dtype
    budget: float | None = None  # seconds for the whole campaign
    seed: int | None = 0  # None: random; an int: reproducible
    policy: str = "bound"
    timeout: float = DEFAULT_TIMEOUT
    database: Path | None = DEFAULT_DATABASE
    repro_dir: Path = Path("findings")
    max_len: int = 65
    max_findings: int | None = None  # stop the campaign once this many are found (mutant kills)
    families: tuple[str, ...] = strategies.FAMILIES
    compact: bool | None = None  # shape buckets (strategies.COMPACT_SHAPES); None: for JAX targets only
    mask_kinds: tuple[str, ...] = strategies.MASK_KINDS


@dataclass
class Campaign:
    """A campaign's results: examples per dtype, findings, worst ratios and where time went."""

    target: str
    settings: dict
    unexercised: list[str]
    examples: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    worst_ratio: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"oracle": 0.0, "target": 0.0, "total": 0.0})
    interrupted: bool = False
    provisional: list[Finding] = field(default_factory=list)  # seen, not yet shrunk
    declined: dict[str, dict[str, int]] = field(default_factory=dict)  # dtype -> reason -> cases

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "settings": self.settings,
            "unexercised_features": self.unexercised,
            "examples": self.examples,
            "seconds": self.seconds,
            "worst_ratio": self.worst_ratio,
            "interrupted": self.interrupted,
            "declined": self.declined,
            "findings": [f.to_json() for f in self.findings],
            "unshrunk_findings": [f.to_json() for f in self.provisional],
        }


def _slug(f: Finding) -> str:
    return f"{f.target.replace(':', '_').replace('/', '_')}-{f.category}-{f.output}-{f.dtype}"


def _save(adapter: Adapter, case: Case, findings: list[Finding], repro_dir: Path, sett: Settings) -> None:
    """Write the case file of each finding (all of one case share a file) and set ``case_file``."""
    meta = dict(case.meta, target=adapter.info.name, framework=adapter.info.framework,
                features=sorted(adapter.info.features), masked_rows=adapter.info.masked_rows,
                dtypes=list(adapter.info.dtypes), contract=asdict(adapter.info.contract),
                checks=list(sett.checks), policy=sett.policy)
    path = case.with_(meta=meta).save(repro_dir / _slug(findings[0]))
    for f in findings:
        f.case_file = str(path)


def run(adapter: Adapter, sett: Settings, on_finding: Callable[[Finding], None] | None = None,
        json_path: Path | None = None) -> Campaign:
    """Fuzz ``adapter`` under ``sett``; findings are saved as they come and the campaign returned."""
    info = adapter.info
    camp = Campaign(info.name, {k: str(v) if isinstance(v, Path) else v for k, v in asdict(sett).items()},
                    info.unexercised())
    db = DirectoryBasedExampleDatabase(str(sett.database)) if sett.database else None
    start = time.monotonic()

    def flush() -> None:
        camp.seconds["total"] = time.monotonic() - start
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(camp.to_json(), indent=2) + "\n")

    try:
        for dtype in sett.dtypes:
            if dtype not in info.dtypes:
                continue
            camp.examples[dtype] = 0
            camp.worst_ratio[dtype] = {}
            _fuzz_dtype(adapter, sett, dtype, camp, db, start, on_finding, flush)
            if sett.max_findings is not None and len(camp.findings) >= sett.max_findings:
                break
    except KeyboardInterrupt as exc:
        camp.interrupted = not isinstance(exc, _BudgetSpent)
        if camp.interrupted:
            flush()
            raise
    finally:
        flush()
    return camp


def _fuzz_dtype(adapter: Adapter, sett: Settings, dtype: str, camp: Campaign, db, start: float,
                on_finding: Callable[[Finding], None] | None, flush: Callable[[], None]) -> None:
    info = adapter.info
    found: set[str] = set()
    grad = "grad" in sett.checks and "grad" in info.features
    strategy = strategies.cases(dtypes=(dtype,), features=info.features, grad=grad, max_len=sett.max_len,
                                families=sett.families, mask_kinds=sett.mask_kinds,
                                compact=info.framework == "jax" if sett.compact is None else sett.compact)
    current: dict = {}

    while True:
        remaining = sett.max_examples - camp.examples[dtype]
        if remaining <= 0:
            return
        current.clear()

        def prop(case: Case) -> None:
            if sett.budget is not None and time.monotonic() - start > sett.budget:
                raise _BudgetSpent()
            camp.examples[dtype] += 1
            out = run_case(adapter, case, checks=sett.checks, policy=sett.policy, timeout=sett.timeout)
            if out.declined:
                reasons = camp.declined.setdefault(dtype, {})
                reasons[out.declined] = reasons.get(out.declined, 0) + 1
            camp.seconds["oracle"] += out.seconds["oracle"]
            camp.seconds["target"] += out.seconds["target"]
            worst = camp.worst_ratio[dtype]
            for name, r in out.ratios.items():
                worst[name] = max(worst.get(name, 0.0), r)
            new = [f for f in out.findings if f.category not in found]
            if new:
                if "case" not in current:  # keep the first sighting even if shrinking is interrupted
                    _save(adapter, case, new, sett.repro_dir, sett)
                    camp.provisional = new
                    flush()
                current["case"], current["findings"] = case, new
                raise _NewFinding(", ".join(sorted({f.category for f in new})))

        if sett.seed is not None:
            # What @seed does, minus its switching the database off: seeded runs still replay.
            prop._hypothesis_internal_use_seed = sett.seed + len(found)
        test = settings(
            max_examples=remaining, database=db, deadline=None, derandomize=False,
            suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False,
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        )(given(strategy)(prop))
        key = f"{info.name}|{dtype}|{','.join(sorted(found))}|{sett.policy}|{','.join(sett.checks)}"
        test.hypothesis.inner_test._hypothesis_internal_add_digest = key.encode()
        try:
            test()
            return
        except _NewFinding:
            pass
        first_file = camp.provisional[0].case_file if camp.provisional else None
        camp.provisional = []
        _save(adapter, current["case"], current["findings"], sett.repro_dir, sett)
        if first_file and first_file != current["findings"][0].case_file:  # the unshrunk sighting's file
            for suffix in (".npz", ".json"):
                Path(first_file).with_suffix(suffix).unlink(missing_ok=True)
        for f in current["findings"]:
            camp.findings.append(f)
            found.add(f.category)
            if on_finding:
                on_finding(f)
        flush()
        if sett.max_findings is not None and len(camp.findings) >= sett.max_findings:
            return
