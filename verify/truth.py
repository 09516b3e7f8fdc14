"""The truth for one case: its exact values and a correct target's allowance, from a certified reference.

The float64 naive reference decides a case wherever its own error bound (the allowance a correct
float64 implementation has: ``tolerance.certified_bound``) is below 1/64 of the target's allowance
for every output, lse and gradient element; there no comparison with it can change a verdict
unless the target's error lies within 1/64 of the allowance's edge. Elsewhere -- and always for
fp64 targets, whose allowance float64 cannot certify, and for short cases where mp is cheap
(``mp_max_len``) -- the mp oracle decides, and the allowance is computed from its exact
probabilities. ``Truth.exact.reference`` says which did; findings and campaign JSON report it.

For bf16/fp16/fp32 targets float64 has 29 or more bits to spare, so it is certified on almost every
case. Where it is not -- float64 itself cannot resolve the logits: a common offset of 1e17 on a row,
logits that cancel from magnitudes far beyond the row's spread, a fully masked row written as a
finite -1e9 or finfo.min bias -- the target's own contract leaves those rows unconstrained too
(any convex combination of the row's values passes), so the verdict does not depend on the exact
values there. mp then decides the case if it is affordable (``MP_AFFORDABLE`` query-key-dim
products), so messages show the true exact values; a larger case keeps float64's, labelled
``naive64*`` (certified except on unconstrained rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from verify import tolerance
from verify.case import Case
from verify.reference import Exact, mp_values, naive64_values
from verify.targets.base import TargetInfo

MP_AFFORDABLE = 2**16  # B * Hq * Lq * Lk * (Dk + Dv) up to which mp decides a case float64 cannot fully certify


@dataclass
class Truth:
    """Exact values and the allowance of one case."""

    exact: Exact
    allow: tolerance.Allowance


def decide(case: Case, info: TargetInfo, grad: bool, policy: str = "bound", mp_max_len: int = 0) -> Truth:
    """The exact values of ``case`` for ``info``'s target and its allowance (see the module doc).

    ``mp_max_len``: cases no longer than this go to mp directly (0: only when float64 is not certified).
    """
    d = case.dims
    if case.dtype != "fp64" and max(d["Lq"], d["Lk"]) > mp_max_len:
        r64 = naive64_values(case, info.masked_rows, grad)
        allow, verdict = tolerance.certified_bound(case, info.contract, r64.p, info.masked_rows, r64.p_sink,
                                                   r64.lse)
        work = d["B"] * d["Hq"] * d["Lq"] * d["Lk"] * (d["Dk"] + d["Dv"])
        if verdict == "certified" or (verdict == "free-rows" and work > MP_AFFORDABLE):
            if verdict != "certified":
                r64.reference = "naive64*"
            if policy != "bound":
                allow = tolerance.allowance(case, info.contract, r64, info.masked_rows, policy)
            return Truth(r64, allow)
    exact = mp_values(case, info.masked_rows, grad)
    return Truth(exact, tolerance.allowance(case, info.contract, exact, info.masked_rows, policy))
