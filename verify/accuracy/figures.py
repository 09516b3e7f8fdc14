"""The figures of one cell: measured error per output, from the same comparison the fuzz checks use.

For each seed the case's exact values and allowance come from ``verify.truth.decide`` (mp up to
``mp_max_len``, above it the float64 naive reference where it is certified, else mp) and the
comparison from ``verify.checks.compare``. Per output
(``out``, ``dq``, ``dk``, ``dv``, ``dbias``), over elements whose exact value and result are finite:

- ``max_allow``: the worst error in allowances, ``|got - exact| / allowance`` -- what a fuzz check
  calls a finding when it exceeds 1 (``pass`` is ``max_allow <= 1`` with nothing non-finite);
- ``max_norm`` / ``median_norm``: the error in units of ``u·A`` (u the dtype's unit roundoff, A the
  element's absolute-value scale; ``max(A, |exact|)`` in fact, which is A except for the mean of all
  values that the ``uniform`` policy gives a fully masked row; at least the smallest subnormal);
- ``naive_max_norm`` / ``naive_max_allow``: the same for a plain same-dtype implementation under the
  target's contract (``oracles.naive``), and ``ratio = max_norm / naive_max_norm``: the FlashAttention
  rule's quantity, flat for a correct kernel, growing with chunk count for one that accumulates badly;
- ``max_abs``; ``max_ulp``: dtype values between the result and the exact value rounded to the dtype;
  ``nonfinite``: inf/NaN results where the exact value is finite.

A target call that raises or runs past the timeout is recorded as the seed's ``error``. Each seed also
records ``data_seed`` and ``inputs``, a digest of its arrays (the same for every chunk size, softcap and window).
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from oracles import naive, spec
from verify import checks, policies, tolerance
from verify.accuracy.plan import Settings, cell_id, data_seed
from verify.case import Case
from verify.execution import InProcess
from verify.reference import Exact
from verify.strategies import make_case
from verify.targets import Adapter, TargetInfo, TargetSpec
from verify.truth import decide

OUTPUTS = ("out", "dq", "dk", "dv", "dbias")


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


def _norms(cmp: checks.Comparison, scale: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(normalised errors |got - exact| / (u·A) of the finite elements, their mask)."""
    finite = np.isfinite(cmp.want)
    ok = finite & np.isfinite(cmp.got)
    big = np.maximum(scale, np.where(finite, np.abs(cmp.want), 0.0))
    denom = np.maximum(spec.unit_roundoff(dtype) * big, float(spec.finfo(dtype).smallest_subnormal))
    return cmp.err[ok] / denom[ok], ok


def output_figures(cmp: checks.Comparison, plain: checks.Comparison, scale: np.ndarray, dtype: str) -> tuple[
        np.ndarray, dict]:
    """Normalised errors and the figures of one output of one seed (``plain``: the same-dtype naive's)."""
    norm, ok = _norms(cmp, scale, dtype)
    rounded = naive.round_to_dtype(cmp.want[ok], dtype)
    inside = np.isfinite(rounded)  # an exact value past the dtype's max has no ulp distance
    ulps = ulp_distance(naive.round_to_dtype(cmp.got[ok][inside], dtype), rounded[inside], dtype)
    plain_norm, _ = _norms(plain, scale, dtype)
    nonfinite = int((np.isfinite(cmp.want) & ~np.isfinite(cmp.got)).sum())
    return norm, {
        "max_allow": cmp.worst_ratio,
        "max_norm": float(norm.max()) if norm.size else None,
        "median_norm": float(np.median(norm)) if norm.size else None,
        "max_abs": float(cmp.err[ok].max()) if ok.any() else None,
        "max_ulp": int(ulps.max()) if ulps.size else None,
        "nonfinite": nonfinite,
        "n": int(ok.sum()),
        "naive_max_norm": float(plain_norm.max()) if plain_norm.size else None,
        "naive_max_allow": plain.worst_ratio,
    }


def inputs_digest(case: Case) -> str:
    """A short digest of the case's arrays alone (q, k, v, g, mask, bias): equal across the chunk sizes,
    softcaps and windows of a seed, so a report shows its rows compare the very same inputs."""
    h = hashlib.sha256()
    for arr in (case.q, case.k, case.v, case.g, case.mask, case.bias):
        h.update(b"-" if arr is None else f"{arr.dtype}{arr.shape}".encode() + np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


@dataclass
class _Truth:
    """One case's exact values, allowance and same-dtype naive values (shared by a group's chunk settings)."""

    exact: Exact
    allow: tolerance.Allowance
    plain: dict[str, np.ndarray]
    naive64_vs_mp: dict[str, float] | None
    seconds: float


def _outputs(res: object, names: tuple[str, ...] = OUTPUTS) -> dict[str, np.ndarray]:
    return {n: getattr(res, n) for n in names if getattr(res, n, None) is not None}


def _truth(case: Case, info: TargetInfo, grad: bool, mp_max_len: int) -> _Truth:
    t0 = time.perf_counter()
    decided = decide(case, info, grad, mp_max_len=mp_max_len)
    truth, allow = decided.exact, decided.allow
    kw = dict(case.semantics(), masked_rows=info.masked_rows)
    args = (case.q, case.k, case.v, case.g) if grad else (case.q, case.k, case.v)
    fn = naive.attention_vjp if grad else naive.attention
    vs_mp = None
    exact = {"out": truth.out, **(truth.grads or {})}
    scales = {"out": allow.scale_out, **allow.grad_scales}
    if truth.reference == "mp":  # how far float64 would have been: shows naive64 is an adequate stand-in
        with np.errstate(divide="ignore", invalid="ignore"):
            vs_mp = {n: float(np.nanmax(np.where(scales[n] > 0, np.abs(a - exact[n]) / scales[n], 0.0), initial=0.0))
                     for n, a in _outputs(fn(*args, **kw)).items()}
    c = info.contract
    with np.errstate(all="ignore"):
        same = fn(*args, **kw, dtype=case.dtype, accumulate=c.accumulate, round_logits=c.round_logits,
                  round_probs=c.round_probs)
    return _Truth(truth, allow, _outputs(same), vs_mp, time.perf_counter() - t0)


def _seed(executor: InProcess, case: Case, truth: _Truth, grad: bool, timeout: float,
          pooled: dict[str, list]) -> dict:
    """One seed's figures per output (or its error), adding normalised errors to ``pooled``."""
    calls = executor.run(case, ("forward", "grad") if grad else ("forward",), timeout)
    if calls.failures:
        name, failure = next(iter(calls.failures.items()))
        return {"error": f"{name}: {failure.describe()}"}
    got = {"out": calls.out, **(calls.grads or {})}
    ex, allow = truth.exact, truth.allow
    exact = {"out": ex.out, **(ex.grads or {})}
    allowed = {"out": allow.out, **allow.grads}
    scales = {"out": allow.scale_out, **allow.grad_scales}
    outputs = {}
    for name, want in exact.items():
        arr = got.get(name)
        if not isinstance(arr, np.ndarray) or arr.shape != want.shape:
            shape = list(arr.shape) if hasattr(arr, "shape") else type(arr).__name__
            return {"error": f"{name}: got shape {shape}, expected {list(want.shape)}"}
        cmp = checks.compare(name, arr, want, allowed[name], case.dtype)
        plain = checks.compare(name, truth.plain[name], want, allowed[name], case.dtype)
        norm, outputs[name] = output_figures(cmp, plain, scales[name], case.dtype)
        pooled[name].append(norm)
    return {"outputs": outputs}


def _aggregate(seeds: list[dict], pooled: dict[str, list]) -> dict:
    """Cell figures per output: max over seeds, median over all elements, sums of counts, ratio, pass."""
    out = {}
    for name, norms in pooled.items():
        figs = [s["outputs"][name] for s in seeds if "outputs" in s]
        allnorm = np.concatenate(norms)

        def top(key: str, figs: list = figs) -> float | None:
            vals = [f[key] for f in figs if f[key] is not None]
            return max(vals) if vals else None

        agg = {"max_allow": top("max_allow"), "max_norm": top("max_norm"),
               "median_norm": float(np.median(allnorm)) if allnorm.size else None,
               "max_abs": top("max_abs"), "max_ulp": top("max_ulp"),
               "nonfinite": sum(f["nonfinite"] for f in figs), "n": sum(f["n"] for f in figs),
               "naive_max_norm": top("naive_max_norm"), "naive_max_allow": top("naive_max_allow")}
        agg["ratio"] = (agg["max_norm"] / agg["naive_max_norm"]
                        if agg["max_norm"] is not None and agg["naive_max_norm"] else None)
        agg["pass"] = agg["nonfinite"] == 0 and (agg["max_allow"] is None or agg["max_allow"] <= 1.0)
        out[name] = agg
    return out


@dataclass(frozen=True)
class Task:
    """A group of cells sharing dtype, L, family, mask kind, softcap and window: one unit of work for a worker."""

    target: TargetSpec
    context: dict
    settings: Settings
    cells: tuple[dict, ...]


_ADAPTERS: dict[TargetSpec, Adapter] = {}


def adapter(target: TargetSpec) -> Adapter:
    """The target's adapter, loaded once per process."""
    if target not in _ADAPTERS:
        _ADAPTERS[target] = target.load()
    return _ADAPTERS[target]


def run_group(task: Task) -> list[dict]:
    """Compute a group's cells (runs in a worker): figures per seed and aggregated, with timings."""
    executor = InProcess(adapter(task.target))
    info, sett = executor.info, task.settings
    grad = "grad" in info.features
    truths: dict[str, _Truth] = {}
    done = []
    for cell in task.cells:
        seeds, pooled = [], defaultdict(list)
        t_ref = t_target = 0.0
        for index in range(sett.seeds):
            dseed = data_seed(sett.seed, cell["dtype"], cell["length"], cell["family"], cell["mask"], index)
            case = make_case(dseed, cell["dtype"], dims=sett.dims(cell["length"]), family=cell["family"],
                             mask_kind=cell["mask"], query_chunk_size=cell["query_chunk"],
                             key_chunk_size=cell["key_chunk"], features=info.features, grad=grad,
                             softcap=cell["softcap"], window=cell["window"])
            if policies.undefined_rows(case, info.masked_rows):  # no single right answer: not run, as in fuzz
                seeds.append({"index": index, "data_seed": dseed, "inputs": inputs_digest(case),
                              "declined": policies.UNDEFINED})
                continue
            digest = case.digest(chunks=False)
            if digest not in truths:
                truths[digest] = _truth(case, info, grad, sett.mp_max_len)
                t_ref += truths[digest].seconds
            truth = truths[digest]
            t0 = time.perf_counter()
            figs = _seed(executor, case, truth, grad, sett.timeout, pooled)
            t_target += time.perf_counter() - t0
            seeds.append({"index": index, "data_seed": dseed, "inputs": inputs_digest(case),
                          "reference": truth.exact.reference,
                          "naive64_vs_mp": truth.naive64_vs_mp, **figs})
        names = {s["reference"] for s in seeds if "reference" in s}
        declined = sum("declined" in s for s in seeds)
        done.append({**cell, "id": cell_id(task.context, cell),
                     "reference": names.pop() if len(names) == 1 else "mixed" if names else "none",
                     "errors": sum("error" in s for s in seeds), "outputs": _aggregate(seeds, pooled),
                     "seeds": seeds, "seconds": {"reference": t_ref, "target": t_target},
                     **({"declined": declined} if declined else {})})
    return done
