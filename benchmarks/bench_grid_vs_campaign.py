"""A FlashAttention-style test grid beside the default campaign, on the project's mutant zoos: the kill table.

Run from the repository root: ``.venv/bin/python benchmarks/bench_grid_vs_campaign.py [--zoos chunked,modern,tiled]
[--only NAME,...] [--max-examples N]``. For each clean base and each mutant of the chosen zoos it runs

- **the grid**, the way FlashAttention's own tests check a kernel, point by point until the first failure;
- **the campaign**, ``fuzz.run`` with the default ``Settings`` as ``scripts/mutant_kills.py`` runs it (no
  database, stopping at the first finding; a clean base runs the whole campaign);

and prints one table, the kills per zoo for each method, and where the grid wins.

The grid, as FlashAttention's tests have it (``tests/test_flash_attn.py`` of FlashAttention 2, ``hopper/`` of 3,
``tests/cute/`` of 4), scaled down to this CPU:

- seqlen pairs (113, 203), (128, 217), (1023, 1024) (``test_flash_attn_output``), (1, 147)
  (``test_flash_attn_varlen_output``), (127, 513) (``test_flash_attn_causal``); that causal test also swaps
  each pair (``swap_sq_sk``), which is not taken here (it would double the grid);
- head dims 32, 59, 64, 128; dtypes bf16 and fp16; causal False / True; inputs, cotangent ``g`` included,
  standard normal rounded to the dtype (``torch.randn``), the default scale, one seed;
- batch 1 and 4 query heads (FlashAttention: batch 4 to 9, 6 heads); its ``mha_type`` mha / mqa / gqa as
  4 / 1 / 2 kv heads;
- the options FlashAttention parametrizes, for a target that declares them, each one switched on against
  the axes above with gqa heads (FlashAttention crosses them all; one at a time here): ``local``, a
  window of two sizes drawn from ``[0, Lk)`` (FA 2); ``softcap`` 50 with q scaled by 25 (FA 3);
  ``alibi``, slopes ``rand(B, H) * 0.3`` (FA 2); ``sink``, one standard normal logit per head
  (``has_learnable_sink``, FA 4); ``varlen``, FA 2's random padding of queries and keys to lengths in
  ``[L - 20, L]``, given to a target as a boolean mask (padded query rows fully masked, out 0);
- causal, windows and ALiBi aligned bottom-right (FlashAttention >= 2.1) for a target that declares
  ``bottom-right``, else top-left; a target with ``chunks`` runs fixed chunks of 64 queries x 128 keys
  (FlashAttention's tests never vary the block size: a kernel is tested at its own tiles);
- not in FlashAttention's tests, so not in the grid: arbitrary bias, segment ids, lse (returned there,
  never compared), the gradients of bias and sinks (only dq, dk, dv are compared), scales other than
  the default, and any value family but normal.

Its rule, per point: ``max|out - ref| <= 2 max|out_pt - ref| + 1e-5`` and, for dq, dk and dv,
``max|d - d_ref| <= 3 max|d_pt - d_ref| + 1e-5``. ``ref`` is FlashAttention's "upcast" reference, the
attention computed in float32 and rounded to the dtype, and ``out_pt`` the plain same-dtype PyTorch
computation (``oracles.naive``: logits and probabilities rounded to the dtype, float32 accumulation);
FlashAttention 2's ``test_flash_attn_output`` uses factor 2 for out and 3 for the gradients without a
floor, its ``test_flash_attn_causal`` 2 for both plus 1e-5, FlashAttention 3 and 4 factor 2 (3 with
softcap) plus twice the rounding error of ``out_ref + 0.3 - 0.3``. A NaN, or the target raising,
fails the point. ``grid s`` counts the target's calls and the references' time at every point run (the
references are computed once per zoo and charged to each run); ``campaign s`` and ``campaign examples``
run to the campaign's first sighting of a finding, before shrinking; ``shrunk`` is when the campaign
stopped with that finding shrunk (what ``mutant_kills.py`` reports).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oracles import naive  # noqa: E402
from tests.mutants import BASE, MODERN_BASE, MODERN_MUTANTS, MUTANTS, TILED_BASE, TILED_MUTANTS, Mutant  # noqa: E402
from verify import fuzz  # noqa: E402
from verify.case import Case  # noqa: E402
from verify.strategies import make_case  # noqa: E402
from verify.strategies.value_families import cast  # noqa: E402
from verify.targets import Adapter, adapter_for  # noqa: E402

ZOOS: dict[str, tuple[Mutant, dict[str, Mutant]]] = {
    "chunked": (BASE, MUTANTS), "modern": (MODERN_BASE, MODERN_MUTANTS), "tiled": (TILED_BASE, TILED_MUTANTS),
}
SEQLENS = ((113, 203), (128, 217), (1, 147), (127, 513), (1023, 1024))
HEAD_DIMS = (32, 59, 64, 128)
DTYPES = ("bf16", "fp16")
HEADS = 4
KV_HEADS = {"mha": 4, "mqa": 1, "gqa": 2}
OPTIONS = (("window", "local"), ("softcap", "softcap"), ("alibi", "alibi"), ("sinks", "sink"), ("mask", "varlen"))
CHUNKS = (64, 128)
SOFTCAP = 50.0
OUT_FACTOR, GRAD_FACTOR, FLOOR = 2.0, 3.0, 1e-5
SEED = 0


@dataclass(frozen=True)
class Point:
    """One grid point: lengths, head dim, causal, the variant (heads or option switched on) and dtype."""

    lq: int
    lk: int
    d: int
    causal: bool
    variant: str
    dtype: str

    def label(self) -> str:
        return f"({self.lq},{self.lk}) d={self.d} {'causal ' if self.causal else ''}{self.variant} {self.dtype}"


@dataclass
class Reference:
    """What the rule compares a target with at one point: the case, ``ref`` rounded to the dtype, the bounds."""

    case: Case
    ref: dict[str, np.ndarray]
    bound: dict[str, float]
    seconds: float


@dataclass
class GridResult:
    killed: bool
    seconds: float
    points: int
    point: str = "-"
    detail: str = ""


@dataclass
class CampaignResult:
    killed: bool
    examples: int
    seconds: float
    finding: str = "-"
    shrunk: str = ""


def variants(features: frozenset[str]) -> list[str]:
    """The variants a target's declared features give: its head layouts, then one per FlashAttention option."""
    heads = list(KV_HEADS) if "gqa" in features else ["mha"]
    return heads + [name for feature, name in OPTIONS if feature in features]


def grid(features: frozenset[str]) -> list[Point]:
    """Every point, in pytest's order for FlashAttention's decorators: lengths slowest, dtype fastest."""
    return [Point(lq, lk, d, causal, var, dtype) for lq, lk in SEQLENS for d in HEAD_DIMS for causal in (False, True)
            for var in variants(features) for dtype in DTYPES]


def build_case(p: Point, features: frozenset[str]) -> Case:
    """The point's case: normal inputs of its shape, the variant's option drawn as FlashAttention draws it."""
    kv = KV_HEADS[p.variant] if p.variant in KV_HEADS else KV_HEADS["gqa" if "gqa" in features else "mha"]
    dims = {"B": 1, "Lq": p.lq, "Lk": p.lk, "Hq": HEADS, "Hkv": kv, "Dk": p.d, "Dv": p.d}
    case = make_case(SEED, p.dtype, dims=dims, family="normal", features=features)
    rng = np.random.default_rng([SEED, p.lq, p.lk, p.d, int(p.causal)])
    change: dict = {"causal": p.causal}
    if "chunks" in features:
        change["query_chunk_size"], change["key_chunk_size"] = CHUNKS
    if p.variant == "local":
        change["window"] = tuple(int(x) for x in rng.integers(0, p.lk, 2))
    elif p.variant == "softcap":
        change["softcap"] = SOFTCAP
        change["q"] = cast(case.q.astype(np.float32) * (SOFTCAP / 2), p.dtype)
    elif p.variant == "alibi":
        change["alibi_slopes"] = (rng.random((1, HEADS)) * 0.3).astype(np.float32)
    elif p.variant == "sink":
        change["sinks"] = cast(rng.standard_normal(HEADS), p.dtype)
    elif p.variant == "varlen":
        rows = np.arange(p.lq) < rng.integers(max(1, p.lq - 20), p.lq + 1)
        keys = np.arange(p.lk) < rng.integers(max(1, p.lk - 20), p.lk + 1)
        change["mask"] = (rows[:, None] & keys[None, :])[None, None]
    if "bottom-right" in features and (p.causal or p.variant in ("local", "alibi")):
        change["align"] = "bottom-right"
    return case.with_(**change)


def reference(p: Point, features: frozenset[str]) -> Reference:
    """``ref`` (float32, rounded to the dtype) and the rule's bounds from the plain same-dtype computation."""
    t0 = time.perf_counter()
    case = build_case(p, features)
    kw = dict(case.semantics(), masked_rows="zeros")
    up = naive.attention_vjp(case.q, case.k, case.v, case.g, dtype="fp32", accumulate="fp32", round_logits=False,
                             round_probs=False, **kw)
    pt = naive.attention_vjp(case.q, case.k, case.v, case.g, dtype=case.dtype, accumulate="fp32", round_logits=True,
                             round_probs=True, **kw)
    ref, bound = {}, {}
    for name, factor in (("out", OUT_FACTOR), ("dq", GRAD_FACTOR), ("dk", GRAD_FACTOR), ("dv", GRAD_FACTOR)):
        ref[name] = naive.round_to_dtype(getattr(up, name), case.dtype)
        bound[name] = factor * float(np.max(np.abs(getattr(pt, name) - ref[name]))) + FLOOR
    return Reference(case, ref, bound, time.perf_counter() - t0)


def check(adapter: Adapter, r: Reference) -> str | None:
    """Why the target fails the rule at this point (the first output over its bound), or None."""
    try:
        got = {"out": adapter.forward(r.case).out, **adapter.vjp(r.case)}
    except Exception as exc:  # a kernel that raises fails the test
        return f"raised {type(exc).__name__}: {exc}"[:120]
    for name, bound in r.bound.items():
        err = float(np.max(np.abs(got[name].astype(np.float64) - r.ref[name])))
        if not err <= bound:  # NaN fails
            return f"{name} err {err:.3g} > {bound:.3g}"
    return None


def run_grid(m: Mutant, refs: dict[Point, Reference]) -> GridResult:
    """The grid in order until the first failing point; references are computed on first use and kept."""
    adapter = adapter_for(m.fn, m.info())
    points = grid(m.features)
    clock = 0.0
    for i, p in enumerate(points, 1):
        if p not in refs:
            refs[p] = reference(p, m.features)
        r = refs[p]
        t0 = time.perf_counter()
        why = check(adapter, r)
        clock += r.seconds + time.perf_counter() - t0
        if why:
            return GridResult(True, clock, i, p.label(), why)
    return GridResult(False, clock, len(points))


def run_campaign(m: Mutant, max_examples: int | None, repro_dir: Path) -> CampaignResult:
    """The default campaign, timed to its first sighting (a clean base runs it whole)."""
    clean = m.kind == "none"
    sett = fuzz.Settings(max_examples=max_examples, database=None, repro_dir=repro_dir,
                         max_findings=None if clean else 1)
    trace: list[tuple[float, int]] = []  # (seconds, examples) after each example
    first: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    def progress(camp: fuzz.Campaign, _dtype: str) -> None:
        if camp.provisional and not first and trace:  # the previous example was the first sighting
            first.append(trace[-1])
        trace.append((time.perf_counter() - t0, sum(camp.examples.values())))

    camp = fuzz.run(adapter_for(m.fn, m.info()), sett, on_progress=progress)
    total, n = time.perf_counter() - t0, sum(camp.examples.values())
    if not camp.findings:
        return CampaignResult(False, n, total)
    seconds, examples = first[0] if first else trace[-1]
    f = camp.findings[0]
    return CampaignResult(True, examples, seconds, f"{f.category}/{f.output}/{f.dtype}",
                          f"{n} ex, {total:.1f} s")


def names_in(zoo: str, only: set[str] | None) -> Iterable[Mutant]:
    base, mutants = ZOOS[zoo]
    for m in (base, *mutants.values()):
        if only is None or m.name in only:
            yield m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoos", default=",".join(ZOOS), help="comma list of zoos: chunked, modern, tiled")
    ap.add_argument("--only", help="comma list of mutant names (clean bases: clean, modern-clean, tiled-clean)")
    ap.add_argument("--max-examples", type=int, default=fuzz.Settings.max_examples,
                    help="campaign examples per dtype (default: the campaign's own)")
    args = ap.parse_args()
    zoos = args.zoos.split(",")
    unknown = [z for z in zoos if z not in ZOOS]
    if unknown:
        ap.error(f"unknown zoo {unknown[0]!r}; known: {', '.join(ZOOS)}")
    only = set(args.only.split(",")) if args.only else None
    rows: list[tuple[str, Mutant, GridResult, CampaignResult]] = []
    head = (f"{'mutant':22s} {'zoo':8s} {'grid killed':>11s} {'grid s':>7s} {'campaign killed':>15s} "
            f"{'campaign examples':>17s} {'campaign s':>10s}  grid point / campaign finding")
    with tempfile.TemporaryDirectory() as tmp:
        for zoo in zoos:
            refs: dict[Point, Reference] = {}
            base = ZOOS[zoo][0]
            print(f"\n{zoo}: {len(grid(base.features))} grid points ({', '.join(variants(base.features))})", flush=True)
            print(head, flush=True)
            for m in names_in(zoo, only):
                g = run_grid(m, refs)
                c = run_campaign(m, args.max_examples, Path(tmp))
                rows.append((zoo, m, g, c))
                what = f"{g.point}: {g.detail}" if g.killed else f"passed {g.points} points"
                print(f"{m.name:22s} {zoo:8s} {_yes(g.killed, m):>11s} {g.seconds:7.1f} {_yes(c.killed, m):>15s} "
                      f"{c.examples:17d} {c.seconds:10.1f}  grid: {what} | campaign: {c.finding}"
                      + (f" (shrunk: {c.shrunk})" if c.shrunk else ""), flush=True)
    _summary(rows)
    return 0


def _yes(killed: bool, m: Mutant) -> str:
    if m.kind == "none":
        return "FALSE-POS" if killed else "clean"
    return "yes" if killed else "no"


def _summary(rows: list[tuple[str, Mutant, GridResult, CampaignResult]]) -> None:
    """Kill counts per zoo for each method, the clean bases' times, and the mutants where the grid wins."""
    print("\ntotals (mutants killed):")
    for zoo in dict.fromkeys(z for z, *_ in rows):
        mine = [(m, g, c) for z, m, g, c in rows if z == zoo and m.kind != "none"]
        print(f"  {zoo:8s} grid {sum(g.killed for _, g, _ in mine)}/{len(mine)}   "
              f"campaign {sum(c.killed for _, _, c in mine)}/{len(mine)}")
    for _, m, g, c in rows:
        if m.kind == "none":
            print(f"  {m.name}: grid {'flags it (FALSE POSITIVE) at ' + g.point if g.killed else 'passes'} "
                  f"in {g.seconds:.1f} s ({g.points} points); campaign "
                  f"{'flags it (FALSE POSITIVE): ' + c.finding if c.killed else 'passes'} in {c.seconds:.1f} s "
                  f"({c.examples} examples)")
    faster = [m.name for _, m, g, c in rows if m.kind != "none" and g.killed and c.killed and g.seconds < c.seconds]
    missed = [m.name for _, m, g, c in rows if m.kind != "none" and g.killed and not c.killed]
    print(f"where the grid wins: kills faster than the campaign: {', '.join(faster) or 'none'}; "
          f"kills what the campaign misses: {', '.join(missed) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
