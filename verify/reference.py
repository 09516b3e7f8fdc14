"""The exact values of a case from either reference: the mp oracle, or the float64 naive reference.

``mp_values`` runs ``oracles.mp`` (exact up to its precision, slow: seconds at L = 256);
``naive64_values`` runs ``oracles.naive`` in float64 (milliseconds at L = 2048, accurate to about
2^-53 of the absolute-value scales, not exact). Both return an ``Exact``: outputs, lse,
probabilities and, with a cotangent, gradients, under the target's masked-row declaration
(``verify.policies``). Which one may decide a case is ``verify.truth``'s business: it certifies
the float64 values against the allowance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from oracles import mp, naive
from verify import policies
from verify.case import Case


@dataclass
class Exact:
    """The exact values of one case (float64): output, lse, probabilities and, when asked, gradients."""

    out: np.ndarray
    lse: np.ndarray
    p: np.ndarray  # [B, Hq, Lq, Lk], 0 for invisible keys
    grads: dict[str, np.ndarray] | None = None
    reference: str = "mp"  # which reference computed them: "mp" or "naive64"
    p_sink: np.ndarray | None = None  # [B, Hq, Lq]: the sink's probability, with sinks


def _grads(res: object) -> dict[str, np.ndarray]:
    return {n: getattr(res, n) for n in ("dq", "dk", "dv", "dbias", "dsinks") if getattr(res, n) is not None}


def _policed(exact: Exact, case: Case, masked_rows: str) -> Exact:
    """Values computed under a single oracle policy, turned into a per-mechanism declaration's."""
    if policies.single(masked_rows) is None:
        policies.apply(case, masked_rows, exact.out, exact.lse, exact.grads)
    return exact


def _oracle_policy(masked_rows: str) -> str:
    """The policy the oracle computes with: the declared one, or zeros for a per-mechanism declaration."""
    return policies.single(masked_rows) or "zeros"


def mp_values(case: Case, masked_rows: str, grad: bool) -> Exact:
    """The mp oracle's values for ``case`` (its VJP for ``case.g`` and ``case.g_lse`` when ``grad``)."""
    kw = dict(case.semantics(), masked_rows=_oracle_policy(masked_rows), probs=True)
    if grad and case.g is not None:
        res = mp.attention_vjp(case.q, case.k, case.v, case.g, g_lse=case.g_lse, **kw)
        return _policed(Exact(res.out, res.lse, res.p, _grads(res), "mp", res.p_sink), case, masked_rows)
    res = mp.attention(case.q, case.k, case.v, **kw)
    return _policed(Exact(res.out, res.lse, res.p, None, "mp", res.p_sink), case, masked_rows)


def naive64_values(case: Case, masked_rows: str, grad: bool) -> Exact:
    """The float64 naive reference's values for ``case`` (its analytic VJP when ``grad``)."""
    kw = dict(case.semantics(), masked_rows=_oracle_policy(masked_rows))
    with np.errstate(all="ignore"):
        if grad and case.g is not None:
            res = naive.attention_vjp(case.q, case.k, case.v, case.g, g_lse=case.g_lse, **kw)
            exact = Exact(res.out, res.lse, res.p, _grads(res), "naive64", res.p_sink)
        else:
            res = naive.attention(case.q, case.k, case.v, **kw)
            exact = Exact(res.out, res.lse, res.p, None, "naive64", res.p_sink)
    return _policed(exact, case, masked_rows)
