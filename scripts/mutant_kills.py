"""Fuzz the clean base and every mutant of the zoo with the CI defaults; print the kill table.

Run from the repository root: ``.venv/bin/python scripts/mutant_kills.py [--max-examples N]``.
Each mutant's campaign stops at its first finding; the table gives the examples and seconds it
took and the category found. The clean base must give no finding at all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.mutants import BASE, MUTANTS  # noqa: E402
from verify import fuzz  # noqa: E402
from verify.targets import adapter_for  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-examples", type=int, default=fuzz.Settings.max_examples)
    ap.add_argument("--only", help="comma list of mutant names")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else ["clean", *MUTANTS]
    killed = 0
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'mutant':22s} {'kind':28s} {'result':10s} {'examples':>8s} {'seconds':>8s}  finding")
        for name in names:
            m = BASE if name == "clean" else MUTANTS[name]
            adapter = adapter_for(m.fn, m.info())
            sett = fuzz.Settings(max_examples=args.max_examples, database=None, repro_dir=Path(tmp),
                                 max_findings=None if name == "clean" else 1)
            t0 = time.perf_counter()
            camp = fuzz.run(adapter, sett)
            dt = time.perf_counter() - t0
            n = sum(camp.examples.values())
            if camp.findings:
                f = camp.findings[0]
                what = f"{f.category}/{f.output}/{f.dtype} family={f.family} mask={f.mask_kind}"
                result = "killed" if name != "clean" else "FALSE-POS"
                killed += name != "clean"
            else:
                what, result = "-", "clean" if name == "clean" else "SURVIVED"
            print(f"{name:22s} {m.kind:28s} {result:10s} {n:8d} {dt:8.1f}  {what}", flush=True)
    total = len([n for n in names if n != "clean"])
    print(f"kill rate: {killed}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
