"""Campaigns: Hypothesis searches for cases on which a target breaks a check, one dtype at a time.

How distinct bugs are found rather than only the first one: a search fails on any finding whose
category has not been found yet for that dtype; Hypothesis shrinks it to a minimal case, the
finding is saved, its category joins the found set, and the search starts again (with a new
seed) until nothing new turns up or the dtype's share of the run is spent. So every category x
dtype gets its own minimal reproducer, each in its own case file.

What bounds a campaign, per dtype: ``max_examples`` target runs, shrinking included (a run is one
case through every check); ``budget`` seconds split evenly over the dtypes up front (a dtype that
finishes early leaves its time to the next); a budget without ``max_examples`` runs until the
budget. ``Campaign.coverage`` records, per dtype, what stopped it; a dtype that ran no example at
all makes the campaign *incomplete* (the command line exits 3).

Reproducible: a seed draws the same cases whichever entry point starts the campaign (command
line, pytest plugin, ``run``) and whatever was imported before (``compat.fixed_generation_constants``);
each dtype and each restart gets its own seed (``seed_for``). Persistence: Hypothesis's example
database (``--database``) is keyed by target, dtype, checks and the categories found before, so
the next campaign replays earlier failures first. Interrupted (Ctrl-C or SIGTERM), a campaign
writes its JSON whole with ``interrupted: true`` and every finding so far, shrunk or not.

Hangs: after a target's first timeout in a dtype, that dtype's later calls get a shorter limit,
twenty times its slowest completed call (at least 2 s, at most ``timeout``), so shrinking a hang and
the rest of the campaign do not wait the full limit on every example. A slow but correct call cut
short then cannot add a finding: the dtype's timeout is already found, and each dtype starts again
with the full limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky

from verify import compat, strategies
from verify.case import Case, case_files
from verify.checks import CHECKS, DEFAULT_TIMEOUT, Outcome, passes_for, run_case
from verify.execution import InProcess
from verify.findings import Finding, json_number, number_from_json
from verify.isolation import Worker
from verify.stats import Stats
from verify.targets.base import DEFAULT_DTYPES, Adapter, TargetInfo
from verify.targets.layouts import LAYOUTS
from verify.targets.loader import TargetSpec

DEFAULT_DATABASE = Path(".attnverify/hypothesis")
DEFAULT_MAX_EXAMPLES = 200  # per dtype, when neither max_examples nor a budget is given
SHORT_TIMEOUT_MIN = 2.0
SHORT_TIMEOUT_FACTOR = 20.0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the campaign stops, writes everything, and re-raises."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Stop(KeyboardInterrupt):
    """Ends a dtype's search at once (its budget or example cap is spent); not an interruption."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _NewFinding(Exception):
    """Raised inside the property when a case shows a category not found before."""


@dataclass
class Settings:
    """What a campaign runs: dtypes, checks, size, seed and where it keeps things (the one source of defaults)."""

    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    checks: tuple[str, ...] = CHECKS
    max_examples: int | None = None  # per dtype, shrinking included; None: DEFAULT_MAX_EXAMPLES, or the budget
    budget: float | None = None  # seconds for the whole campaign, split over the dtypes
    seed: int | None = 0  # None: random; an int: reproducible
    policy: str = "bound"
    timeout: float = DEFAULT_TIMEOUT  # seconds per target call
    database: Path | None = DEFAULT_DATABASE
    repro_dir: Path = Path("findings")
    max_len: int = 2048  # longest sequence of a large case (decode caches reach twice that)
    max_dim: int = 256  # largest head dim drawn
    max_findings: int | None = None  # stop the campaign once this many are found (mutant kills)
    families: tuple[str, ...] = strategies.FAMILIES
    compact: bool | None = None  # shape buckets (strategies.COMPACT_SHAPES); None: for JAX targets only
    mask_kinds: tuple[str, ...] = strategies.MASK_KINDS
    sizes: tuple[str, ...] = strategies.SIZES  # the size mix; one or two of them for benchmarks
    isolate: bool = True  # run a loadable target in a worker process (verify.isolation); False: --in-process

    def __post_init__(self) -> None:
        self.repro_dir = Path(self.repro_dir)
        self.database = None if self.database is None else Path(self.database)
        self.dtypes, self.checks = tuple(self.dtypes), tuple(self.checks)

    def examples_cap(self) -> int | None:
        """Target runs per dtype (None: until the budget)."""
        if self.max_examples is not None:
            return self.max_examples
        return None if self.budget is not None else DEFAULT_MAX_EXAMPLES


@dataclass
class Campaign:
    """A campaign's results: examples per dtype, findings, worst ratios, coverage and where time went."""

    target: str
    settings: dict
    checks: list[str]
    unexercised: list[str]
    examples: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    worst_ratio: dict[str, dict[str, float | None]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"reference": 0.0, "target": 0.0, "total": 0.0})
    coverage: dict[str, str] = field(default_factory=dict)  # dtype -> what ended its search
    interrupted: bool = False
    provisional: list[Finding] = field(default_factory=list)  # seen, not yet shrunk
    declined: dict[str, dict[str, int]] = field(default_factory=dict)  # dtype -> reason -> cases
    unconstrained_rows: int = 0
    references: dict[str, int] = field(default_factory=dict)  # which reference decided, cases
    stats: Stats = field(default_factory=Stats)
    case_sequence: str = ""  # a digest chained over every case run, in order: equal runs drew equal cases
    timeouts: list[float] = field(default_factory=list)  # the limit each timed-out call ran under, in order
    workers: dict[str, int] = field(default_factory=dict)  # worker processes started / recycled (isolated runs)

    @property
    def incomplete(self) -> list[str]:
        """Dtypes that were to run but ran no example."""
        return [d for d, n in self.examples.items() if n == 0]

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "settings": self.settings,
            "checks": self.checks,
            "unexercised_features": self.unexercised,
            "examples": self.examples,
            "coverage": self.coverage,
            "incomplete": self.incomplete,
            "seconds": self.seconds,
            "worst_ratio": {dtype: {name: json_number(r) for name, r in ratios.items()}
                            for dtype, ratios in self.worst_ratio.items()},
            "interrupted": self.interrupted,
            "declined": self.declined,
            "unconstrained_rows": self.unconstrained_rows,
            "references": self.references,
            "stats": self.stats.to_json(),
            "case_sequence": self.case_sequence,
            "timeouts": self.timeouts,
            "workers": self.workers,
            "findings": [f.to_json() for f in self.findings],
            "unshrunk_findings": [f.to_json() for f in self.provisional],
        }

    @classmethod
    def from_json(cls, d: dict) -> Campaign:
        """The campaign ``to_json`` wrote (a fleet's workers send theirs as JSON: ``verify.fleet``)."""
        return cls(
            d["target"], dict(d["settings"]), list(d["checks"]), list(d["unexercised_features"]),
            examples=dict(d["examples"]), findings=[Finding.from_json(f) for f in d["findings"]],
            worst_ratio={k: {name: number_from_json(r) for name, r in v.items()}
                         for k, v in d["worst_ratio"].items()}, seconds=dict(d["seconds"]),
            coverage=dict(d["coverage"]), interrupted=d["interrupted"],
            provisional=[Finding.from_json(f) for f in d["unshrunk_findings"]],
            declined={k: dict(v) for k, v in d["declined"].items()}, unconstrained_rows=d["unconstrained_rows"],
            references=dict(d["references"]), stats=Stats.from_json(d["stats"]), case_sequence=d["case_sequence"],
            timeouts=list(d["timeouts"]), workers=dict(d["workers"]))


def layouts_for(info: TargetInfo) -> tuple[str, ...]:
    """The memory layouts drawn for a target: all of them for torch and numpy, contiguous for JAX (no strides)."""
    return LAYOUTS if info.framework in ("torch", "numpy") else ("contiguous",)


def campaign_options(info: TargetInfo, sett: Settings, dtype: str, *, grad: bool) -> dict:
    """The arguments of ``strategies.cases`` for a campaign with ``sett`` on a target declaring ``info``.

    One construction for campaigns and for coverage comparisons (``verify.coverage`` samples the
    same menus): shape buckets for JAX targets unless ``sett.compact`` says otherwise.
    """
    return {"dtypes": (dtype,), "features": info.features, "grad": grad, "max_len": sett.max_len,
            "max_dim": sett.max_dim, "families": sett.families, "mask_kinds": sett.mask_kinds, "sizes": sett.sizes,
            "compact": info.framework == "jax" if sett.compact is None else sett.compact,
            "constraints": info.constraints, "layouts": layouts_for(info), "tiles": info.tiles}


def seed_for(seed: int, dtype: str, restart: int) -> int:
    """The Hypothesis seed of one dtype's ``restart``-th search: different per dtype, same on every entry point."""
    return int(hashlib.sha256(f"{seed}/{dtype}/{restart}".encode()).hexdigest()[:8], 16)


def slug(f: Finding, case: Case) -> str:
    """A case file stem unique per finding and safe for any target name (dots, colons, slashes, length)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", f.target).strip("_") or "target"
    if len(name) > 48:
        name = name[:40] + "-" + hashlib.sha256(f.target.encode()).hexdigest()[:7]
    return f"{name}-{f.category}-{f.output}-{f.dtype}-{case.digest()[:8]}"


def save_findings(executor: InProcess | Worker, case: Case, findings: list[Finding], sett: Settings) -> None:
    """Write one case file per finding (its own stem) into ``sett.repro_dir`` and set ``case_file``.

    The file pins the target's resolved declarations (features, policy, contract), so a replay judges
    the case exactly as the campaign did.
    """
    target = TargetSpec.for_info(executor.info)
    for f in findings:
        meta = dict(case.meta, target=target.to_meta(), checks=list(sett.checks), policy=sett.policy,
                    finding={"category": f.category, "output": f.output, "check": f.check})
        f.case_file = str(case.with_(meta=meta).save(sett.repro_dir / slug(f, case)))


def _remove(case_file: str | None) -> None:
    if case_file:
        for path in case_files(case_file):
            path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    """Atomically: an interrupted write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class _Limits:
    """The time limit of each call of one dtype: the full timeout until its first timeout, then a short one."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.slowest = 0.0  # the slowest completed call's seconds (the target's own time)
        self.short = False

    def limit(self) -> float:
        if not self.short:
            return self.timeout
        return min(self.timeout, max(SHORT_TIMEOUT_MIN, SHORT_TIMEOUT_FACTOR * self.slowest))

    def record(self, out: Outcome, limit: float, log: list[float]) -> None:
        if out.timed_out:
            self.short = True
            log.append(limit)
        else:
            self.slowest = max(self.slowest, out.seconds.get("target", 0.0))


def _sigterm(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def executor_for(adapter: Adapter, isolate: bool) -> InProcess | Worker:
    """A worker process for a loadable target when ``isolate``, else this process."""
    return Worker(adapter.target, adapter.info) if isolate and adapter.target is not None else InProcess(adapter)


def run(target: Adapter | InProcess | Worker, sett: Settings, on_finding: Callable[[Finding], None] | None = None,
        json_path: Path | None = None, on_progress: Callable[[Campaign, str], None] | None = None) -> Campaign:
    """Fuzz ``target`` under ``sett``; findings are saved as they come and the campaign returned.

    ``target`` is an adapter (run in a worker process when ``sett.isolate`` and the adapter can be
    loaded again, else in this one) or an executor of ``verify.execution`` / ``verify.isolation``.
    ``on_progress(campaign, dtype)`` is called after every example.
    """
    own = isinstance(target, Adapter)
    executor = executor_for(target, sett.isolate) if own else target
    try:
        return _run(executor, sett, on_finding, json_path, on_progress)
    finally:
        if own:
            executor.close()


def _run(executor: InProcess | Worker, sett: Settings, on_finding: Callable[[Finding], None] | None,
         json_path: Path | None, on_progress: Callable[[Campaign, str], None] | None) -> Campaign:
    info = executor.info
    check_limits(info, sett)
    checks = [c for c in sett.checks if c != "grad" or "grad" in info.features]
    camp = Campaign(info.name, {k: str(v) if isinstance(v, Path) else v for k, v in asdict(sett).items()},
                    checks, info.unexercised())
    db = DirectoryBasedExampleDatabase(str(sett.database)) if sett.database else None
    start = time.monotonic()
    dtypes = [d for d in sett.dtypes if d in info.dtypes]

    def flush() -> None:
        camp.seconds["total"] = time.monotonic() - start
        if isinstance(executor, Worker):
            camp.workers = {"started": executor.starts, "recycled": executor.recycled}
        if json_path:
            _write_json(json_path, camp.to_json())

    previous = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        with compat.fixed_generation_constants():
            for i, dtype in enumerate(dtypes):
                camp.examples[dtype] = 0
                camp.worst_ratio[dtype] = {}
                deadline = None
                if sett.budget is not None:  # this dtype's share of what is left
                    deadline = time.monotonic() + (sett.budget - (time.monotonic() - start)) / (len(dtypes) - i)
                camp.coverage[dtype] = _Search(executor, sett, dtype, camp, db, deadline, on_finding, on_progress,
                                               flush).run()
                flush()
                if sett.max_findings is not None and len(camp.findings) >= sett.max_findings:
                    break
    except KeyboardInterrupt:
        camp.interrupted = True
        camp.coverage.update({d: "interrupted" for d in dtypes if d not in camp.coverage})
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for path in case_files(in_flight(sett, info)):
            path.unlink(missing_ok=True)
        flush()
    return camp


def check_limits(info: TargetInfo, sett: Settings) -> None:
    """``ValueError`` when the limits leave a declared tile uncrossed (no case could span two of them)."""
    if info.tiles and sett.max_len <= max(info.tiles):
        raise ValueError(f"max_len (--max-len) {sett.max_len} does not exceed the tile of {max(info.tiles)} that "
                         f"{info.name} declares: no case would cross a tile boundary; give at least "
                         f"{2 * max(info.tiles) + 1}")


def in_flight(sett: Settings, info: TargetInfo) -> Path:
    """Where the case being run is written before each call: left behind if the machine dies with it."""
    return sett.repro_dir / f".in-flight-{re.sub(r'[^A-Za-z0-9_-]+', '_', info.name)[:60]}"


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Search:
    """One dtype's searches: restart after each new category until nothing new, the cap or the deadline."""

    def __init__(self, executor, sett: Settings, dtype: str, camp: Campaign, db, deadline: float | None,
                 on_finding, on_progress, flush) -> None:
        self.executor, self.sett, self.dtype, self.camp, self.db = executor, sett, dtype, camp, db
        self.deadline, self.on_finding, self.on_progress, self.flush = deadline, on_finding, on_progress, flush
        self.found: set[str] = set()
        self.limits = _Limits(sett.timeout)
        self.in_flight = in_flight(sett, executor.info)
        self.strategy = strategies.cases(**campaign_options(executor.info, sett, dtype, grad="grad" in camp.checks))

    def run(self) -> str:
        """Search until done; returns what ended it (max_examples, budget, exhausted, max_findings)."""
        cap = self.sett.examples_cap()
        while True:
            remaining = None if cap is None else cap - self.camp.examples[self.dtype]
            if remaining is not None and remaining <= 0:
                return "max_examples"
            current: dict = {}
            try:
                self._test(current, 10**9 if remaining is None else remaining)()
                done = cap is not None and self.camp.examples[self.dtype] >= cap
                return "max_examples" if done else "exhausted"  # exhausted: Hypothesis had nothing left to try
            except _NewFinding:
                self._record(current)
            except Flaky:  # the finding did not show again on Hypothesis's replay: keep it, and say so
                if "findings" not in current:
                    raise
                for f in current["findings"]:
                    f.detail = (f.detail + "; " if f.detail else "") + "flaky: the replay of this case did not fail"
                self._record(current)
            except _Stop as stop:
                if "findings" in current:  # a search stopped while shrinking keeps its best case so far
                    self._record(current)
                return stop.why
            except KeyboardInterrupt:
                self.camp.provisional = current.get("findings", [])
                raise
            if self.sett.max_findings is not None and len(self.camp.findings) >= self.sett.max_findings:
                return "max_findings"

    def _test(self, current: dict, max_examples: int) -> Callable[[], None]:
        camp, dtype, cap = self.camp, self.dtype, self.sett.examples_cap()

        def prop(case: Case) -> None:
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise _Stop("budget")
            if cap is not None and camp.examples[dtype] >= cap:
                raise _Stop("max_examples")
            camp.examples[dtype] += 1
            case.save(self.in_flight)
            limit = self.limits.limit()
            out = run_case(self.executor, case, checks=tuple(camp.checks), policy=self.sett.policy, timeout=limit)
            self.limits.record(out, limit, camp.timeouts)
            self._account(case, out)
            new = [f for f in out.findings if f.category not in self.found]
            if self.on_progress:
                self.on_progress(camp, dtype)
            if new:
                first = "case" not in current
                old = current.get("findings", [])
                save_findings(self.executor, case, new, self.sett)
                kept = {f.case_file for f in new}
                for f in old:  # the shrunk case replaces the earlier sighting's file
                    if f.case_file not in kept:
                        _remove(f.case_file)
                current["case"], current["findings"] = case, new
                camp.provisional = new
                if first:
                    self.flush()
                raise _NewFinding(", ".join(sorted({f.category for f in new})))

        if self.sett.seed is not None:
            compat.seed_test(prop, seed_for(self.sett.seed, dtype, len(self.found)))
        test = settings(
            max_examples=max_examples, database=self.db, deadline=None, derandomize=False,
            suppress_health_check=list(HealthCheck), report_multiple_bugs=False, print_blob=False,
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        )(given(self.strategy)(prop))
        key = f"{camp.target}|{dtype}|{','.join(sorted(self.found))}|{self.sett.policy}|{','.join(camp.checks)}"
        compat.set_database_key(test, key.encode())
        return test

    def _account(self, case: Case, out: Outcome) -> None:
        camp, dtype = self.camp, self.dtype
        if out.declined:
            reasons = camp.declined.setdefault(dtype, {})
            reasons[out.declined] = reasons.get(out.declined, 0) + 1
        for k in ("reference", "target"):
            camp.seconds[k] += out.seconds.get(k, 0.0)
        camp.unconstrained_rows += out.unconstrained_rows
        if out.reference:
            camp.references[out.reference] = camp.references.get(out.reference, 0) + 1
        camp.stats.add(case, passes_for(self.executor.info, case, tuple(camp.checks)))
        camp.case_sequence = hashlib.sha256((camp.case_sequence + case.digest()).encode()).hexdigest()[:16]
        worst = camp.worst_ratio[dtype]
        for name, r in out.ratios.items():
            if r is not None:
                worst[name] = max(worst.get(name) or 0.0, r)
            else:
                worst.setdefault(name, None)

    def _record(self, current: dict) -> None:
        self.camp.provisional = []
        for f in current["findings"]:
            self.camp.findings.append(f)
            self.found.add(f.category)
            if self.on_finding:
                self.on_finding(f)
        self.flush()
