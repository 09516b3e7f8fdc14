"""The certified float64 reference: sound where it decides, and mp where float64 cannot be trusted."""

from __future__ import annotations

import numpy as np
import pytest

from verify import tolerance
from verify.case import Case
from verify.reference import mp_values, naive64_values
from verify.strategies import example_case
from verify.targets import Contract, TargetInfo
from verify.truth import decide

INFO = TargetInfo("t", "numpy", features=frozenset({"mask", "bias", "causal", "gqa", "grad", "lse", "bottom-right",
                                                    "window", "softcap", "alibi", "sinks", "segments"}),
                  contract=Contract(accumulate="fp32", round_logits=False, round_probs=False))


def _case(dtype=np.float32, **kw) -> Case:
    r = np.random.default_rng(5)
    q, k, v, g = (r.standard_normal(s).astype(dtype) for s in ((1, 4, 2, 3), (1, 6, 2, 3), (1, 6, 2, 2), (1, 4, 2, 2)))
    return Case(q, k, v, g=g, **kw)


def test_a_huge_common_row_offset_is_decided_by_mp():
    """A bias of 1e17 on every key: float64 keeps ~16 digits of 1e17, so the logits' spread is lost."""
    bias = np.full((1, 1, 4, 6), 1e17, np.float32) + np.arange(6, dtype=np.float32)
    case = _case(bias=bias)
    truth = decide(case, INFO, grad=True)
    assert truth.exact.reference == "mp"
    r64 = naive64_values(case, "zeros", True)
    assert np.abs(r64.out - truth.exact.out).max() > 1e-3  # float64 is badly wrong here: mp was needed


def test_logits_that_cancel_from_huge_magnitudes_are_decided_by_mp():
    """q.k = 1e18 - 1e18 + s: logits of order 1 computed through terms of 1e18 (float64's spacing there: 128)."""
    q = np.array([[[[1e9, -1e9, 1.0]], [[1e9, -1e9, 2.0]]]], np.float32)
    k = np.array([[[[1e9, 1e9, 1.0]], [[1e9, 1e9, 3.0]], [[1e9, 1e9, -1.0]]]], np.float32)
    v = np.array([[[[1.0]], [[2.0]], [[4.0]]]], np.float32)
    case = Case(q, k, v, g=np.ones((1, 2, 1, 1), np.float32), scale=1.0)
    truth = decide(case, INFO, grad=True)
    assert truth.exact.reference == "mp"
    assert truth.exact.out[0, 0, 0, 0] == pytest.approx((1 * np.e + 2 * np.e**3 + 4 * np.e**-1)
                                                        / (np.e + np.e**3 + np.e**-1), rel=1e-12)


def test_fp64_targets_always_use_mp():
    case = _case(np.float64)
    assert decide(case, INFO, grad=True).exact.reference == "mp"


def test_short_cases_go_to_mp_with_mp_max_len():
    case = _case()
    assert decide(case, INFO, grad=True).exact.reference == "naive64"
    assert decide(case, INFO, grad=True, mp_max_len=16).exact.reference == "mp"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_where_certified_naive64_is_within_its_stated_bound_of_mp(dtype):
    """On generated cases of every family, mask kind and option, |naive64 - mp| <= the float64 bound."""
    decided = 0
    for seed in range(40):
        case = example_case(seed, dtype, features=INFO.features, max_len=17)
        truth = decide(case, INFO, grad=True)
        if truth.exact.reference != "naive64":
            continue
        decided += 1
        exact = mp_values(case, "zeros", True)
        sc_bound = tolerance.bound(case.with_(q=case.q.astype(np.float64), k=case.k.astype(np.float64),
                                              v=case.v.astype(np.float64), g=case.g.astype(np.float64)),
                                   tolerance.FLOAT64, exact.p, "zeros", exact.p_sink, exact.lse)
        pairs = [("out", truth.exact.out, exact.out, sc_bound.out), ("lse", truth.exact.lse, exact.lse, sc_bound.lse)]
        pairs += [(n, truth.exact.grads[n], exact.grads[n], sc_bound.grads[n]) for n in exact.grads]
        for name, got, want, allowed in pairs:
            with np.errstate(invalid="ignore"):
                bad = np.isfinite(want) & ~(np.abs(got - want) <= allowed)
            assert not bad.any(), (seed, name, case.describe())
    assert decided >= 30  # float64 decides nearly every bf16/fp16/fp32 case


def test_uniform_rows_do_not_cost_an_mp_run():
    """A uniform-policy row's additive-fill gradient allowance is the target's freedom, not float64's error.

    Counting it in float64's own bound left such cases uncertified, so a 2048-long one went to mp (168 s).
    """
    info = TargetInfo("u", "numpy", features=frozenset({"mask", "causal", "grad"}), contract=INFO.contract,
                      masked_rows="uniform")
    case = _case(mask=np.array([[False] * 6] + [[True] * 6] * 3))
    truth = decide(case, info, grad=True)
    assert truth.exact.reference == "naive64"
    assert np.isfinite(truth.allow.grads["dq"]).all() and truth.allow.grads["dq"][0, 0].max() > 0  # still allowed


def test_an_unbounded_gradient_allowance_stays_infinite_and_does_not_block_certification():
    """A causal row whose only key carries a finfo.min bias is unconstrained: its gradient allowance is inf.

    ``np.nan_to_num`` turned that inf into finfo(float64).max, which no float64 bound fits under, so a
    1985-long case of this kind went to mp (hours) instead of the float64 reference (3 s).
    """
    bias = np.zeros((1, 1, 4, 6), np.float32)
    bias[..., 0] = np.finfo(np.float32).min
    case = _case(bias=bias, causal=True)
    r64 = naive64_values(case, "zeros", True)
    allow, verdict = tolerance.certified_bound(case, INFO.contract, r64.p, "zeros", r64.p_sink, r64.lse)
    assert verdict == "free-rows"
    assert np.isposinf(allow.grads["dq"][0, 0]).all()  # row 0: unbounded, and said so
