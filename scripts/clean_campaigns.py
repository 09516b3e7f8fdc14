"""Long campaigns with default settings on correct targets: the evidence behind "clean over N examples".

Run from the repository root::

    .venv/bin/python scripts/clean_campaigns.py --out campaigns [--examples 1000] [--targets a,b=300]

Each target gets ``attnverify fuzz --target T --max-examples N`` (N per dtype, shrinking included;
every other setting the default) with its JSON in ``OUT/T.json`` and its findings under ``OUT/T/``.
The table gives, per target: examples per dtype, findings, seconds, examples/s, the largest L and
head dim reached, and which reference decided. A target's campaign is a subprocess, so one that
dies takes only its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = ("chunked-torch", "torch-sdpa-flash", "torch-flex", "triton-flash", "chunked-jax",
                   "tests.fixture_jax_targets:python_loops")


def campaign(target: str, examples: int, out: Path) -> dict:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", target)
    js = out / f"{slug}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    with open(out / f"{slug}.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "verify.commands", "fuzz", "--target", target, "--max-examples",
                             str(examples), "--repro-dir", str(out / slug), "--database", str(out / ".db"),
                             "--json", str(js)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    row = {"target": target, "rc": rc, "seconds": time.monotonic() - t0}
    if js.exists():
        data = json.loads(js.read_text())
        row.update(examples=data["examples"], findings=[f"{f['category']}/{f['output']}/{f['dtype']}"
                                                        for f in data["findings"]],
                   max_len=data["stats"].get("max_len"), max_dim=data["stats"].get("max_dim"),
                   references=data["references"], workers=data.get("workers"))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("campaigns"))
    ap.add_argument("--examples", type=int, default=1000, help="per dtype (default 1000)")
    ap.add_argument("--targets", help=f"comma list, each T or T=N to give it N examples per dtype (default "
                                      f"{','.join(DEFAULT_TARGETS)})")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in args.targets.split(",") if args.targets else DEFAULT_TARGETS:
        target, _, n = item.partition("=")
        row = campaign(target, int(n) if n else args.examples, args.out)
        rows.append(row)
        n = sum(row.get("examples", {}).values())
        print(f"{target:40s} rc={row['rc']} examples={row.get('examples')} findings={row.get('findings')} "
              f"{row['seconds']:.0f} s ({n / row['seconds']:.2f}/s) max L={row.get('max_len')} "
              f"max D={row.get('max_dim')} references={row.get('references')} workers={row.get('workers')}",
              flush=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
