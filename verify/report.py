"""Accuracy sweeps: measured error per dtype, chunk sizes, length, value family and mask, with tables and plots.

``attnverify report --target T --out reports/NAME`` runs a grid of *cells* and writes, in ``NAME/``:
``report.json`` (schema ``SCHEMA_VERSION``, every raw figure), ``report.md`` (a table per dtype, chunk
sizes as rows and lengths as columns, for a PR comment), three PNG plots and ``index.html`` showing
them together. ``--baseline OLD/report.json`` turns it into a gate (exit 1 on regressions).

Decisions, stated:

- **Cell** = (dtype, query chunk, key chunk, L, family, mask kind) with Lq = Lk = L, B/H/D fixed
  (defaults 1/2/16, Hq = Hkv, Dk = Dv) and ``--seeds`` cases each. The inputs of a seed depend only on
  (``--seed``, dtype, L, family, mask kind, seed index) -- not on the chunk sizes or the target -- so
  chunk settings, targets and baselines are compared on the very same inputs (``strategies.make_case``;
  ``dominant-key`` and the chunk-aligned mask kinds align to the key chunk, so there they differ).
  Chunk sizes are numbers or ``L``; the defaults (queries 16, 24, L; keys 1, 16, 24, L) give a divisor,
  a non-divisor (a short last chunk, where chunk-edge bugs live), one chunk, and at L=16 a chunk larger
  than L. A size that splits L into more than ``--max-chunks`` chunks is skipped (key chunk 1 at L=64:
  runtime, not interest). Targets
  without the ``chunks`` feature get one row ``-`` (None); only declared dtypes and mask kinds run,
  and the report lists what was dropped and which features were not exercised.
- **Exact reference** per seed: the ``mp`` oracle when L <= ``--mp-max-len`` (64), else the float64
  naive reference (``naive64``) if it flags every row ``reliable``, else ``mp`` anyway. Each cell
  records ``reference`` (``mp``, ``naive64`` or ``mixed``). On every mp seed the naive64 result is also
  compared with mp: ``naive64_vs_mp`` at the top of report.json is that sample's worst error in units
  of A, to show naive64 is an adequate stand-in (~1e-16 A; ~1e-12 A with logits of 1e4, against
  u·A >= 6e-8 A in fp32).
- **Figures** per output (``out``, ``dq``, ``dk``, ``dv``, ``dbias`` with a bias), over elements whose
  exact value and result are finite: normalised error ``|got - exact| / (u·A)`` with u the dtype's unit
  roundoff and A the absolute-value scale of ``tolerance.bound`` (``Σ p|v|`` for ``out``, the gradient
  formulas on absolute values for gradients; ``max(A, |exact|)`` in fact, which is A except for the
  mean of all values that the ``uniform`` policy gives a fully masked row; at least the dtype's
  smallest subnormal): ``max_norm``, and ``median_norm`` over all elements of all seeds; ``max_abs``;
  ``max_ulp``, the distance in dtype values between the result and the exact float64 value rounded to
  the dtype (``naive.round_to_dtype``; against mp that is the correct rounding except at exact ties,
  against naive64 it may be one ulp off where the exact value lies within ~1e-12 A of a midpoint);
  ``nonfinite``, results that are inf/NaN where the exact value is finite; ``naive_max_norm``, the
  max normalised error of the same-dtype naive reference under the target's contract (accumulation,
  rounding of logits and probabilities), and ``ratio = max_norm / naive_max_norm`` (null if 0): the
  FlashAttention rule's quantity. ``max_ulp`` is large where the exact value cancels to far below its
  scale (a tiny value has tiny ulps): read it beside ``max_norm``. A target call that raises or runs
  past ``--timeout`` is recorded as the seed's ``error``, not a crash of the sweep.
- **Resumable**: each finished cell is written to ``OUT/cells/<id>.json`` (atomically), ``id`` a hash of
  schema version, target name and flags, the settings that change figures and the cell's key. A rerun
  loads those and computes only the missing cells; ``--fresh`` recomputes everything. Changing the
  target's *code* does not change ids: use ``--fresh`` or another ``--out`` to re-measure.
- **Workers**: work is sent in *groups* (cells sharing dtype, L, family and mask kind), so each group
  computes its exact reference once per seed for all chunk settings. ``--workers N`` (default 2) runs
  groups in N spawned processes (spawn, not fork: JAX and threaded BLAS do not survive fork) with one
  BLAS/OpenMP thread each; ``--workers 1`` runs in this process; ``--scheduler ADDRESS`` submits the same
  function to a Dask distributed cluster (a user target's module must be importable on its workers).
  Workers load the target by name (adapters are not picklable) once per process and return cells; only
  this process writes files, so workers need no shared filesystem. Figures are deterministic per cell,
  so every path gives the same cells (timings aside). Groups are submitted largest first. A cell's
  ``seconds.reference`` counts only the references it computed first (a group shares them).
  ``--workers 1`` keeps this process's BLAS threads: on a small or busy machine, many threads on tiny
  matrices are slow (set ``OMP_NUM_THREADS=1``).
- **Gate**: a cell present in both reports (matched by its key, not the target name) regresses when, for
  some output, ``max(new, FLOOR) > F · max(old, FLOOR)`` on ``max_norm`` with ``FLOOR = 0.5`` (u·A
  units: half an ulp's worth, so 0 -> rounding noise is no regression), or when it has more non-finite
  results, or errors where the baseline had none. Exit 1 lists them; cells missing from either side are
  counted, not gated.

Recipe (CI)::

    attnverify report --target chunked-torch --out reports/chunked-torch          # on main, commit it
    attnverify report --target chunked-torch --out /tmp/pr \\
        --baseline reports/chunked-torch/report.json --max-regression 2           # in the PR job
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from oracles import naive, spec
from verify import checks, tolerance
from verify.case import Case
from verify.strategies import FAMILIES, MASK_KINDS, MASK_NEEDS, make_case
from verify.targets import Adapter, Contract, TargetInfo, load

SCHEMA_VERSION = 1
FLOOR = 0.5
DEFAULT_MAX_REGRESSION = 2.0
DEFAULTS = {
    "dtypes": ("bf16", "fp16", "fp32"),
    "lengths": (16, 64, 256),
    "query_chunks": ("16", "24", "L"),  # 24 divides no default length: the last chunk is short
    "key_chunks": ("1", "16", "24", "L"),
    "families": ("normal", "large-logits", "row-offset"),
    "masks": ("none", "causal"),
}
PLOTS = {
    "error_vs_key_chunk.png": "Max normalised error against key chunk size, per dtype (worst over query chunks, "
    "families and masks; solid: output, dashed: gradients)",
    "heatmap_chunks.png": "Max normalised output error, query chunk × key chunk, at the largest length",
    "error_vs_length.png": "Max normalised error against sequence length (worst over chunks, families and masks)",
}
_PLOT_FLOOR = 1e-2  # log-scale plots show errors below this at this value
_GRADS = ("dq", "dk", "dv", "dbias")


# --- what to run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSpec:
    """A target as name plus ``verify.targets.load`` flags: picklable, so any worker can load it."""

    name: str
    framework: str | None = None
    features: tuple[str, ...] | None = None
    masked_rows: str | None = None
    dtypes: tuple[str, ...] | None = None
    contract: tuple[str, bool, bool] | None = None  # (accumulate, round_logits, round_probs)

    def load(self) -> Adapter:
        """The adapter (imports the target's framework)."""
        contract = None if self.contract is None else Contract(*self.contract)
        return load(self.name, framework=self.framework, features=None if self.features is None else
                    list(self.features), masked_rows=self.masked_rows,
                    dtypes=None if self.dtypes is None else list(self.dtypes), contract=contract)


@dataclass(frozen=True)
class Settings:
    """The sweep: grid axes, seeds per cell, fixed dims and how references and chunk sizes are chosen."""

    dtypes: tuple[str, ...] = DEFAULTS["dtypes"]
    lengths: tuple[int, ...] = DEFAULTS["lengths"]
    query_chunks: tuple[str, ...] = DEFAULTS["query_chunks"]  # numbers or "L"
    key_chunks: tuple[str, ...] = DEFAULTS["key_chunks"]
    families: tuple[str, ...] = DEFAULTS["families"]
    masks: tuple[str, ...] = DEFAULTS["masks"]
    seeds: int = 2
    seed: int = 0
    batch: int = 1
    heads: int = 2
    head_dim: int = 16
    mp_max_len: int = 64
    max_chunks: int = 16
    timeout: float = checks.DEFAULT_TIMEOUT

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        for d in self.dtypes:
            spec.dtype_name(d)
        for what, names, known in (("family", self.families, FAMILIES), ("mask kind", self.masks, MASK_KINDS)):
            bad = [n for n in names if n not in known]
            if bad or not names:
                raise ValueError(f"unknown or empty {what} list {bad or list(names)}; known: {', '.join(known)}")
        for c in self.query_chunks + self.key_chunks:
            if c != "L" and not (c.isdigit() and int(c) > 0):
                raise ValueError(f"chunk size {c!r}: give a positive integer or L")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive, got {list(self.lengths)}")
        if min(self.seeds, self.batch, self.heads, self.head_dim, self.max_chunks) < 1:
            raise ValueError("seeds, batch, heads, head-dim and max-chunks must be >= 1")
        if "row-offset" in self.families and self.head_dim < 2:
            raise ValueError("row-offset needs --head-dim >= 2")

    def dims(self, length: int) -> dict[str, int]:
        return {"B": self.batch, "Lq": length, "Lk": length, "Hq": self.heads, "Hkv": self.heads,
                "Dk": self.head_dim, "Dv": self.head_dim}


def _chunks(specs: tuple[str, ...], length: int, max_chunks: int) -> tuple[list[int], list[int]]:
    """(kept, skipped) chunk sizes for L: ``L`` resolved, duplicates dropped, too many chunks skipped."""
    sizes = sorted({length if c == "L" else int(c) for c in specs})
    return [c for c in sizes if -(-length // c) <= max_chunks], [c for c in sizes if -(-length // c) > max_chunks]


def plan(info: TargetInfo, sett: Settings) -> tuple[list[dict], dict]:
    """The cells (keys, in report order) for a target, and what was left out and why."""
    dtypes = [d for d in (spec.dtype_name(x) for x in sett.dtypes) if d in info.dtypes]
    masks = [m for m in sett.masks if MASK_NEEDS[m] in info.features | {None}]
    skipped: dict = {
        "dtypes": [d for d in sett.dtypes if spec.dtype_name(d) not in info.dtypes],
        "masks": [m for m in sett.masks if m not in masks],
        "chunks": [],
    }
    cells = []
    for dtype in dtypes:
        for length in sorted(set(sett.lengths)):
            if "chunks" in info.features:
                qcs, qskip = _chunks(sett.query_chunks, length, sett.max_chunks)
                kcs, kskip = _chunks(sett.key_chunks, length, sett.max_chunks)
                if dtype == dtypes[0]:
                    skipped["chunks"] += [f"L={length}: {axis} chunk {c} (> {sett.max_chunks} chunks)"
                                          for axis, cs in (("query", qskip), ("key", kskip)) for c in cs]
            else:
                qcs, kcs = [None], [None]
            for qc in qcs:
                for kc in kcs:
                    for family in sett.families:
                        for mask in masks:
                            cells.append({"dtype": dtype, "query_chunk": qc, "key_chunk": kc, "length": length,
                                          "family": family, "mask": mask})
    return cells, skipped


def cell_key(cell: dict) -> tuple:
    """What identifies a cell across reports: (dtype, query chunk, key chunk, length, family, mask)."""
    return tuple(cell[k] for k in ("dtype", "query_chunk", "key_chunk", "length", "family", "mask"))


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _context(target: TargetSpec, sett: Settings) -> dict:
    """Everything besides the cell key that changes a cell's figures (part of its id)."""
    return {"schema_version": SCHEMA_VERSION, "target": asdict(target), "seeds": sett.seeds, "seed": sett.seed,
            "batch": sett.batch, "heads": sett.heads, "head_dim": sett.head_dim, "mp_max_len": sett.mp_max_len,
            "timeout": sett.timeout}


def cell_id(context: dict, cell: dict) -> str:
    """The cell's file name stem under ``OUT/cells``."""
    return _digest({"context": context, "cell": [cell[k] for k in sorted(cell)]})[:20]


def data_seed(base: int, dtype: str, length: int, family: str, mask: str, index: int) -> int:
    """The numpy seed of a cell's ``index``-th case: independent of chunk sizes and target."""
    return int(_digest([base, dtype, length, family, mask, index])[:8], 16)


# --- figures --------------------------------------------------------------------------------------


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: object) -> np.ndarray:
    """How many ``dtype`` values lie between ``a`` and ``b`` (float64 arrays holding values of the dtype).

    From the bit patterns (sign and magnitude): values of one sign are |difference of magnitudes| apart,
    values of opposite signs the sum of their magnitudes (so +0 and -0 coincide). Exact, as uint64.
    """
    dt = spec.as_dtype(dtype)
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
    top = np.uint64(dt.itemsize * 8 - 1)

    def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bits = np.asarray(x, dtype=np.float64).astype(dt).view(uint).astype(np.uint64)
        return bits >> top, bits & ((np.uint64(1) << top) - np.uint64(1))

    (sa, ma), (sb, mb) = split(a), split(b)
    return np.where(sa == sb, np.maximum(ma, mb) - np.minimum(ma, mb), ma + mb)


def _errors(got: np.ndarray, exact: np.ndarray, scale: np.ndarray, dtype: str) -> tuple[np.ndarray, dict]:
    """Normalised errors of the finite elements and the figures of one output of one seed."""
    got = np.asarray(got).astype(np.float64)
    finite = np.isfinite(exact)
    ok = finite & np.isfinite(got)
    err = np.abs(got - exact)[ok]
    big = np.maximum(scale, np.where(finite, np.abs(exact), 0.0))  # = scale, but for "uniform" masked rows
    denom = np.maximum(spec.unit_roundoff(dtype) * big, float(spec.finfo(dtype).smallest_subnormal))[ok]
    norm = err / denom
    rounded = naive.round_to_dtype(exact[ok], dtype)
    inside = np.isfinite(rounded)  # an exact value past the dtype's max has no ulp distance
    ulps = ulp_distance(naive.round_to_dtype(got[ok][inside], dtype), rounded[inside], dtype)
    return norm, {
        "max_norm": float(norm.max()) if norm.size else None,
        "median_norm": float(np.median(norm)) if norm.size else None,
        "max_abs": float(err.max()) if err.size else None,
        "max_ulp": int(ulps.max()) if ulps.size else None,
        "nonfinite": int((finite & ~np.isfinite(got)).sum()),
        "n": int(ok.sum()),
    }


@dataclass
class _Reference:
    """One case's exact values, absolute-value scales and same-dtype naive values, per output."""

    exact: dict[str, np.ndarray]
    scale: dict[str, np.ndarray]
    naive: dict[str, np.ndarray]
    name: str  # "mp" or "naive64"
    naive64_vs_mp: dict[str, float] | None
    seconds: float


def _probs64(case: Case, masked_rows: str) -> np.ndarray:
    """Float64 softmax probabilities [B, Hq, Lq, Lk] (0 on masked rows): the scales' weights without mp."""
    att = spec.normalize(case.q, case.k, case.v, masked_rows=masked_rows, **case.semantics())
    q = spec.to_heads_first(att.q.astype(np.float64))
    k = spec.to_heads_first(att.k.astype(np.float64))[:, att.kv_head]
    s = att.scale_float() * (q @ np.swapaxes(k, -1, -2))
    if att.bias is not None:
        s = s + np.where(att.visible, att.bias.astype(np.float64), 0.0)
    s = np.where(att.visible, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    total = e.sum(-1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


def _outputs(res: object, grad: bool) -> dict[str, np.ndarray]:
    names = ("out", "dq", "dk", "dv", "dbias") if grad else ("out",)
    return {n: getattr(res, n) for n in names if getattr(res, n, None) is not None}


def _reference(case: Case, info: TargetInfo, grad: bool, mp_max_len: int) -> _Reference:
    """Exact values from mp (short sequences, or naive64 unreliable) or naive64, plus scales and naive."""
    t0 = time.perf_counter()
    kw = dict(case.semantics(), masked_rows=info.masked_rows)
    args = (case.q, case.k, case.v, case.g) if grad else (case.q, case.k, case.v)
    fn = naive.attention_vjp if grad else naive.attention
    r64 = fn(*args, **kw)
    length = max(case.dims["Lq"], case.dims["Lk"])
    if length > mp_max_len and r64.reliable.all():
        name, exact, p, vs_mp = "naive64", _outputs(r64, grad), _probs64(case, info.masked_rows), None
    else:
        ex = checks.exact(case, info.masked_rows, grad)
        name, exact, p = "mp", {"out": ex.out, **(ex.grads or {})}, ex.p
    allow = tolerance.bound(case, info.contract, p, info.masked_rows)
    scale = {"out": allow.scale_out, **allow.grad_scales}
    if name == "mp":
        with np.errstate(divide="ignore", invalid="ignore"):
            vs_mp = {n: float(np.nanmax(np.where(scale[n] > 0, np.abs(a - exact[n]) / scale[n], 0.0), initial=0.0))
                     for n, a in _outputs(r64, grad).items()}
    c = info.contract
    same = fn(*args, **kw, dtype=case.dtype, accumulate=c.accumulate, round_logits=c.round_logits,
              round_probs=c.round_probs)
    return _Reference(exact, scale, _outputs(same, grad), name, vs_mp, time.perf_counter() - t0)


def _case_digest(case: Case) -> str:
    h = hashlib.sha256()
    for arr in (case.q, case.k, case.v, case.g, case.mask, case.bias):
        h.update(b"-" if arr is None else np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode())
    h.update(str(case.causal).encode())
    return h.hexdigest()


def _run_target(adapter: Adapter, case: Case, grad: bool, timeout: float) -> dict[str, np.ndarray]:
    """The target's output (and gradients); raises on a crash, timeout or missing/misshapen result."""
    got = {"out": checks.call_with_timeout(lambda: adapter.forward(case), timeout)}
    if grad:
        got.update(checks.call_with_timeout(lambda: adapter.vjp(case), timeout))
    return got


def _seed_figures(adapter: Adapter, case: Case, ref: _Reference, grad: bool, timeout: float,
                  pooled: dict[str, list]) -> dict:
    """One seed's figures per output (or its error), adding normalised errors to ``pooled``."""
    try:
        got = _run_target(adapter, case, grad, timeout)
    except Exception as exc:  # noqa: BLE001 - a target's failure is a figure of the report
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    outputs, norms = {}, {}
    for name, exact in ref.exact.items():
        arr = got.get(name)
        if not isinstance(arr, np.ndarray) or arr.shape != exact.shape:
            return {"error": f"{name}: got {getattr(arr, 'shape', type(arr).__name__)}, expected {exact.shape}"}
        norms[name], outputs[name] = _errors(arr, exact, ref.scale[name], case.dtype)
        naive_norm, _ = _errors(ref.naive[name], exact, ref.scale[name], case.dtype)
        outputs[name]["naive_max_norm"] = float(naive_norm.max()) if naive_norm.size else None
    for name, norm in norms.items():
        pooled[name].append(norm)
    return {"outputs": outputs}


def _aggregate(seeds: list[dict], pooled: dict[str, list]) -> dict:
    """Cell figures per output: max over seeds, median over all elements, sums of counts, ratio."""
    out = {}
    for name, norms in pooled.items():
        figs = [s["outputs"][name] for s in seeds if "outputs" in s]
        allnorm = np.concatenate(norms)

        def top(key: str, figs: list = figs) -> float | None:
            vals = [f[key] for f in figs if f[key] is not None]
            return max(vals) if vals else None

        agg = {"max_norm": top("max_norm"), "median_norm": float(np.median(allnorm)) if allnorm.size else None,
               "max_abs": top("max_abs"), "max_ulp": top("max_ulp"),
               "nonfinite": sum(f["nonfinite"] for f in figs), "n": sum(f["n"] for f in figs),
               "naive_max_norm": top("naive_max_norm")}
        agg["ratio"] = (agg["max_norm"] / agg["naive_max_norm"]
                        if agg["max_norm"] is not None and agg["naive_max_norm"] else None)
        out[name] = agg
    return out


@dataclass(frozen=True)
class _Task:
    """A group of cells sharing dtype, L, family and mask kind: one unit of work for a worker."""

    target: TargetSpec
    context: dict
    settings: Settings
    cells: tuple[dict, ...]


_ADAPTERS: dict[TargetSpec, Adapter] = {}


def _adapter(target: TargetSpec) -> Adapter:
    """The target's adapter, loaded once per process."""
    if target not in _ADAPTERS:
        _ADAPTERS[target] = target.load()
    return _ADAPTERS[target]


def run_group(task: _Task) -> list[dict]:
    """Compute a group's cells (runs in a worker): figures per seed and aggregated, with timings."""
    adapter = _adapter(task.target)
    info, sett = adapter.info, task.settings
    grad = "grad" in info.features
    refs: dict[str, _Reference] = {}
    done = []
    for cell in task.cells:
        seeds, pooled = [], defaultdict(list)
        t_ref = t_target = 0.0
        for index in range(sett.seeds):
            dseed = data_seed(sett.seed, cell["dtype"], cell["length"], cell["family"], cell["mask"], index)
            case = make_case(dseed, cell["dtype"], dims=sett.dims(cell["length"]), family=cell["family"],
                             mask_kind=cell["mask"], query_chunk_size=cell["query_chunk"],
                             key_chunk_size=cell["key_chunk"], features=info.features, grad=grad)
            digest = _case_digest(case)
            if digest not in refs:
                refs[digest] = _reference(case, info, grad, sett.mp_max_len)
                t_ref += refs[digest].seconds
            ref = refs[digest]
            t0 = time.perf_counter()
            figs = _seed_figures(adapter, case, ref, grad, sett.timeout, pooled)
            t_target += time.perf_counter() - t0
            seeds.append({"index": index, "data_seed": dseed, "reference": ref.name,
                          "naive64_vs_mp": ref.naive64_vs_mp, **figs})
        names = {s["reference"] for s in seeds}
        done.append({**cell, "id": cell_id(task.context, cell),
                     "reference": names.pop() if len(names) == 1 else "mixed",
                     "errors": sum("error" in s for s in seeds), "outputs": _aggregate(seeds, pooled),
                     "seeds": seeds, "seconds": {"reference": t_ref, "target": t_target}})
    return done


# --- running the sweep ----------------------------------------------------------------------------


def target_info(target: TargetSpec) -> TargetInfo:
    """The target's declarations, loading it (run where the groups run, so this process needs no framework)."""
    return _adapter(target).info


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class _Runner:
    """Where groups run: this process (``workers == 1``), spawned local processes, or a Dask cluster."""

    def __init__(self, target: TargetSpec, workers: int, scheduler: str | None) -> None:
        self.target = target
        self.pool: ProcessPoolExecutor | None = None
        self.client = None
        self.where = f"{workers} local processes" if workers > 1 else "in-process"
        if scheduler:
            from distributed import Client

            self.where = f"dask {scheduler}"
            try:
                self.client = Client(scheduler)
            except OSError as exc:
                raise ValueError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from exc
            self._info = self.client.submit(target_info, target, pure=False)
        elif workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            saved = {var: os.environ.get(var) for var in _THREAD_VARS}
            os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))  # one thread per worker, read at its start
            try:  # each submit spawns a worker while none is idle: all load the target at once
                self._info = [self.pool.submit(target_info, target) for _ in range(workers)][0]
            finally:
                for var, value in saved.items():
                    if value is None:
                        os.environ.pop(var)
                    else:
                        os.environ[var] = value

    def info(self) -> TargetInfo:
        return target_info(self.target) if self.pool is None and self.client is None else self._info.result()

    def results(self, tasks: list[_Task]) -> Iterator[list[dict]]:
        """Each group's cells, in the order they finish."""
        if self.client is not None:
            from distributed import as_completed as dask_completed

            futures = [self.client.submit(run_group, t, pure=False) for t in tasks]
            try:
                for fut in dask_completed(futures):
                    yield fut.result()
            finally:
                self.client.cancel(futures)
        elif self.pool is not None:
            for fut in as_completed([self.pool.submit(run_group, t) for t in tasks]):
                yield fut.result()
        else:
            for task in tasks:
                yield run_group(task)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            self.client.close()


def _compact(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=False, separators=(",", ":"))


def _write_text(path: Path, text: str) -> None:
    """Write atomically, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report_json(report: dict) -> str:
    """report.json's text: the header indented, then one line per cell (small, and diffs line by cell)."""
    head = json.dumps({k: v for k, v in report.items() if k != "cells"}, indent=1, sort_keys=True, allow_nan=False)
    cells = ",\n".join(_compact(c) for c in report["cells"])
    return f'{head[:-2]},\n "cells": [\n{cells}\n ]\n}}\n'


def _load_cell(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sweep(target: TargetSpec, sett: Settings, out: Path, *, workers: int = 2, scheduler: str | None = None,
          fresh: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a sweep into ``out/cells`` and return the assembled report (not yet written)."""
    sett.validate()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    runner = _Runner(target, workers, scheduler)
    try:
        return _sweep(target, sett, out, t0, runner, fresh, progress)
    finally:
        runner.close()


def _sweep(target: TargetSpec, sett: Settings, out: Path, t0: float, runner: _Runner, fresh: bool,
           progress: bool) -> dict:
    from tqdm import tqdm

    info = runner.info()
    cells, skipped = plan(info, sett)
    if not cells:
        raise ValueError(f"nothing to run: {target.name} declares none of dtypes {list(sett.dtypes)}")
    context = _context(target, sett)
    cell_dir = out / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for cell in cells:
        cid = cell_id(context, cell)
        old = None if fresh else _load_cell(cell_dir / f"{cid}.json")
        if old is not None and old.get("id") == cid:
            results[cid] = old
    reused = len(results)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        if cell_id(context, cell) not in results:
            groups[(cell["dtype"], cell["length"], cell["family"], cell["mask"])].append(cell)
    tasks = sorted((_Task(target, context, sett, tuple(g)) for g in groups.values()),
                   key=lambda t: -t.cells[0]["length"] ** 2 * len(t.cells))
    stream = runner.results(tasks)
    with tqdm(total=len(cells), initial=reused, unit="cell", desc=f"report {info.name}", file=sys.stderr,
              disable=not progress) as bar:
        for done in stream:
            for cell in done:
                _write_text(cell_dir / f"{cell['id']}.json", _compact(cell) + "\n")
                results[cell["id"]] = cell
            bar.update(len(done))
    wall = time.perf_counter() - t0
    ordered = [results[cell_id(context, c)] for c in cells]
    computed = len(cells) - reused
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "attnverify-accuracy-report",
        "target": {"name": info.name, "framework": info.framework, "device": info.device,
                   "dtypes": list(info.dtypes), "features": sorted(info.features),
                   "unexercised": info.unexercised(), "masked_rows": info.masked_rows,
                   "contract": asdict(info.contract), "description": info.description, "notes": info.notes,
                   "load": asdict(target)},
        "settings": {**asdict(sett), "skipped": skipped,
                     "units": "normalised errors are |got - exact| / (u·A): u the dtype's unit roundoff, A the "
                              "absolute-value scale of the output or gradient element"},
        "run": {"computed": computed, "reused": reused, "seconds": wall,
                "cells_per_second": computed / wall if computed and wall > 0 else None,
                "workers": runner.where},
        "naive64_vs_mp": _naive_sample(ordered),
        "cells": ordered,
    }


def _naive_sample(cells: list[dict]) -> dict:
    """The float64 naive reference's worst error against mp, in units of A, over every mp seed."""
    worst: dict[str, float] = {}
    count = 0
    for cell in cells:
        for s in cell["seeds"]:
            if s["naive64_vs_mp"] is not None:
                count += 1
                for name, x in s["naive64_vs_mp"].items():
                    worst[name] = max(worst.get(name, 0.0), x)
    return {"cases": count, "max_error_in_A": worst,
            "note": "max |naive64 - mp| / A per output over the seeds where mp was the reference"}


# --- the gate -------------------------------------------------------------------------------------


def gate(report: dict, baseline: dict, max_regression: float = DEFAULT_MAX_REGRESSION) -> dict:
    """Cells whose error grew more than ``max_regression`` times against ``baseline`` (see the module doc)."""
    if baseline.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"baseline has schema version {baseline.get('schema_version')!r}, "
                         f"this attnverify writes {SCHEMA_VERSION}")
    old = {cell_key(c): c for c in baseline["cells"]}
    new = {cell_key(c): c for c in report["cells"]}
    regressions = []
    for key, cell in new.items():
        if key not in old:
            continue
        base = old[key]
        row = dict(zip(("dtype", "query_chunk", "key_chunk", "length", "family", "mask"), key, strict=True))
        if cell["errors"] > base["errors"]:
            regressions.append({**row, "output": "-", "what": "errors", "old": base["errors"],
                                "new": cell["errors"], "factor": None})
        for name, figs in cell["outputs"].items():
            was = base["outputs"].get(name)
            if was is None:
                continue
            if figs["nonfinite"] > was["nonfinite"]:
                regressions.append({**row, "output": name, "what": "nonfinite", "old": was["nonfinite"],
                                    "new": figs["nonfinite"], "factor": None})
            if figs["max_norm"] is None or was["max_norm"] is None:
                continue
            factor = max(figs["max_norm"], FLOOR) / max(was["max_norm"], FLOOR)
            if factor > max_regression:
                regressions.append({**row, "output": name, "what": "max_norm", "old": was["max_norm"],
                                    "new": figs["max_norm"], "factor": factor})
    return {"max_regression": max_regression, "floor": FLOOR, "compared": len(new.keys() & old.keys()),
            "only_new": len(new.keys() - old.keys()), "only_baseline": len(old.keys() - new.keys()),
            "regressions": regressions}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _chunk(c: int | None) -> str:
    return "-" if c is None else str(c)


def regression_lines(result: dict) -> list[str]:
    """One line per regressed cell, for the terminal and report.md."""
    lines = []
    for r in result["regressions"]:
        where = (f"{r['dtype']} q={_chunk(r['query_chunk'])} k={_chunk(r['key_chunk'])} L={r['length']} "
                 f"{r['family']} mask={r['mask']} {r['output']}")
        if r["what"] == "max_norm":
            lines.append(f"{where}: max error {_fmt(r['old'])} -> {_fmt(r['new'])} u·A ({r['factor']:.3g}x)")
        else:
            lines.append(f"{where}: {r['what']} {r['old']} -> {r['new']}")
    return lines


# --- tables, plots, html --------------------------------------------------------------------------


def _worst(cells: list[dict], grads: bool) -> float | None:
    vals = [f["max_norm"] for c in cells for n, f in c["outputs"].items()
            if (n in _GRADS) == grads and f["max_norm"] is not None]
    return max(vals) if vals else None


def _entry(cells: list[dict]) -> str:
    if not cells:
        return "·"
    text = _fmt(_worst(cells, False))
    if any(n in _GRADS for c in cells for n in c["outputs"]):
        text += " / " + _fmt(_worst(cells, True))
    nonfinite = sum(f["nonfinite"] for c in cells for f in c["outputs"].values())
    errors = sum(c["errors"] for c in cells)
    return text + (f" ({nonfinite} non-finite)" if nonfinite else "") + (f" ({errors} errors)" if errors else "")


def _sort_chunk(c: int | None) -> int:
    return -1 if c is None else c


def tables(report: dict) -> list[dict]:
    """The report's tables as data (title, header, rows, notes), rendered to markdown and HTML alike."""
    cells = report["cells"]
    out = []
    for dtype in dict.fromkeys(c["dtype"] for c in cells):
        mine = [c for c in cells if c["dtype"] == dtype]
        lengths = sorted({c["length"] for c in mine})
        rows_keys = sorted({(c["query_chunk"], c["key_chunk"]) for c in mine},
                           key=lambda k: (_sort_chunk(k[0]), _sort_chunk(k[1])))
        header = ["q chunk", "k chunk"]
        for length in lengths:
            refs = {c["reference"] for c in mine if c["length"] == length}
            header.append(f"L={length} ({refs.pop() if len(refs) == 1 else 'mixed'})")
        rows = [[_chunk(qc), _chunk(kc)] + [_entry([c for c in mine if (c["query_chunk"], c["key_chunk"]) == (qc, kc)
                                                    and c["length"] == length]) for length in lengths]
                for qc, kc in rows_keys]
        ratios = {g: [f["ratio"] for c in mine for n, f in c["outputs"].items()
                      if (n in _GRADS) == g and f["ratio"] is not None] for g in (False, True)}
        notes = [f"u = 2^{round(math.log2(spec.unit_roundoff(dtype)))}; worst ratio to the same-dtype naive "
                 f"reference: output {_fmt(max(ratios[False], default=None))}, gradients "
                 f"{_fmt(max(ratios[True], default=None))}"]
        failed = [s["error"] for c in mine for s in c["seeds"] if "error" in s]
        if failed:
            notes.append(f"{len(failed)} target call(s) failed, first: {failed[0]}")
        out.append({"title": dtype, "header": header, "rows": rows, "notes": notes})
    families = list(dict.fromkeys(c["family"] for c in cells))
    rows = [[dtype] + [_entry([c for c in cells if c["dtype"] == dtype and c["family"] == f]) for f in families]
            for dtype in dict.fromkeys(c["dtype"] for c in cells)]
    out.append({"title": "by value family", "header": ["dtype", *families], "rows": rows,
                "notes": ["worst over chunk sizes, lengths and masks"]})
    return out


def _join(xs: list) -> str:
    return ",".join(str(x) for x in xs)


def _intro(report: dict) -> list[str]:
    t, s = report["target"], report["settings"]
    c = t["contract"]
    sample = report["naive64_vs_mp"]
    worst = max(sample["max_error_in_A"].values(), default=None)
    skipped = s["skipped"]
    lines = [
        f"target **{t['name']}** ({t['framework']}/{t['device']}): {t['description']}",
        f"contract: accumulate={c['accumulate']}, round_logits={c['round_logits']}, "
        f"round_probs={c['round_probs']}; masked rows: {t['masked_rows']}; "
        f"not exercised: {', '.join(t['unexercised']) or 'nothing'}",
        f"sweep: {len(report['cells'])} cells × {s['seeds']} seed(s); lengths {_join(s['lengths'])}; query chunks "
        f"{_join(s['query_chunks'])}; key chunks {_join(s['key_chunks'])}; families {_join(s['families'])}; "
        f"masks {_join(s['masks'])}; B={s['batch']} H={s['heads']} D={s['head_dim']}",
        "entries: max |got − exact| / (u·A), output / gradients (dq, dk, dv), worst over families and masks; "
        "A is the element's absolute-value scale (Σ p|v| for the output)",
        f"reference: column headers say which (mp: exact oracle, used for L ≤ {s['mp_max_len']}; naive64: float64 "
        f"naive reference); naive64 against mp on {sample['cases']} cases: max error {_fmt(worst)}·A",
    ]
    left_out = [f"dtypes {_join(skipped['dtypes'])}" if skipped["dtypes"] else "",
                f"masks {_join(skipped['masks'])}" if skipped["masks"] else "",
                "; ".join(skipped["chunks"])]
    if any(left_out):
        lines.append("not run (undeclared or too many chunks): " + "; ".join(x for x in left_out if x))
    return lines


def to_markdown(report: dict) -> str:
    """report.md: a short intro, a table per dtype, the family table, the gate's verdict."""
    lines = [f"# Accuracy report: {report['target']['name']}", ""]
    lines += [f"- {x}" for x in _intro(report)] + [""]
    for tab in tables(report):
        lines += [f"## {tab['title']}", "", "| " + " | ".join(tab["header"]) + " |",
                  "|" + " --- |" * len(tab["header"])]
        lines += ["| " + " | ".join(r) + " |" for r in tab["rows"]]
        lines += [""] + [f"{n}" for n in tab["notes"]] + [""]
    if "gate" in report:
        g = report["gate"]
        verdict = f"FAIL: {len(g['regressions'])} regression(s)" if g["regressions"] else "pass"
        lines += ["## Baseline gate", "", f"{verdict} (max regression {g['max_regression']}×, floor {g['floor']} "
                  f"u·A, {g['compared']} cells compared, {g['only_new']} new, {g['only_baseline']} only in baseline)",
                  ""] + [f"- {x}" for x in regression_lines(g)] + [""]
    lines += ["## Plots", ""] + [f"![{caption}]({name})" for name, caption in PLOTS.items()] + [""]
    return "\n".join(lines)


def to_html(report: dict) -> str:
    """index.html: the same tables and the plots, plain HTML without external assets."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report['target']['name'])} accuracy"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
             "margin:8px 0}td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}img{max-width:100%}</style>"
             f"</head><body><h1>Accuracy report: {e(report['target']['name'])}</h1><ul>"]
    parts += [f"<li>{e(x.replace('**', ''))}</li>" for x in _intro(report)] + ["</ul>"]
    if "gate" in report:
        g = report["gate"]
        parts.append(f"<h2>Baseline gate: {'FAIL' if g['regressions'] else 'pass'}</h2><ul>")
        parts += [f"<li>{e(x)}</li>" for x in regression_lines(g)] + ["</ul>"]
    for tab in tables(report):
        parts.append(f"<h2>{e(tab['title'])}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in tab["header"])
                     + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in tab["rows"]]
        parts.append("</table>" + "".join(f"<p>{e(n)}</p>" for n in tab["notes"]))
    for name, caption in PLOTS.items():
        parts.append(f"<h2>{e(caption)}</h2><img src='{name}' alt='{e(caption)}'>")
    return "".join(parts) + "</body></html>\n"


def plot(report: dict, out: Path) -> None:
    """The three PNGs of ``PLOTS`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    dtypes = list(dict.fromkeys(c["dtype"] for c in cells))
    lengths = sorted({c["length"] for c in cells})

    def worst(sel: list[dict], grads: bool) -> float:
        w = _worst(sel, grads)
        return np.nan if w is None else max(w, _PLOT_FLOOR)

    def log_y(ax: plt.Axes) -> None:
        """Log scale where something was plotted; a note where every call failed."""
        if any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no results (errors)", ha="center", va="center", transform=ax.transAxes)

    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.5 * len(dtypes), 3.6), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        kcs = sorted({c["key_chunk"] for c in cells if c["dtype"] == dtype}, key=_sort_chunk)
        for i, length in enumerate(lengths):
            sel = {x: [c for c in cells if c["dtype"] == dtype and c["length"] == length and c["key_chunk"] == kc]
                   for x, kc in enumerate(kcs)}
            sel = {x: s for x, s in sel.items() if s}  # this length's own key chunks, joined by lines
            ax.plot(list(sel), [worst(s, False) for s in sel.values()], "o-", color=f"C{i}", label=f"L={length}")
            ax.plot(list(sel), [worst(s, True) for s in sel.values()], "s--", color=f"C{i}")
        ax.set_xticks(range(len(kcs)), [_chunk(k) for k in kcs])
        log_y(ax)
        ax.set_title(dtype)
        ax.set_xlabel("key chunk")
        ax.set_ylabel("max error / (u·A)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "error_vs_key_chunk.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.5 * len(dtypes), 3.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        length = max(c["length"] for c in cells if c["dtype"] == dtype)
        mine = [c for c in cells if c["dtype"] == dtype and c["length"] == length]
        qcs = sorted({c["query_chunk"] for c in mine}, key=_sort_chunk)
        kcs = sorted({c["key_chunk"] for c in mine}, key=_sort_chunk)
        grid = np.full((len(qcs), len(kcs)), np.nan)
        for i, qc in enumerate(qcs):
            for j, kc in enumerate(kcs):
                sel = [c for c in mine if c["query_chunk"] == qc and c["key_chunk"] == kc]
                if sel:
                    grid[i, j] = worst(sel, False)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), val in np.ndenumerate(grid):
            ax.text(j, i, _fmt(None if np.isnan(val) else float(val)), ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
        ax.set_xticks(range(len(kcs)), [_chunk(k) for k in kcs])
        ax.set_yticks(range(len(qcs)), [_chunk(q) for q in qcs])
        ax.set_xlabel("key chunk")
        ax.set_ylabel("query chunk")
        ax.set_title(f"{dtype}, L={length}, output")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "heatmap_chunks.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, dtype in enumerate(dtypes):
        sel = [[c for c in cells if c["dtype"] == dtype and c["length"] == length] for length in lengths]
        ax.plot(lengths, [worst(s, False) if s else np.nan for s in sel], "o-", color=f"C{i}", label=f"{dtype} out")
        ax.plot(lengths, [worst(s, True) if s else np.nan for s in sel], "s--", color=f"C{i}", label=f"{dtype} grads")
    ax.set_xscale("log", base=2)
    log_y(ax)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("max error / (u·A)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "error_vs_length.png", dpi=90)
    plt.close(fig)


def write(report: dict, out: Path) -> None:
    """report.json, report.md, the PNGs and index.html into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "report.json", report_json(report))
    (out / "report.md").write_text(to_markdown(report))
    plot(report, out)
    (out / "index.html").write_text(to_html(report))


# --- command line ---------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``attnverify report`` with its flags to the CLI's subparsers."""
    from verify.cli import _csv, _target_args

    p = subparsers.add_parser("report", help="accuracy sweep: tables, plots, baseline gate")
    _target_args(p)
    p.add_argument("--out", required=True, help="output directory (cells/ inside makes reruns resume)")
    p.add_argument("--dtypes", type=_csv, default=list(DEFAULTS["dtypes"]))
    p.add_argument("--lengths", type=_ints, default=list(DEFAULTS["lengths"]), help="Lq = Lk values")
    p.add_argument("--query-chunks", type=_csv, default=list(DEFAULTS["query_chunks"]), help="numbers or L")
    p.add_argument("--key-chunks", type=_csv, default=list(DEFAULTS["key_chunks"]), help="numbers or L")
    p.add_argument("--families", type=_csv, default=list(DEFAULTS["families"]))
    p.add_argument("--masks", type=_csv, default=list(DEFAULTS["masks"]), help="mask kinds")
    p.add_argument("--seeds", type=int, default=2, help="cases per cell")
    p.add_argument("--seed", type=int, default=0, help="base seed of the inputs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--mp-max-len", type=int, default=64, help="exact mp oracle up to this L, naive float64 above")
    p.add_argument("--max-chunks", type=int, default=16, help="skip chunk sizes splitting L into more chunks")
    p.add_argument("--timeout", type=float, default=checks.DEFAULT_TIMEOUT, help="seconds per target call")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (1: in this process)")
    p.add_argument("--scheduler", help="Dask distributed scheduler address: run the sweep on that cluster")
    p.add_argument("--fresh", action="store_true", help="recompute every cell, ignoring OUT/cells")
    p.add_argument("--baseline", help="a previous report.json: exit 1 on cells whose error grew")
    p.add_argument("--max-regression", type=float, default=DEFAULT_MAX_REGRESSION,
                   help="allowed growth factor of a cell's max error against the baseline")
    return p


def target_spec(args: argparse.Namespace) -> TargetSpec:
    """The TargetSpec the CLI's target flags describe."""
    contract = None
    if args.accumulate or args.round_logits or args.no_round_probs:
        contract = (args.accumulate or "fp32", bool(args.round_logits), not args.no_round_probs)
    return TargetSpec(args.target, args.framework, None if args.features is None else tuple(args.features),
                      args.masked_rows, None if args.target_dtypes is None else tuple(args.target_dtypes), contract)


def run(args: argparse.Namespace) -> int:
    """``attnverify report``: sweep, write the outputs, gate against a baseline; returns the exit status."""
    sett = Settings(dtypes=tuple(args.dtypes), lengths=tuple(args.lengths), query_chunks=tuple(args.query_chunks),
                    key_chunks=tuple(args.key_chunks), families=tuple(args.families), masks=tuple(args.masks),
                    seeds=args.seeds, seed=args.seed, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                    mp_max_len=args.mp_max_len, max_chunks=args.max_chunks, timeout=args.timeout)
    baseline = None
    if args.baseline:
        try:
            baseline = json.loads(Path(args.baseline).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read baseline {args.baseline}: {exc}") from exc
    out = Path(args.out)
    try:
        report = sweep(target_spec(args), sett, out, workers=args.workers, scheduler=args.scheduler,
                       fresh=args.fresh)
    except KeyboardInterrupt:
        n = len(list((out / "cells").glob("*.json")))
        print(f"interrupted: {n} finished cells are in {out / 'cells'}; run the same command to resume",
              file=sys.stderr)
        return 130
    if baseline is not None:
        report["gate"] = {"baseline": str(args.baseline), **gate(report, baseline, args.max_regression)}
    write(report, out)
    r = report["run"]
    print(f"report {report['target']['name']}: {len(report['cells'])} cells ({r['computed']} computed, "
          f"{r['reused']} reused) in {r['seconds']:.1f} s -> {out / 'report.md'}, {out / 'index.html'}")
    if baseline is None:
        return 0
    g = report["gate"]
    if not g["regressions"]:
        print(f"baseline gate: pass ({g['compared']} cells compared, max regression {g['max_regression']}x)")
        return 0
    print(f"baseline gate: FAIL, {len(g['regressions'])} regression(s) beyond {g['max_regression']}x "
          f"({g['compared']} cells compared):")
    for line in regression_lines(g):
        print("  " + line)
    return 1
