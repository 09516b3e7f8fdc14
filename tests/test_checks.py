"""Checks and the tolerance model: each finding category is produced by the failure it names."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from oracles import mp
from tests import fixture_targets as ft
from verify import checks, policies, reference, tolerance
from verify.case import Case
from verify.targets import load
from verify.targets.base import Contract


def _case(dtype: str = "fp32", seed: int = 0, lq: int = 5, lk: int = 7, g: bool = True, **kw) -> Case:
    rng = np.random.default_rng(seed)
    dt = {"bf16": "float32", "fp16": "float16", "fp32": "float32"}[dtype]
    from oracles import spec

    cast = spec.as_dtype(dtype)
    q = rng.standard_normal((1, lq, 2, 4)).astype(dt).astype(cast)
    k = rng.standard_normal((1, lk, 2, 4)).astype(dt).astype(cast)
    v = rng.standard_normal((1, lk, 2, 3)).astype(dt).astype(cast)
    gg = rng.standard_normal((1, lq, 2, 3)).astype(dt).astype(cast) if g else None
    return Case(q, k, v, g=gg, **kw)


def _run(name: str, case: Case, **kw) -> checks.Outcome:
    return checks.run_case(load(f"tests.fixture_targets:{name}"), case, **kw)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_correct_reference_has_no_findings(dtype):
    mask = np.random.default_rng(1).random((1, 1, 5, 7)) < 0.6
    out = _run("reference", _case(dtype, mask=mask, mask_kind="random"))
    assert out.findings == []
    assert 0 < out.ratios["out"] < 1


@pytest.mark.parametrize(
    ("name", "category"),
    [("crashes", "crash"), ("wrong_shape", "shape"), ("wrong_dtype", "dtype"), ("nan_output", "nan"),
     ("inf_output", "overflow")],
)
def test_each_failure_mode_gives_its_category(name, category):
    out = _run(name, _case(g=False), checks=("forward",))
    assert [f.category for f in out.findings] == [category]
    f = out.findings[0]
    assert f.target == f"tests.fixture_targets:{name}" and f.dtype == "fp32"
    assert f"FAIL {category} ·" in f.message()


def test_crash_message_names_the_exception_once():
    f = _run("crashes", _case(), checks=("forward", "grad")).findings
    assert [x.category for x in f] == ["crash"]  # once per case, not once per check
    detail = f[0].detail
    assert detail.startswith("RuntimeError: kernel launch failed (at ") and detail.count("kernel launch failed") == 1
    assert "fixture_targets.py:" in detail


def test_shape_message_and_nonfinite_messages_say_what_and_how():
    shape = _run("wrong_shape", _case(g=False), checks=("forward",)).findings[0]
    assert shape.detail == "out has shape [1, 5, 2, 1], expected [1, 5, 2, 3]"
    nan = _run("nan_output", _case(g=False), checks=("forward",)).findings[0]
    msg = nan.message()
    assert "NaN where the exact value is finite" in msg and "got nan" in msg and "ulp" not in msg
    assert "stays finite there" in msg and "a defect of this kernel" in msg


def test_an_exact_zero_shows_the_absolute_error_not_ulps():
    mask = np.zeros((1, 1, 5, 7), bool)
    mask[..., 0] = True
    case = _case(g=False, mask=mask, mask_kind="custom")
    case = case.with_(v=np.zeros_like(case.v))  # every exact output is 0

    def off(q, k, v, **kw):
        return np.full((1, 5, 2, 3), 1e-3, np.float32)

    found = checks.run_case(_numpy_target(off), case, checks=("forward",)).findings
    assert [f.category for f in found] == ["forward"] and found[0].exact == 0 and found[0].ulps is None
    assert "Δ +0.001)" in found[0].message()


def test_hang_is_a_timeout_finding_not_a_hang():
    out = _run("hangs", _case(g=False), checks=("forward",), timeout=0.3)
    assert [f.category for f in out.findings] == ["timeout"]


def test_underflow_of_tiny_values():
    case = _case(g=False)
    case = case.with_(v=(case.v.astype(np.float64) * 2.0**-110).astype(np.float32), family="tiny-values")
    out = _run("flush_tiny", case, checks=("forward",))
    assert {f.category for f in out.findings} == {"underflow"}
    assert _run("reference", case, checks=("forward",)).findings == []


def test_masked_row_policy_violation():
    mask = np.ones((1, 1, 5, 7), bool)
    mask[..., 2, :] = False
    case = _case(g=False, mask=mask, mask_kind="masked-rows")
    out = _run("masked_rows_nan", case, checks=("forward",))
    assert [f.category for f in out.findings] == ["masked-row"]
    assert out.findings[0].index[1] == 2  # the fully masked query row


def _numpy_target(fn):
    from verify.targets import adapter_for
    from verify.targets.base import TargetInfo

    return adapter_for(fn, TargetInfo(name=fn.__name__, framework="numpy", features=frozenset({"mask"})))


def test_finding_message_reads_in_allowances_and_ulps():
    out = checks.run_case(load("tests.fixture_targets:reference"), _case(), checks=("forward",))
    assert out.findings == []
    # Perturb the reference by a known amount: 10x the allowance of one element.
    case = _case(g=False)
    exact = reference.mp_values(case, "zeros", grad=False)
    allow = tolerance.bound(case, Contract(), exact.p)
    bumped = exact.out + 10 * allow.out * (np.arange(exact.out.size).reshape(exact.out.shape) == 3)

    def target(q, k, v, **kw):
        return bumped.astype(np.float32)

    found = checks.run_case(_numpy_target(target), case, checks=("forward",)).findings
    assert [f.category for f in found] == ["forward"]
    f = found[0]
    assert f.count == 1 and f.index == tuple(int(i) for i in np.unravel_index(3, exact.out.shape))
    assert 9 < f.ratio < 11
    msg = f.message()
    assert "× allowance" in msg and "ulp" in msg and "·u·A with u = 2^-24" in msg
    assert "a plain fp32 implementation (accumulate fp32" in msg and "exact values: naive64 (float64" in msg


def test_bound_covers_fp32_statistics_and_is_not_vacuous():
    """The allowance of a correct fp32-statistics kernel is a few u*A, not a blanket tolerance."""
    case = _case("bf16")
    exact = reference.mp_values(case, "zeros", grad=True)
    allow = tolerance.bound(case, Contract(round_probs=False), exact.p)
    a = mp.attention(case.q, case.k, np.abs(case.v)).out
    ratio = allow.out / (allow.u * a)
    assert 1 <= ratio.min() and ratio.max() < 2  # u*A of rounding plus small fp32 terms
    for name in ("dq", "dk", "dv"):
        assert np.all(allow.grads[name] < 0.1 * np.abs(allow.grad_scales[name]).max() + 1e-30)


def test_flash_rule_policy_runs_and_accepts_the_reference():
    mask = np.random.default_rng(2).random((1, 1, 5, 7)) < 0.6
    out = _run("reference", _case("bf16", mask=mask, mask_kind="random"), policy="naive")
    assert out.findings == []
    assert out.ratios["out"] <= 0.5  # the reference is its own same-dtype reference: error <= err/alpha


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tolerance policy 'loose'"):
        _run("reference", _case(), policy="loose")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_uniform_policy_target_is_judged_by_its_own_policy(dtype):
    mask = np.ones((1, 1, 5, 7), bool)
    mask[..., 1, :] = False
    case = _case(dtype, mask=mask, mask_kind="masked-rows")
    assert _run("uniform_rows", case).findings == []
    assert _run("reference", case).findings == []  # a zeros-policy target on the same case is fine too
    # The uniform target's output judged under the zeros policy: a masked-row finding (out and dq rows),
    # and dv, which the uniform policy spreads g / Lk into, is a grad finding.
    wrong = checks.run_case(load("tests.fixture_targets:uniform_rows", masked_rows="zeros"), case)
    assert {(f.category, f.output) for f in wrong.findings} == {("masked-row", "out"), ("grad", "dv")}


def test_a_target_may_decline_a_case_without_a_finding(monkeypatch):
    from verify.targets import Unsupported

    def picky(q, k, v, *, scale=None, **kw):
        if scale is not None:
            raise Unsupported("picky takes no explicit scale")
        return ft.reference(q, k, v, scale=scale, **kw)

    mod = types.ModuleType("picky_target")
    mod.picky = picky
    monkeypatch.setitem(sys.modules, "picky_target", mod)
    adapter = load("picky_target:picky", framework="numpy")
    out = checks.run_case(adapter, _case(g=False, scale=0.5), checks=("forward",))
    assert out.findings == [] and out.declined == "picky takes no explicit scale"
    assert checks.run_case(adapter, _case(g=False), checks=("forward",)).declined is None


def _rows_case(dtype: str = "fp32") -> Case:
    """Row 1 emptied by the bool mask, row 3 by a -inf bias; the others see keys."""
    mask = np.ones((1, 1, 5, 7), bool)
    mask[..., 1, :] = False
    bias = np.zeros((1, 1, 5, 7), np.float32)
    bias[..., 3, :] = -np.inf
    return _case(dtype, mask=mask, bias=bias, mask_kind="custom")


def test_masked_row_policy_by_mechanism():
    pytest.importorskip("torch")
    case = _rows_case()
    assert checks.run_case(load("tests.fixture_torch_targets:fill_mask"), case).findings == []
    found = checks.run_case(load("tests.fixture_torch_targets:fill_mask", masked_rows="uniform"), case).findings
    assert {(f.category, f.output) for f in found} >= {("masked-row", "out")}
    assert all(f.index[1] == 3 for f in found if f.output == "out")  # the -inf-bias row, not the mask's


def test_an_additive_fill_passes_gradient_that_uniform_allows():
    pytest.importorskip("torch")
    case = _rows_case().with_(bias=None)
    out = checks.run_case(load("tests.fixture_torch_targets:additive_fill"), case)
    assert out.findings == [], "\n".join(f.message() for f in out.findings)
    grads = load("tests.fixture_torch_targets:additive_fill").vjp(case)
    assert np.abs(grads["dq"][0, 1]).max() > 0  # the masked row's dq is not zero, and that is allowed


def test_a_declined_gradient_pass_keeps_the_forward_findings():
    def forward_wrong(q, k, v, **kw):
        return (ft.reference(q, k, v, **kw).astype(np.float64) * 2).astype(q.dtype)

    def declines(q, k, v, g, **kw):
        from verify.targets import Unsupported

        raise Unsupported("no gradient for this case")

    forward_wrong.vjp = declines
    from verify.targets import adapter_for
    from verify.targets.base import TargetInfo

    adapter = adapter_for(forward_wrong, TargetInfo("fw", "numpy", features=frozenset({"grad"})))
    out = checks.run_case(adapter, _case())
    assert out.declined == "no gradient for this case"
    assert [f.category for f in out.findings] == ["forward"]


def test_an_lse_of_minus_inf_on_a_visible_row_is_an_underflow_and_names_no_sink(monkeypatch):
    def lost_row(q, k, v, **kw):
        out, lse = ft.modern_reference(q, k, v, **kw)
        lse = lse.copy()
        lse[0, 0, 1] = -np.inf  # row 1 of head 0 has visible keys: a kernel that took it for an empty row
        return out, lse

    lost_row.attnverify = dict(ft.modern_reference.attnverify, features=["lse"])
    mod = types.ModuleType("lost_row_target")
    mod.lost_row = lost_row
    monkeypatch.setitem(sys.modules, "lost_row_target", mod)
    out = checks.run_case(load("lost_row_target:lost_row"), _case(g=False), checks=("forward",))
    assert [(f.category, f.output) for f in out.findings] == [("underflow", "lse")]
    assert "log 0" in out.findings[0].message() and "overflow" not in out.findings[0].message()

    def empty_posinf(q, k, v, **kw):
        out, lse = ft.modern_reference(q, k, v, **kw)
        return out, np.where(np.isneginf(lse), np.inf, lse)

    empty_posinf.attnverify = dict(ft.modern_reference.attnverify, features=["mask", "lse"])
    mod.empty_posinf = empty_posinf
    mask = np.ones((1, 1, 5, 7), bool)
    mask[..., 2, :] = False
    found = checks.run_case(load("lost_row_target:empty_posinf"), _case(g=False, mask=mask), checks=("forward",))
    assert [(f.category, f.output) for f in found.findings] == [("masked-row", "lse")]
    assert "sink" not in found.findings[0].message()  # the case has no sinks


def _replace_fill(q, k, v, *, bias=None, causal=False, scale=None, **kw):
    """A kernel that replaces masked logits by -0.7 finfo.max after adding the bias (jax.nn.dot_product_attention)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale + bias.astype(np.float64)
    if causal:
        lq, lk = s.shape[-2:]
        s = np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None], s, -0.7 * np.finfo(np.float32).max)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v.astype(np.float64)).astype(q.dtype)


def test_uniform_rows_a_neg_inf_bias_completes_are_declined_and_bias_only_rows_still_checked():
    """Under ``uniform``, which keys a fill reaches in a row a -inf bias completes is the kernel's choice."""
    from verify.strategies import make_case
    from verify.targets import adapter_for
    from verify.targets.base import TargetInfo

    adapter = adapter_for(_replace_fill, TargetInfo("replace_fill", "numpy", features=frozenset({"bias", "causal"}),
                                                    masked_rows="uniform"))
    dims = {"B": 1, "Lq": 4, "Lk": 4, "Hq": 1, "Hkv": 1, "Dk": 3, "Dv": 3}
    case = make_case(3, "fp32", dims=dims, family="normal", features={"bias", "causal"}, grad=False)
    bias = np.zeros((1, 1, 4, 4), np.float32)
    bias[0, 0, 0, 0] = -np.inf  # row 0 sees only key 0 under causal: the bias completes the mask
    completed = checks.run_case(adapter, case.with_(causal=True, bias=bias), checks=("forward",))
    assert completed.declined == policies.UNDEFINED and completed.findings == []
    assert policies.undefined_rows(case.with_(causal=True, bias=bias), "mask:uniform,bias:nan") == 0
    bias[0, 0, 0, :] = -np.inf  # no mask at all: the bias alone empties row 0, whose mean is defined
    alone = checks.run_case(adapter, case.with_(causal=False, bias=bias), checks=("forward",))
    assert alone.declined is None and [f.category for f in alone.findings] == ["masked-row"]
