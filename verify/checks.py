"""Checks: run a target on a case, compare with the exact answer, and name what is wrong.

``run_case`` decides the exact values and the allowance (``verify.truth``: a certified float64 reference,
or the mp oracle; ``verify.tolerance``),
runs the target's passes through an executor (``verify.execution``) and returns findings in named
categories (``verify.findings.CATEGORIES``):

- ``forward`` / ``grad``: a finite value beyond its allowance;
- ``overflow`` (±inf) / ``nan``: non-finite where the exact value is finite (and the allowed
  range stays below the dtype's overflow threshold, where inf is a correct rounding);
- ``underflow``: the exact value is a normal number of the dtype near the bottom of its range
  (below ``tiny / u``), the target gives 0 or a subnormal, beyond the allowance;
- ``masked-row``: a fully masked row that breaks the declared policy (output, or ``dq``);
- ``shape`` / ``dtype``: wrong output shape or dtype; ``crash``: the target raised (or its
  process died); ``timeout``: a call ran past its limit. A failing pass ends the case: a crash is
  reported once per case, not once per check;
- ``nondeterministic`` (the ``determinism`` check): the same case run twice gave results that are
  not bitwise equal (races in split-K reductions and atomics show up this way); a target declared
  ``nondeterministic`` is only held to a run-to-run difference within the allowance.

``compare`` is the one comparison of a result array with its exact value: the fuzz checks build
findings from it and the accuracy report its per-cell figures. A target that declines a case
(``Unsupported``) gives no finding; campaigns count declines. Findings of a value or non-finite
kind say how a plain same-precision implementation (``oracles.naive`` in the target's dtype and
contract) does at the same element, so a reader tells a kernel defect from a limit of the precision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from oracles import naive, spec
from verify import policies, tolerance
from verify.case import Case
from verify.execution import REPEAT, Calls, InProcess
from verify.findings import Finding
from verify.reference import Exact
from verify.targets.base import Adapter, TargetInfo
from verify.truth import decide

CHECKS = ("forward", "grad", "determinism")
DEFAULT_TIMEOUT = 120.0  # seconds per target call


@dataclass
class Comparison:
    """One result array against its exact value and allowance (all float64, one shape)."""

    name: str
    got: np.ndarray
    want: np.ndarray
    allow: np.ndarray
    err: np.ndarray  # |got - want|
    checked: np.ndarray  # the exact value is a number within the dtype's range
    nonfinite: np.ndarray  # checked, finite exact value, got inf (not a correct rounding) or NaN
    beyond: np.ndarray  # checked, finite got, err > allow
    underflow: np.ndarray  # beyond, exact near the bottom of the normal range, got 0 or subnormal
    masked: np.ndarray  # elements of fully masked rows

    @property
    def worst_ratio(self) -> float | None:
        """max err / allow over checked finite results (None: no such element)."""
        ok = self.checked & np.isfinite(self.got) & (self.allow > 0)
        if not ok.any():
            return None
        return float((self.err[ok] / self.allow[ok]).max())


def compare(name: str, got: np.ndarray, want: np.ndarray, allow: np.ndarray, dtype: str,
            masked: np.ndarray | None = None) -> Comparison:
    """Compare ``got`` with ``want`` elementwise under ``allow`` in ``dtype`` (``masked``: rows under the policy)."""
    info = spec.finfo(dtype)
    got = np.asarray(got).astype(np.float64)
    masked = np.zeros(got.shape, bool) if masked is None else np.broadcast_to(masked, got.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        allow = np.where(np.isnan(allow), np.inf, allow)
        checked = ~np.isnan(want) & (np.abs(want) <= float(info.max))
        err = np.abs(got - want)
        # inf is the correct rounding of anything past max + ulp/2: a result allowed to reach that far
        # may round to inf, so only a result bounded below it is an overflow.
        may_round_to_inf = np.abs(want) + allow >= float(info.max) * (1 + spec.unit_roundoff(dtype))
        nonfinite = checked & np.isfinite(want) & (np.isnan(got) | (np.isinf(got) & ~may_round_to_inf))
        beyond = checked & np.isfinite(got) & (err > allow)
    tiny = float(info.tiny)
    near = (np.abs(want) >= tiny) & (np.abs(want) < tiny / spec.unit_roundoff(dtype))
    underflow = beyond & ~masked & near & (np.abs(got) < tiny)
    return Comparison(name, got, want, allow, err, checked, nonfinite, beyond, underflow, masked)


@dataclass
class Outcome:
    """Everything one case gave: findings, the worst error per output in allowances, timings."""

    findings: list[Finding] = field(default_factory=list)
    ratios: dict[str, float | None] = field(default_factory=dict)  # None: no finite result to compare
    seconds: dict[str, float] = field(default_factory=dict)
    declined: str | None = None  # why the target raised Unsupported for this case
    reference: str = ""  # which reference decided the exact values
    unconstrained_rows: int = 0  # rows whose logit error makes any answer acceptable (tolerance model)
    timed_out: bool = False  # a call ran past its limit


class _Findings:
    """Builds the findings of one case."""

    def __init__(self, info: TargetInfo, case: Case, truth: Exact, allow: tolerance.Allowance) -> None:
        self.info, self.case, self.truth, self.allow = info, case, truth, allow
        self.found: list[Finding] = []
        self._plain: dict[str, np.ndarray] | None = None
        self.att = spec.normalize(case.q, case.k, case.v, **case.semantics())
        self.rows = policies.row_policies(case, self.att, info.masked_rows)  # the empty rows of each policy

    def add(self, category: str, check: str, output: str = "out", **kw) -> Finding:
        c = self.case
        f = Finding(category=category, check=check, target=self.info.name, dtype=c.dtype, family=c.family,
                    mask_kind=c.mask_kind, describe=c.describe(), output=output, dims=c.dims,
                    chunks=(c.query_chunk_size, c.key_chunk_size), reference=self.truth.reference, **kw)
        self.found.append(f)
        return f

    def structure(self, check: str, output: str, got: object, want_shape: tuple, dtype: str | None = None) -> bool:
        """Shape and dtype findings; False when values cannot be compared."""
        want = list(want_shape)
        dtype = dtype or self.case.dtype
        if not isinstance(got, np.ndarray) or got.shape != tuple(want_shape):
            shape = list(got.shape) if hasattr(got, "shape") else type(got).__name__
            self.add("shape", check, output, detail=f"{output} has shape {shape}, expected {want}")
            return False
        try:
            name = spec.dtype_name(got.dtype)
        except ValueError:
            name = str(got.dtype)
        if name != dtype:
            self.add("dtype", check, output, detail=f"{output} has dtype {name}, expected {dtype}")
        return True

    def repeat(self, name: str, first: np.ndarray, second: np.ndarray, allow: np.ndarray) -> None:
        """A ``nondeterministic`` finding when a second run of the case gave other bits (or, for a target
        declared nondeterministic, a difference beyond the allowance)."""
        a, b = np.asarray(first).astype(np.float64), np.asarray(second).astype(np.float64)
        if a.shape != b.shape:
            self.add("nondeterministic", "determinism", name, detail=f"{name} has shape {list(b.shape)} on the "
                     f"second run, {list(a.shape)} on the first")
            return
        with np.errstate(invalid="ignore"):
            diff = np.abs(a - b)
            differs = ~((a == b) | (np.isnan(a) & np.isnan(b)))
            if self.info.nondeterministic:
                differs &= ~(diff <= allow)
        if not differs.any():
            return
        idx = np.unravel_index(int(np.argmax(np.where(differs, np.where(np.isnan(diff), np.inf, diff), -1.0))), a.shape)
        how = "beyond the allowance (the target is declared nondeterministic)" if self.info.nondeterministic else \
            "bitwise: the same case, run twice, gave other results"
        self.add("nondeterministic", "determinism", name, count=int(differs.sum()), total=int(differs.size),
                 index=tuple(int(i) for i in idx), got=float(b[idx]), exact=float(a[idx]),
                 allowance=float(allow[idx]), ratio=float(diff[idx] / allow[idx]) if allow[idx] > 0 else None,
                 detail=f"{name} differs {how}; 'exact' here is the first run's value")

    def empty_rows(self, got: np.ndarray, want: np.ndarray, att: spec.Attention) -> None:
        """lse of rows with no visible key (the declared convention) and of +inf-sink rows (+inf)."""
        got = got.astype(np.float64)
        bad = att.infinite_sink_row & (got != np.inf)
        conventions = []
        for policy, rows in self.rows.items():
            convention = self.info.empty_lse or {"zeros": "-inf", "nan": "nan", "uniform": "any"}[policy]
            if convention != "any" and rows.any():
                ok = np.isnan(got) if convention == "nan" else got == {"-inf": -np.inf, "+inf": np.inf}[convention]
                bad = bad | (rows & ~ok)
                conventions.append(f"{convention} under {policy}")
        if bad.any():
            idx = np.unravel_index(int(np.argmax(bad)), bad.shape)
            self.add("masked-row", "forward", "lse", count=int(bad.sum()), total=int(bad.size),
                     index=tuple(int(i) for i in idx), got=float(got[idx]), exact=float(want[idx]),
                     detail=f"lse of a row with no visible key must be {', '.join(conventions) or '-'} (declared "
                            f"policy {self.info.masked_rows!r})"
                            + ("; a +inf sink's rows must be +inf" if att.infinite_sink_row.any() else ""))

    def values(self, check: str, cmp: Comparison, scale: np.ndarray) -> None:
        """masked-row, overflow / nan, underflow and value findings of one compared array."""
        policy = self.info.masked_rows
        nan_rows = np.broadcast_to(np.swapaxes(self.rows["nan"], 1, 2)[..., None], cmp.got.shape) if cmp.masked.any() \
            and cmp.name in ("out", "dq") else np.zeros(cmp.got.shape, bool)
        bad_rows = (cmp.masked & ~nan_rows & (cmp.beyond | cmp.nonfinite)) | (nan_rows & ~np.isnan(cmp.got))
        if bad_rows.any():
            self._worst("masked-row", check, cmp, bad_rows, scale, detail=f"declared masked-row policy {policy!r}")
        free = ~cmp.masked
        # lse = -inf where it is finite is log(0): the row's sum vanished (every weight underflowed, or the
        # row was taken for one without visible keys): an underflow, not an overflow.
        lost = cmp.nonfinite & free & (cmp.got == -np.inf) if cmp.name == "lse" else np.zeros(cmp.got.shape, bool)
        selections = (("nan", cmp.nonfinite & free & np.isnan(cmp.got), ""),
                      ("overflow", cmp.nonfinite & free & np.isinf(cmp.got) & ~lost, ""),
                      ("underflow", lost, "lse is -inf (log 0) on rows that have visible keys: their sum of weights "
                                          "vanished, or they were taken for rows without visible keys"),
                      ("underflow", cmp.underflow & ~lost, ""),
                      (check, cmp.beyond & free & ~cmp.underflow & ~lost, ""))
        for category, sel, detail in selections:
            if sel.any():
                self._worst(category, check, cmp, sel, scale, detail=detail)

    def _worst(self, category: str, check: str, cmp: Comparison, sel: np.ndarray, scale: np.ndarray,
               detail: str = "") -> None:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            score = np.where(sel, np.where(np.isfinite(cmp.err), cmp.err / np.maximum(cmp.allow, 1e-300), np.inf), -1.0)
        idx = np.unravel_index(int(np.argmax(score)), sel.shape)
        e, a, want = float(cmp.err[idx]), float(cmp.allow[idx]), float(cmp.want[idx])
        finite = np.isfinite(e)
        self.add(category, check, cmp.name, count=int(sel.sum()), total=int(sel.size),
                 index=tuple(int(i) for i in idx), got=float(cmp.got[idx]), exact=want, allowance=a,
                 ratio=e / a if a > 0 and finite else None,
                 ulps=e / float(spec.ulp(want, self.case.dtype)) if finite and want != 0 else None,
                 scale=float(scale[idx]), u=self.allow.u, plain=self._plain_at(cmp.name, idx, a, category),
                 detail=detail)

    def _plain_at(self, name: str, idx: tuple, allowance: float, category: str) -> str:
        """How a plain same-precision implementation does at element ``idx`` of output ``name``."""
        if self._plain is None:
            c, case = self.info.contract, self.case
            kw = dict(case.semantics(), masked_rows=policies.single(self.info.masked_rows) or "zeros", dtype=case.dtype,
                      accumulate=c.accumulate, round_logits=c.round_logits, round_probs=c.round_probs)
            with np.errstate(all="ignore"):
                if self.truth.grads is not None and case.g is not None:
                    r = naive.attention_vjp(case.q, case.k, case.v, case.g, g_lse=case.g_lse, **kw)
                else:
                    r = naive.attention(case.q, case.k, case.v, **kw)
                self._plain = {n: getattr(r, n) for n in ("out", "lse", "dq", "dk", "dv", "dbias", "dsinks")
                               if getattr(r, n, None) is not None}
        if name not in self._plain:
            return ""
        c = self.info.contract
        who = (f"a plain {self.case.dtype} implementation (accumulate {c.accumulate}, logits "
               f"{'rounded' if c.round_logits else 'not rounded'}, probabilities "
               f"{'rounded' if c.round_probs else 'not rounded'})")
        got = float(self._plain[name][idx])
        want = float({"out": self.truth.out, "lse": self.truth.lse, **(self.truth.grads or {})}[name][idx])
        if not np.isfinite(got):
            return f"{who} is non-finite there too ({got}): a limit of that precision contract, not only of this kernel"
        if category in ("overflow", "nan"):
            return f"{who} stays finite there ({got:.6g}): a defect of this kernel"
        ratio = abs(got - want) / allowance if allowance > 0 else float("inf")
        return f"{who} errs by {ratio:.3g} × allowance there"


def passes_for(info: TargetInfo, case: Case, checks: tuple[str, ...]) -> tuple[str, ...]:
    """The target passes ``checks`` need for ``case``: forward, grad when declared and a cotangent exists, and
    both once more for ``determinism``."""
    passes = tuple(p for p in ("forward", "grad") if p in checks and (
        p == "forward" or ("grad" in info.features and case.g is not None)))
    return passes + tuple(p + REPEAT for p in passes) if "determinism" in checks else passes


def run_case(target: Adapter | InProcess, case: Case, *, checks: tuple[str, ...] = CHECKS, policy: str = "bound",
             timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Run ``target`` (an adapter, or an executor of ``verify.execution``) on ``case`` and check every pass."""
    if policy not in tolerance.POLICIES:
        raise ValueError(f"unknown tolerance policy {policy!r}; known: {', '.join(tolerance.POLICIES)}")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    executor = InProcess(target) if isinstance(target, Adapter) else target
    info = executor.info
    if policies.undefined_rows(case, info.masked_rows):
        return Outcome(declined=policies.UNDEFINED)  # nothing to check against: not run, counted as declined
    passes = passes_for(info, case, checks)
    overlap = hasattr(executor, "submit")  # a worker process runs the target while the reference is computed
    if overlap:
        executor.submit(case, passes)
    t0 = time.perf_counter()
    try:
        decided = decide(case, info, any(p.startswith("grad") for p in passes), policy)
        truth, allow = decided.exact, decided.allow
    except BaseException:
        if overlap:
            executor.close()  # its answer to this case would be read as the next case's
        raise
    t1 = time.perf_counter()
    calls = executor.collect(timeout) if overlap else executor.run(case, passes, timeout)
    out = judge(info, case, truth, allow, calls)
    out.seconds = {"reference": t1 - t0, "target": calls.seconds}
    return out


def judge(info: TargetInfo, case: Case, truth: Exact, allow: tolerance.Allowance, calls: Calls) -> Outcome:
    """Findings and worst ratios of one case's ``calls`` against ``truth`` under ``allow``."""
    fs = _Findings(info, case, truth, allow)
    ratios: dict[str, float | None] = {}
    masked = np.swapaxes(fs.att.masked_row, 1, 2)[..., None]  # [B, Lq, Hq, 1]: the policies govern these rows
    for name, failure in calls.failures.items():
        if failure.kind in ("raised", "crash"):
            fs.add("crash", name, detail=failure.describe())
        elif failure.kind == "timeout":
            fs.add("timeout", name, detail=failure.describe())
    arrays = []
    if calls.out is not None and fs.structure("forward", "out", calls.out, truth.out.shape):
        arrays.append(("forward", "out", calls.out, truth.out, allow.out, allow.scale_out, masked))
    if "lse" in info.features and calls.out is not None:
        lse_dtype = "fp64" if case.dtype == "fp64" else "fp32"
        if calls.lse is not None and fs.structure("forward", "lse", calls.lse, truth.lse.shape, lse_dtype):
            fs.empty_rows(calls.lse, truth.lse, fs.att)
            arrays.append(("forward", "lse", calls.lse, truth.lse, allow.lse, np.ones_like(truth.lse), None))
    if calls.grads is not None:
        for name, want in truth.grads.items():
            got = calls.grads.get(name)
            if got is None:
                fs.add("shape", "grad", name, detail=f"the VJP returned no {name}")
            elif fs.structure("grad", name, got, want.shape):
                arrays.append(("grad", name, got, want, allow.grads[name], allow.grad_scales[name],
                               masked if name == "dq" else None))
    for check, name, got, want, allowed, scale, rows in arrays:
        cmp = compare(name, got, want, allowed, "fp64" if name == "lse" and case.dtype == "fp64" else
                      "fp32" if name == "lse" else case.dtype, rows)
        ratios[name] = cmp.worst_ratio
        fs.values(check, cmp, scale)
        if name in calls.again:
            fs.repeat(name, got, calls.again[name], allowed)
    return Outcome(fs.found, ratios, declined=calls.declined, reference=truth.reference,
                   unconstrained_rows=allow.unconstrained_rows,
                   timed_out=any(f.kind == "timeout" for f in calls.failures.values()))
