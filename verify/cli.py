"""``attnverify``: the command line.

    attnverify demo                       one case: mp oracle vs naive reference
    attnverify targets [--target T ...]   what can run here, with features, policy and contract
    attnverify fuzz --target T [...]      a campaign; exit 0 clean, 1 findings, 2 usage error
    attnverify repro FILE                 replay a saved finding without Hypothesis
    attnverify report --target T --out D  accuracy sweep: tables, plots, baseline gate
    attnverify memory --target T          temporary memory against length per chunk policy
    attnverify bundled [--out reports]    the main job: fuzz + reports + gate for every bundled target

Usage errors (unknown target, unimportable module, bad flag) exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from oracles import spec
from verify import bundled, memory, report
from verify.targets import BUNDLED, Contract, TargetError, Unavailable, load


class UsageError(Exception):
    """Bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UsageError(message)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _target_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--target", required=required, help="bundled name or package.module:function")
    p.add_argument("--framework", choices=("torch", "jax", "numpy"))
    p.add_argument("--features", type=_csv, help="comma list of mask,bias,causal,gqa,chunks,lse,grad")
    p.add_argument("--masked-rows", choices=spec.MASKED_ROW_POLICIES)
    p.add_argument("--target-dtypes", type=_csv, help="dtypes the target supports (user targets)")
    p.add_argument("--accumulate", choices=("fp32", "input"), help="precision contract: accumulation dtype")
    p.add_argument("--round-logits", action="store_true", help="contract: logits rounded to the input dtype")
    p.add_argument("--no-round-probs", action="store_true", help="contract: probabilities kept in fp32")


def _load(args: argparse.Namespace):
    contract = None
    if args.accumulate or args.round_logits or args.no_round_probs:
        contract = Contract(accumulate=args.accumulate or "fp32", round_logits=args.round_logits,
                            round_probs=not args.no_round_probs)
    return load(args.target, framework=args.framework, features=args.features, masked_rows=args.masked_rows,
                dtypes=args.target_dtypes, contract=contract)


def cmd_demo(args: argparse.Namespace) -> int:
    """One random case: how well the float64 naive reference agrees with the mp oracle."""
    from oracles import mp, naive

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


def cmd_targets(args: argparse.Namespace) -> int:
    """List bundled targets (or the one given) with availability, features, policy and contract."""
    names = [args.target] if args.target else list(BUNDLED)
    for name in names:
        try:
            adapter = _load(args) if args.target else load(name)
        except Unavailable as exc:
            print(f"{name:16s} unavailable: {exc}")
            continue
        info = adapter.info
        c = info.contract
        print(f"{name:16s} ok  {info.framework}/{info.device}  dtypes={','.join(info.dtypes)}")
        print(f"{'':16s}     features={','.join(sorted(info.features)) or '-'}"
              f"  not exercised={','.join(info.unexercised()) or '-'}")
        print(f"{'':16s}     masked-rows={info.masked_rows}  contract: accumulate={c.accumulate} "
              f"round_logits={c.round_logits} round_probs={c.round_probs}")
        if info.notes:
            print(f"{'':16s}     notes: {info.notes}")
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    """Run a campaign; print each finding; exit 1 if anything was found."""
    from verify import fuzz, strategies

    adapter = _load(args)
    checks = tuple(args.checks)
    for c in checks:
        if c not in ("forward", "grad"):
            raise UsageError(f"unknown check {c!r}; known: forward, grad")
    dtypes = tuple(spec.dtype_name(d) for d in args.dtypes)
    extra = {}
    for flag, value, known in (("families", args.families, strategies.FAMILIES),
                               ("mask_kinds", args.masks, strategies.MASK_KINDS)):
        if value:
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise UsageError(f"unknown {flag.replace('_', ' ')} {', '.join(unknown)}; known: {', '.join(known)}")
            extra[flag] = tuple(value)
    sett = fuzz.Settings(**extra,
        dtypes=dtypes, checks=checks, max_examples=args.max_examples, budget=args.budget, seed=args.seed,
        policy=args.tolerance, timeout=args.timeout,
        database=None if args.no_database else Path(args.database), repro_dir=Path(args.repro_dir),
    )
    print(f"fuzz {adapter.info.name}: dtypes {','.join(dtypes)}, checks {','.join(checks)}, "
          f"{args.max_examples} examples per dtype, tolerance {args.tolerance}", flush=True)
    if adapter.info.unexercised():
        print(f"not exercised (undeclared): {', '.join(adapter.info.unexercised())}")
    try:
        camp = fuzz.run(adapter, sett, on_finding=lambda f: print(f.message() + "\n", flush=True),
                        json_path=Path(args.json) if args.json else None)
    except KeyboardInterrupt:
        print("interrupted: findings so far are saved" + (f" in {args.json}" if args.json else ""), file=sys.stderr)
        return 130
    ex = ", ".join(f"{d}: {n}" for d, n in camp.examples.items())
    s = camp.seconds
    print(f"examples run: {ex}; {s['total']:.1f} s (oracle {s['oracle']:.1f} s, target {s['target']:.1f} s)")
    for dtype, reasons in camp.declined.items():
        for reason, n in reasons.items():
            print(f"declined by the target, {dtype}: {n} case(s): {reason}")
    for dtype, worst in camp.worst_ratio.items():
        print(f"worst error in allowances, {dtype}: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    print(f"{len(camp.findings)} finding(s)" + ("" if not camp.findings else ": " + ", ".join(
        f"{f.category}/{f.output}/{f.dtype}" for f in camp.findings)))
    return 1 if camp.findings else 0


def cmd_repro(args: argparse.Namespace) -> int:
    """Replay a saved case; exit 1 if it still shows findings."""
    from verify import checks
    from verify.case import Case

    path = Path(args.file)
    if not path.with_suffix(".json").exists():
        raise UsageError(f"no case file {path.with_suffix('.json')}")
    case = Case.load(path)
    meta = case.meta
    if args.target:
        adapter = _load(args)
    else:
        if "target" not in meta:
            raise UsageError(f"{path}: the case names no target; pass --target")
        name = meta["target"]
        kw = {} if name in BUNDLED else dict(
            framework=meta.get("framework"), features=meta.get("features"), masked_rows=meta.get("masked_rows"),
            dtypes=meta.get("dtypes"), contract=Contract(**meta["contract"]) if meta.get("contract") else None)
        adapter = load(name, **kw)
    out = checks.run_case(adapter, case, checks=tuple(meta.get("checks", checks.CHECKS)),
                          policy=meta.get("policy", "bound"), timeout=args.timeout)
    print(f"repro {path} on {adapter.info.name}: {case.describe()}")
    for f in out.findings:
        print(f.message() + "\n")
    worst = ", ".join(f"{k} {v:.3g}" for k, v in out.ratios.items())
    print(f"{len(out.findings)} finding(s); worst error in allowances: {worst}")
    return 1 if out.findings else 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnverify", description="verify and fuzz chunked attention implementations")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    d = sub.add_parser("demo", help="mp oracle vs naive reference on one case")
    d.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("targets", help="list targets")
    _target_args(t, required=False)
    f = sub.add_parser("fuzz", help="fuzz one target")
    _target_args(f)
    f.add_argument("--dtypes", type=_csv, default=["bf16", "fp16", "fp32"])
    f.add_argument("--checks", type=_csv, default=["forward", "grad"])
    f.add_argument("--max-examples", type=int, default=200, help="per dtype")
    f.add_argument("--budget", type=float, help="seconds for the whole campaign")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--tolerance", choices=("bound", "naive"), default="bound")
    f.add_argument("--families", type=_csv, help="value families to draw (default: all)")
    f.add_argument("--masks", type=_csv, help="mask kinds to draw (default: all)")
    f.add_argument("--timeout", type=float, default=120.0, help="seconds per target call")
    f.add_argument("--json", help="write the campaign's results here")
    f.add_argument("--repro-dir", default="findings")
    f.add_argument("--database", default=".attnverify/hypothesis")
    f.add_argument("--no-database", action="store_true")
    report.add_parser(sub)
    memory.add_parser(sub)
    bundled.add_parser(sub)
    r = sub.add_parser("repro", help="replay a saved case")
    r.add_argument("file")
    _target_args(r, required=False)
    r.add_argument("--timeout", type=float, default=120.0)
    return p


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.getcwd())  # user targets are importable from the working directory
    try:
        args = build_parser().parse_args(argv)
        commands = {"demo": cmd_demo, "targets": cmd_targets, "fuzz": cmd_fuzz, "repro": cmd_repro,
                    "report": report.run, "memory": memory.run, "bundled": bundled.run}
        command = commands.get(args.command)
        if command is None:
            raise UsageError(f"give a command: {', '.join(commands)}")
        return command(args)
    except (UsageError, TargetError, Unavailable, ValueError) as exc:
        print(f"attnverify: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
