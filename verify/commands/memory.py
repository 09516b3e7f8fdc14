"""``attnverify memory``: temporary memory against sequence length; a short summary, the report in --out."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from oracles import spec
from verify import memory
from verify.commands.common import add_target_arguments, default, ints, target_spec


def add_parser(sub: argparse._SubParsersAction) -> None:
    S = memory.Settings
    p = sub.add_parser("memory", help="temporary memory against sequence length per chunk policy")
    add_target_arguments(p)
    p.add_argument("--lengths", type=ints, help="comma list (default: jax 1024..65536, torch 256..4096)")
    p.add_argument("--policies", default=default(S, "policies"), help="comma list of QxK, Q and K an integer or sqrt")
    p.add_argument("--heads", type=int, default=default(S, "heads"))
    p.add_argument("--dim", type=int, default=default(S, "dim"))
    p.add_argument("--batch", type=int, default=default(S, "batch"))
    p.add_argument("--dtype", choices=tuple(spec.DTYPES), default=default(S, "dtype"))
    p.add_argument("--reference", default=default(S, "reference"),
                   help="dense target for the ratio (default jax-dpa / torch-sdpa by framework; 'none' to skip)")
    p.add_argument("--sweep-length", type=int, help="L of the chunk-size sweeps (default 16384 if measured, "
                   "else the largest length)")
    p.add_argument("--query-chunks", type=ints, default=list(default(S, "query_chunks")),
                   help="query chunks of the sweep at key chunk isqrt(L)")
    p.add_argument("--key-chunks", type=ints, default=list(default(S, "key_chunks")),
                   help="key chunks of the sweep at query chunk 1024")
    p.add_argument("--out", default="reports/memory", help="directory for memory.json, memory.md, memory.png")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    sett = memory.Settings(
        lengths=tuple(args.lengths) if args.lengths else None, policies=args.policies, heads=args.heads,
        dim=args.dim, batch=args.batch, dtype=args.dtype, reference=args.reference, sweep_length=args.sweep_length,
        query_chunks=tuple(args.query_chunks), key_chunks=tuple(args.key_chunks))
    doc = memory.run(target_spec(args), sett, Path(args.out))
    for line in memory.summary(doc):
        print(line)
    print(f"wrote {args.out}/memory.md (tables, the chunk-size model), memory.json and memory.png "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
