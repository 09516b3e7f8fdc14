"""Checks: run a target on a case, compare with the exact answer, and name what is wrong.

``run_case`` computes the exact values (mp oracle), the allowance (tolerance model), calls the
target's forward and VJP under a time limit, and returns findings in named categories:

- ``forward`` / ``grad``: a finite value beyond its allowance;
- ``overflow``: non-finite where the exact value is finite (and finite in the dtype);
- ``underflow``: the exact value is a normal number of the dtype near the bottom of its range
  (below ``tiny / u``), the target gives 0 or a subnormal, beyond the allowance;
- ``masked-row``: a fully masked row that breaks the declared policy (output, or ``dq``);
- ``shape`` / ``dtype``: wrong output shape or dtype; ``crash``: the target raised;
  ``timeout``: a call ran past its limit.

A crash, hang or NaN of a target is a finding here, never an exception of the harness. A target
(or its adapter) that raises ``verify.targets.Unsupported`` declines the case (say, a scale other
than ``1/sqrt(Dk)`` for a kernel that cannot take one): no finding, and campaigns count declines.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from oracles import mp, spec
from verify import tolerance
from verify.case import Case
from verify.findings import Finding
from verify.targets.base import Adapter, Unsupported

CHECKS = ("forward", "grad")
DEFAULT_TIMEOUT = 120.0


class TargetTimeout(Exception):
    """A target call ran past its time limit."""


@dataclass
class Exact:
    """The oracle's values for one case (float64)."""

    out: np.ndarray
    p: np.ndarray
    grads: dict[str, np.ndarray] | None = None


@dataclass
class Outcome:
    """Everything one case gave: findings, the worst error per output in allowances, timings."""

    findings: list[Finding] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    declined: str | None = None  # why the target raised Unsupported for this case


def exact(case: Case, masked_rows: str, grad: bool) -> Exact:
    """Oracle values: mp forward (and VJP for ``case.g`` when ``grad``)."""
    kw = dict(case.semantics(), masked_rows=masked_rows, probs=True)
    if grad:
        res = mp.attention_vjp(case.q, case.k, case.v, case.g, **kw)
        grads = {"dq": res.dq, "dk": res.dk, "dv": res.dv}
        if res.dbias is not None:
            grads["dbias"] = res.dbias
        return Exact(res.out, res.p, grads)
    res = mp.attention(case.q, case.k, case.v, **kw)
    return Exact(res.out, res.p)


def call_with_timeout(fn, timeout: float):
    """``fn()`` in a daemon thread; raises what it raised, or ``TargetTimeout`` past ``timeout`` s."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - everything a target raises is reported
            box["error"] = exc
            box["tb"] = traceback.format_exc(limit=-3)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TargetTimeout(f"call ran past {timeout:g} s")
    if "error" in box:
        box["error"].attnverify_tb = box["tb"]
        raise box["error"]
    return box["value"]


class _Comparer:
    """Compares one case's outputs and gradients and builds findings."""

    def __init__(self, adapter: Adapter, case: Case) -> None:
        self.adapter, self.case = adapter, case
        self.info = adapter.info
        self.findings: list[Finding] = []
        self.ratios: dict[str, float] = {}
        self.declined: str | None = None

    def finding(self, category: str, check: str, output: str = "out", **kw) -> Finding:
        c = self.case
        f = Finding(
            category=category, check=check, target=self.info.name, dtype=c.dtype, family=c.family,
            mask_kind=c.mask_kind, describe=c.describe(), output=output, dims=c.dims,
            chunks=(c.query_chunk_size, c.key_chunk_size), **kw,
        )
        self.findings.append(f)
        return f

    def structure(self, check: str, output: str, got: np.ndarray, want_shape: tuple) -> bool:
        """Shape and dtype findings; False when values cannot be compared."""
        if not isinstance(got, np.ndarray) or got.shape != tuple(want_shape):
            shape = getattr(got, "shape", type(got).__name__)
            self.finding("shape", check, output, detail=f"{output} has shape {shape}, expected {list(want_shape)}")
            return False
        try:
            name = spec.dtype_name(got.dtype)
        except ValueError:
            name = str(got.dtype)
        if name != self.case.dtype:
            self.finding("dtype", check, output, detail=f"{output} has dtype {name}, expected {self.case.dtype}")
        return True

    def compare(self, check: str, output: str, got: np.ndarray, want: np.ndarray, allow: np.ndarray,
                masked: np.ndarray | None) -> None:
        """Findings for one array: masked-row, overflow, underflow and value categories."""
        dtype = self.case.dtype
        info = spec.finfo(dtype)
        got = got.astype(np.float64)
        masked = np.zeros(got.shape, bool) if masked is None else np.broadcast_to(masked, got.shape)
        with np.errstate(invalid="ignore", over="ignore"):
            allow = np.where(np.isnan(allow), np.inf, allow)
            in_range = np.abs(want) <= float(info.max)
            checked = ~np.isnan(want) & in_range
            err = np.abs(got - want)
            # inf is the correct rounding of anything past max + ulp/2: a result allowed to reach
            # that far may round to inf, so only a result bounded below it is an overflow.
            limit = float(info.max) * (1 + spec.unit_roundoff(dtype))
            may_round_to_inf = np.abs(want) + allow >= limit
            nonfinite = checked & np.isfinite(want) & (np.isnan(got) | (np.isinf(got) & ~may_round_to_inf))
            beyond = checked & np.isfinite(got) & (err > allow)
            ratio = np.where(checked & np.isfinite(got) & (allow > 0), err / np.where(allow > 0, allow, 1), 0.0)
        finite_ratio = ratio[np.isfinite(ratio)]
        self.ratios[output] = max(self.ratios.get(output, 0.0), float(finite_ratio.max(initial=0.0)))
        policy = self.info.masked_rows
        masked_bad = masked & ((beyond | nonfinite) if policy != "nan" else ~np.isnan(got))
        if masked_bad.any():
            self._worst("masked-row", check, output, masked_bad, got, want, allow, err,
                        detail=f"declared masked-row policy {policy!r}")
        # Underflow: a normal exact value near the bottom of the range (within 1/u of the smallest
        # normal) lost to 0 or a subnormal. A 0 where the exact value is ~1 is a value bug.
        tiny = float(info.tiny)
        near = (np.abs(want) >= tiny) & (np.abs(want) < tiny / spec.unit_roundoff(dtype))
        under = beyond & ~masked & near & (np.abs(got) < tiny)
        over = nonfinite & ~masked
        value = beyond & ~masked & ~under
        for category, sel in (("overflow", over), ("underflow", under), (check, value)):
            if sel.any():
                self._worst(category, check, output, sel, got, want, allow, err)

    def _worst(self, category: str, check: str, output: str, sel: np.ndarray, got: np.ndarray,
               want: np.ndarray, allow: np.ndarray, err: np.ndarray, detail: str = "") -> None:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            score = np.where(sel, np.where(np.isfinite(err), err / np.maximum(allow, 1e-300), np.inf), -1.0)
        idx = np.unravel_index(int(np.argmax(score)), sel.shape)
        e, a = float(err[idx]), float(allow[idx])
        ulps = e / float(spec.ulp(want[idx], self.case.dtype)) if np.isfinite(e) else None
        self.finding(
            category, check, output, count=int(sel.sum()), total=int(sel.size), index=tuple(int(i) for i in idx),
            got=float(got[idx]), exact=float(want[idx]), allowance=a,
            ratio=(e / a if a > 0 and np.isfinite(e) else None), ulps=ulps, detail=detail,
        )

    def call(self, check: str, fn, timeout: float):
        """Run a target call; a raise or hang becomes a finding and returns None."""
        try:
            return call_with_timeout(fn, timeout)
        except TargetTimeout as exc:
            self.finding("timeout", check, detail=str(exc))
        except Unsupported as exc:  # the target (or its adapter) declines the case: not a defect
            self.declined = str(exc)
        except Exception as exc:  # noqa: BLE001 - a target's exception is a finding
            tb = getattr(exc, "attnverify_tb", "").strip().splitlines()
            where = f" ({tb[-3].strip()})" if len(tb) >= 3 else ""
            self.finding("crash", check, detail=f"{type(exc).__name__}: {str(exc)[:300]}{where}")
        return None


def run_case(adapter: Adapter, case: Case, *, checks: tuple[str, ...] = CHECKS, policy: str = "bound",
             timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Run ``adapter`` on ``case`` and return every finding with the worst error per output."""
    if policy not in tolerance.POLICIES:
        raise ValueError(f"unknown tolerance policy {policy!r}; known: {', '.join(tolerance.POLICIES)}")
    info = adapter.info
    adapter.kwargs(case)  # Unsupported here is a harness error: the case should not exist
    grad = "grad" in checks and "grad" in info.features and case.g is not None
    t0 = time.perf_counter()
    truth = exact(case, info.masked_rows, grad)
    if policy == "naive":
        allow = tolerance.flash_rule(case, info.contract, truth.out, truth.grads or {}, truth.p, info.masked_rows)
    else:
        allow = tolerance.bound(case, info.contract, truth.p, info.masked_rows)
    t1 = time.perf_counter()
    cmp = _Comparer(adapter, case)
    att = spec.normalize(case.q, case.k, case.v, masked_rows=info.masked_rows, **case.semantics())
    row_masked = np.swapaxes(att.masked_row, 1, 2)[..., None]  # [B, Lq, Hq, 1]
    if "forward" in checks:
        out = cmp.call("forward", lambda: adapter.forward(case), timeout)
        if out is not None and cmp.structure("forward", "out", out, truth.out.shape):
            cmp.compare("forward", "out", out, truth.out, allow.out, row_masked)
    t2 = time.perf_counter()
    if grad and cmp.declined is None:
        got = cmp.call("grad", lambda: adapter.vjp(case), timeout)
        if got is not None:
            for name, want in truth.grads.items():
                if name not in got:
                    cmp.finding("shape", "grad", name, detail=f"the VJP returned no {name}")
                    continue
                if cmp.structure("grad", name, got[name], want.shape):
                    masked = row_masked if name == "dq" else None
                    cmp.compare("grad", name, got[name], want, allow.grads[name], masked)
    t3 = time.perf_counter()
    findings = [] if cmp.declined else cmp.findings
    return Outcome(findings, cmp.ratios, {"oracle": t1 - t0, "target": (t2 - t1) + (t3 - t2)}, cmp.declined)
