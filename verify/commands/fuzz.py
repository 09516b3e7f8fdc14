"""``attnverify fuzz``: a campaign on one target (or a fleet of them); prints findings as they come, exits 0 / 1 / 3."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from oracles import spec
from verify import fleet, fuzz, strategies
from verify.checks import CHECKS
from verify.commands.common import UsageError, add_target_arguments, csv, default, target_spec
from verify.findings import Finding
from verify.strategies.sizes import LARGE_HEAD_DIMS
from verify.tolerance import POLICIES

EXIT_CLEAN, EXIT_FINDINGS, EXIT_INCOMPLETE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 3, 130, 143
PROGRESS_EVERY = 10.0  # seconds between progress lines
MAX_HEAD_DIM = max(LARGE_HEAD_DIMS)


def add_parser(sub: argparse._SubParsersAction) -> None:
    S = fuzz.Settings
    p = sub.add_parser("fuzz", help="fuzz one target", description=(
        "Exit status: 0 no finding, 1 findings, 2 usage error, 3 incomplete (a dtype ran no example), "
        "130 interrupted by Ctrl-C, 143 by SIGTERM (the --json file is then complete with interrupted: true)."))
    add_target_arguments(p)
    p.add_argument("--dtypes", type=csv, default=list(default(S, "dtypes")))
    p.add_argument("--checks", type=csv, default=list(default(S, "checks")), help=f"of {','.join(CHECKS)}")
    p.add_argument("--max-examples", type=int, help=f"target runs per dtype, shrinking included (default "
                   f"{fuzz.DEFAULT_MAX_EXAMPLES}; with --budget and no --max-examples: until the budget)")
    p.add_argument("--budget", type=float, help="seconds for the whole campaign, split evenly over the dtypes")
    p.add_argument("--seed", type=int, default=default(S, "seed"))
    p.add_argument("--tolerance", choices=POLICIES, default=default(S, "policy"))
    p.add_argument("--families", type=csv, help="value families to draw (default: all)")
    p.add_argument("--masks", type=csv, help="mask kinds to draw (default: all)")
    p.add_argument("--sizes", type=csv, help=f"case sizes to draw, of {','.join(strategies.SIZES)} (default: all, "
                   "80/15/5 percent; one or two: drawn evenly)")
    p.add_argument("--max-len", type=int, default=default(S, "max_len"),
                   help="longest sequence of a large case (decode caches reach twice that); small cases stay <= 65")
    p.add_argument("--max-dim", type=int, default=default(S, "max_dim"), help=f"largest head dim drawn "
                   f"(1..{MAX_HEAD_DIM})")
    p.add_argument("--timeout", type=float, default=default(S, "timeout"),
                   help="seconds a target call may take before it is a timeout finding; after the first "
                        "timeout, later calls get a shorter limit scaled to the case")
    p.add_argument("--json", help="write the campaign's results here (rewritten as it runs)")
    p.add_argument("--repro-dir", default=str(default(S, "repro_dir")), help="where case files of findings go")
    p.add_argument("--database", default=str(default(S, "database")), help="Hypothesis example database")
    p.add_argument("--no-database", action="store_true")
    p.add_argument("--in-process", action="store_true", help="run the target in this process (faster; a "
                   "segfault or abort of the target then ends the campaign)")
    p.add_argument("--workers", type=int, metavar="N", help="run N campaigns at once in N local processes "
                   "(distinct seeds derived from --seed, one shared --database, findings merged by category x dtype "
                   "x output, the smallest reproducer kept); each worker runs the whole campaign, --max-examples and "
                   "--budget each")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run the campaigns on this Dask cluster instead, one per "
                   "Dask worker (--workers: how many); the target's module and --database must be reachable there")
    p.add_argument("--stats", action="store_true", help="print what was generated (shapes, chunks, masks, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def settings_from(args: argparse.Namespace) -> fuzz.Settings:
    """``fuzz.Settings`` from the flags; ``UsageError`` naming a bad value."""
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        raise UsageError(f"unknown check {unknown[0]!r}; known: {', '.join(CHECKS)}")
    extra = {}
    for name, value, known in (("families", args.families, strategies.FAMILIES),
                               ("mask_kinds", args.masks, strategies.MASK_KINDS),
                               ("sizes", args.sizes, strategies.SIZES)):
        if value:
            bad = sorted(set(value) - set(known))
            if bad:
                raise UsageError(f"unknown {name.replace('_', ' ')} {', '.join(bad)}; known: {', '.join(known)}")
            extra[name] = tuple(value)
    if args.max_examples is not None and args.max_examples < 1:
        raise UsageError(f"--max-examples must be >= 1, got {args.max_examples}")
    if args.budget is not None and args.budget <= 0:
        raise UsageError(f"--budget must be positive, got {args.budget}")
    if args.max_len < 1:
        raise UsageError(f"--max-len must be >= 1, got {args.max_len}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if not 1 <= args.max_dim <= MAX_HEAD_DIM:
        raise UsageError(f"--max-dim {args.max_dim}: head dims are drawn up to {MAX_HEAD_DIM} (the largest real "
                         f"kernels take); give 1..{MAX_HEAD_DIM}")
    return fuzz.Settings(
        dtypes=tuple(spec.dtype_name(d) for d in args.dtypes), checks=tuple(args.checks),
        max_examples=args.max_examples, budget=args.budget, seed=args.seed, policy=args.tolerance,
        timeout=args.timeout, database=None if args.no_database else Path(args.database),
        repro_dir=Path(args.repro_dir), max_len=args.max_len, max_dim=args.max_dim, isolate=not args.in_process,
        **extra)


class Progress:
    """A progress line on stderr at most every ``PROGRESS_EVERY`` seconds: where it is, examples/s, findings, time."""

    def __init__(self, enabled: bool, budget: float | None = None) -> None:
        self.enabled, self.budget = enabled, budget
        self.start = self.last = time.monotonic()

    def _due(self) -> bool:
        now = time.monotonic()
        if not self.enabled or now - self.last < PROGRESS_EVERY:
            return False
        self.last = now
        return True

    def __call__(self, camp: fuzz.Campaign, dtype: str) -> None:
        if self._due():
            n = sum(camp.examples.values())
            self._print(camp, f"{dtype}, {camp.examples.get(dtype, 0)} examples ({n} in all, {self._rate(n)})", "")

    def fleet(self, fl: fleet.Fleet) -> None:
        """The same line for a fleet: the dtypes its workers are on, examples of all of them, merged findings."""
        if self._due():
            camp = fl.campaign()
            n = sum(camp.examples.values())
            self._print(camp, f"{len(fl.rows)} workers on {fl.current()}, {n} examples ({self._rate(n)})",
                        f" ({fl.raw} before merging)")

    def _rate(self, n: int) -> str:
        return f"{n / max(time.monotonic() - self.start, 1e-9):.1f}/s"

    def _print(self, camp: fuzz.Campaign, where: str, merged: str) -> None:
        t = time.monotonic() - self.start
        shrinking = f", {len(camp.provisional)} being shrunk" if camp.provisional else ""
        budget = f" of {self.budget:g} s" if self.budget else ""
        print(f"  ... {camp.target}: {where}, {len(camp.findings)} finding(s){merged}{shrinking}, {t:.0f} s{budget}",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run a campaign; print each finding; see the parser's description for the exit status."""
    target = target_spec(args)
    adapter = target.load()
    sett = settings_from(args)
    info = adapter.info
    checks = [c for c in sett.checks if c == "forward" or "grad" in info.features]
    dtypes = [d for d in sett.dtypes if d in info.dtypes]
    skipped = [d for d in sett.dtypes if d not in info.dtypes]
    cap = sett.examples_cap()
    size = f"{cap} target runs per dtype" if cap else "until the budget"
    many = args.workers is not None or args.scheduler is not None
    workers = ""
    if args.scheduler:
        count = f"{args.workers} campaigns" if args.workers else "one campaign per Dask worker"
        workers = f"{count} on dask {args.scheduler}, "
    elif many:
        workers = f"{args.workers} campaigns in local processes, "
    print(f"fuzz {info.name}: {workers}dtypes {','.join(dtypes) or '-'}, checks {','.join(checks)}, {size}"
          + (f", budget {sett.budget:g} s" if sett.budget else "") + f", tolerance {sett.policy}, seed {sett.seed}",
          flush=True)
    if skipped:
        print(f"not run (the target does not declare them): dtypes {','.join(skipped)}")
    if info.unexercised():
        print(f"not exercised (undeclared): {', '.join(info.unexercised())}")
    json_path = Path(args.json) if args.json else None
    progress = Progress(not args.quiet, sett.budget)
    fl = None
    try:
        if many:
            fl = fleet.run(adapter, sett, workers=args.workers, scheduler=args.scheduler, on_finding=merged_finding,
                           on_progress=progress.fleet, json_path=json_path)
            camp = fl.campaign()
        else:
            camp = fuzz.run(adapter, sett, on_finding=lambda f: print(f.message() + "\n", flush=True),
                            json_path=json_path, on_progress=progress)
    except fuzz.Interrupted as exc:
        where = f"; {json_path} is complete (interrupted: true)" if json_path else ""
        print(f"interrupted ({exc}): findings so far are saved in {sett.repro_dir}{where}", file=sys.stderr)
        return EXIT_SIGTERM if exc.signum != 2 else EXIT_SIGINT
    except KeyboardInterrupt:
        print(f"interrupted: findings so far are saved in {sett.repro_dir}", file=sys.stderr)
        return EXIT_SIGINT
    if fl is not None:
        fleet_summary(fl)
    summary(camp, args.stats)
    if camp.findings:
        return EXIT_FINDINGS
    return EXIT_INCOMPLETE if camp.incomplete or (fl is not None and fl.failed) else EXIT_CLEAN


def merged_finding(f: Finding, replaced: Finding | None) -> None:
    """A fleet's finding: the whole message for the first of its key, one line for a smaller reproducer."""
    if replaced is None:
        print(f.message() + "\n", flush=True)
    else:
        print(f"smaller reproducer of {f.category}/{f.output}/{f.dtype} ({f.describe}): "
              f"attnverify repro {f.case_file}\n", flush=True)


def fleet_summary(fl: fleet.Fleet) -> None:
    """One line per worker, the merge, and each worker that failed."""
    for row in fl.rows:
        c = row.campaign
        ran = sum(c.examples.values()) if c else 0
        state = f"FAILED: {row.error}" if row.error else "stopped" if row.stopped else \
            f"{len(c.findings) if c else 0} finding(s)"
        print(f"worker {row.index} (seed {row.seed}): {ran} examples, {state}")
    print(f"{fl.where}: {fl.raw} finding(s) from the workers, {fl.raw - len(fl.best)} duplicate(s) merged")
    if fl.failed:
        print(f"INCOMPLETE: {len(fl.failed)} of {len(fl.rows)} workers failed (see above)")


def summary(camp: fuzz.Campaign, stats: bool = False) -> None:
    """The closing lines: examples and time, coverage, declines, worst errors, findings."""
    s = camp.seconds
    ex = ", ".join(f"{d}: {n}" for d, n in camp.examples.items())
    print(f"examples run: {ex}; {s['total']:.1f} s (reference {s['reference']:.1f} s, target {s['target']:.1f} s)")
    print("each dtype ended by: " + ", ".join(f"{d} {why}" for d, why in camp.coverage.items()))
    if camp.incomplete:
        print(f"INCOMPLETE: no example ran for {', '.join(camp.incomplete)} (raise --budget)")
    for dtype, reasons in camp.declined.items():
        for reason, n in reasons.items():
            print(f"declined by the target, {dtype}: {n} case(s): {reason}")
    if camp.unconstrained_rows:
        print(f"rows the precision contract leaves unconstrained (any answer allowed): {camp.unconstrained_rows}")
    for dtype, worst in camp.worst_ratio.items():
        parts = [f"{k} {v:.3g}" if v is not None else f"{k} - (no finite result)" for k, v in worst.items()]
        print(f"worst error in allowances, {dtype}: {', '.join(parts) or '-'}")
    if stats:
        for line in camp.stats.lines():
            print(f"stats: {line}")
    print(f"{len(camp.findings)} finding(s)" + ("" if not camp.findings else ": " + ", ".join(
        f"{f.category}/{f.output}/{f.dtype}" for f in camp.findings)))
