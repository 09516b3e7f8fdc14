"""Fleet throughput: examples per second with 2 local workers against 1, side by side in one run.

Run: ``.venv/bin/python benchmarks/bench_fleet.py [--target chunked-torch] [--budget 20] [--repeats 3]
[--max-len 2048]``.

Each repeat runs the default campaign (bf16/fp16/fp32, forward and grad, no database) as a fleet of
1 and of 2 local workers (``verify.fleet``), each worker for ``--budget`` seconds, the order of the
two alternating between repeats so that a drifting machine load does not favour one. Two rates:

- *end to end*: all examples over the fleet's wall time, process starts and framework imports included
  (what ``attnverify fuzz --workers N`` gives);
- *campaign*: all examples over the longest worker's campaign seconds (the campaign processes' starts left
  out; the target process starts inside the campaign, so its import is in).

It prints the median of each over the repeats, their ratio 2 workers / 1, and the median of each
repeat's own ratio (the two fleets of a repeat share its seed, so that pairing removes much of the
seed-to-seed spread in the cost of the cases drawn). A fleet ends with its
slowest worker, and a budget is checked between examples, so one slow example (a large case that
the mp oracle decides) stretches a run well past its budget: a smaller ``--max-len`` cuts that
tail and the noise it brings. A worker is two processes
(the campaign computes exact values while the target's process runs the kernel), so one worker
already keeps more than one core partly busy: on two cores the ratio stays below 2. ``--in-process``
runs each worker as one process (the target in the campaign's process), for the ratio without that
overlap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verify import fleet, fuzz  # noqa: E402
from verify.targets import load  # noqa: E402


def _rates(target: str, workers: int, budget: float, max_len: int, seed: int, tmp: Path,
           isolate: bool) -> tuple[float, float, int]:
    """(end-to-end examples/s, campaign examples/s, examples) of one fleet."""
    sett = fuzz.Settings(budget=budget, seed=seed, max_len=max_len, database=None, isolate=isolate,
                         repro_dir=tmp / f"f{workers}-{seed}")
    t0 = time.perf_counter()
    fl = fleet.run(load(target), sett, workers=workers)
    wall = time.perf_counter() - t0
    if fl.failed:
        raise SystemExit(f"bench_fleet: worker(s) failed: {'; '.join(r.error or '' for r in fl.failed)}")
    n = sum(fl.campaign().examples.values())
    busiest = max(r.campaign.seconds["total"] for r in fl.rows if r.campaign is not None)
    return n / wall, n / busiest, n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="chunked-torch")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per worker campaign")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=fuzz.Settings.max_len, help="longest sequence of a large case")
    ap.add_argument("--in-process", action="store_true",
                    help="each worker calls the target in its own process (one process per worker, no isolation)")
    args = ap.parse_args()
    runs: dict[int, list[tuple[float, float, int]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                runs[workers].append(_rates(args.target, workers, args.budget, args.max_len, r, Path(tmp),
                                              not args.in_process))
                e2e, camp, n = runs[workers][-1]
                print(f"  repeat {r} workers {workers}: {n} examples, {e2e:.1f}/s end to end, {camp:.1f}/s campaign",
                      file=sys.stderr, flush=True)
    med = {w: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for w, v in runs.items()}
    mode = "in process" if args.in_process else "isolated"
    print(f"{args.target} ({mode}): budget {args.budget:g} s per worker, max_len {args.max_len}, "
          f"median of {args.repeats}")
    print(f"{'workers':>7s} {'ex/s end to end':>16s} {'ex/s campaign':>14s}")
    for w, (e2e, camp) in med.items():
        print(f"{w:7d} {e2e:16.1f} {camp:14.1f}")
    print(f"{'2 / 1':>7s} {med[2][0] / med[1][0]:15.2f}x {med[2][1] / med[1][1]:13.2f}x")
    paired = [(b[0] / a[0], b[1] / a[1]) for a, b in zip(runs[1], runs[2], strict=True)]
    print(f"{'paired':>7s} {statistics.median(p[0] for p in paired):15.2f}x "
          f"{statistics.median(p[1] for p in paired):13.2f}x  (median of the repeats' own ratios: "
          f"{', '.join(f'{p[0]:.2f}' for p in paired)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
