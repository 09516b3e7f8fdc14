"""``attnverify demo``: one case, the mp oracle against the float64 naive reference (seconds)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from oracles import mp, naive, spec


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="mp oracle vs naive reference on one case")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """One random case: how well the float64 naive reference agrees with the mp oracle."""
    rng = np.random.default_rng(args.seed)
    b, lq, lk, h, d = 1, 16, 24, 2, 8
    q = rng.standard_normal((b, lq, h, d)).astype(np.float32)
    k = rng.standard_normal((b, lk, h, d)).astype(np.float32)
    v = rng.standard_normal((b, lk, h, d)).astype(np.float32)
    g = rng.standard_normal((b, lq, h, d)).astype(np.float32)
    mask = rng.random((b, 1, lq, lk)) < 0.7
    t0 = time.perf_counter()
    exact = mp.attention_vjp(q, k, v, g, mask=mask, causal=True)
    t1 = time.perf_counter()
    ref = naive.attention_vjp(q, k, v, g, mask=mask, causal=True)
    t2 = time.perf_counter()
    scale = mp.attention(q, k, np.abs(v), mask=mask, causal=True).out
    print(f"case: fp32 B={b} Lq={lq} Lk={lk} H={h} D={d}, random mask (70% visible) and causal, seed {args.seed}")
    print(f"mp oracle (prec {mp.DEFAULT_PREC} bits) forward+VJP: {t1 - t0:.3f} s; naive float64: {t2 - t1:.4f} s")
    masked = np.swapaxes(~spec.normalize(q, k, v, mask=mask, causal=True).visible.any(-1), 1, 2)
    print(f"fully masked rows: {int(masked.sum())} (policy zeros: both give 0)")
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > 0, np.abs(ref.out - exact.out) / scale, 0.0)
    print(f"output: max |naive - mp| / A = {rel.max():.3g}  (A = sum p|v|; float64 u = {2.0**-53:.3g})")
    for name in ("dq", "dk", "dv"):
        want, got = getattr(exact, name), getattr(ref, name)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)
        print(f"{name}: max |naive - mp| / max|mp| = {err:.3g}")
    ok = rel.max() < 1e-12
    print("agreement: OK" if ok else "agreement: FAILED (naive float64 differs from the oracle)")
    return 0 if ok else 1
