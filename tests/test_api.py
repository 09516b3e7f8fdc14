"""The public API: assert_attention_close on torch, jax and numpy arrays, with the strategies in @given."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import verify
from verify import assert_attention_close, strategies
from verify.targets import load

FEATURES = {"mask", "bias", "causal", "chunks"}


def test_public_surface_is_small_and_explicit():
    assert verify.__all__ == ["assert_attention_close", "strategies"]


def _run(adapter, case):
    res = adapter.forward(case)
    return res.out


def test_a_correct_result_passes_and_a_wrong_one_raises_with_the_finding():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(1)
    q, k, v = (r.standard_normal(s).astype(np.float32) for s in ((1, 5, 2, 4), (1, 7, 2, 4), (1, 7, 2, 3)))
    out = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)),
                                                           is_causal=True).transpose(1, 2)
    assert_attention_close(out, torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), causal=True,
                           dtype_contract={"accumulate": "fp32", "round_logits": False, "round_probs": False})
    with pytest.raises(AssertionError, match=r"FAIL forward · attention · fp32") as exc:
        assert_attention_close(out, q, k, v, causal=False)  # numpy arrays work too
    assert "× allowance" in str(exc.value) and "exact values:" in str(exc.value)


def test_jax_arrays_and_gradients():
    jnp = pytest.importorskip("jax.numpy")
    from verify.targets import chunked_jax

    r = np.random.default_rng(2)
    q, k, v, g = (r.standard_normal(s).astype(np.float32) for s in ((1, 4, 1, 3), (1, 6, 1, 3), (1, 6, 1, 2),
                                                                      (1, 4, 1, 2)))
    import jax

    out, back = jax.vjp(lambda a, b, c: chunked_jax.attention(a, b, c, key_chunk_size=4), jnp.asarray(q),
                        jnp.asarray(k), jnp.asarray(v))
    dq, dk, dv = back(jnp.asarray(g))
    assert_attention_close(out, q, k, v, grads={"dq": dq, "dk": dk, "dv": dv}, g=g,
                           dtype_contract={"accumulate": "fp32", "round_logits": False, "round_probs": False})
    with pytest.raises(AssertionError, match="FAIL grad"):
        assert_attention_close(out, q, k, v, grads={"dq": dq * 2, "dk": dk, "dv": dv}, g=g)


def test_bad_arguments_are_clear_errors():
    q = np.zeros((1, 2, 1, 2), np.float32)
    with pytest.raises(TypeError, match="unknown keywords \\['causual'\\]"):
        assert_attention_close(q, q, q, q, causual=True)
    with pytest.raises(TypeError, match="cotangent g"):
        assert_attention_close(q, q, q, q, grads={"dq": q})


def test_the_strategies_drive_a_users_own_given_test_and_catch_a_bug():
    pytest.importorskip("torch")
    from tests.mutants import BASE, MUTANTS
    from verify.targets import adapter_for

    def property_test(fn):
        adapter = adapter_for(fn, BASE.info())

        @settings(max_examples=60, deadline=None, derandomize=True, database=None)
        @given(strategies.cases(features=FEATURES, dtypes=("fp32",), max_len=17, grad=False))
        def check(case):
            assert_attention_close(_run(adapter, case), case.q, case.k, case.v, mask=case.mask, bias=case.bias,
                                   scale=case.scale, causal=case.causal)

        check()

    property_test(BASE.fn)
    with pytest.raises(AssertionError, match="FAIL forward"):
        property_test(MUTANTS["causal_strict"].fn)
    assert load("chunked-torch")  # the harness's own targets load beside a user's test


_EXPORTED = {  # framework: (buggy target, its fixed counterpart, fuzz flags)
    "torch": ("tests.fixture_torch_targets:causal_strict", "fill_mask", ["--framework", "torch", "--features",
                                                                          "mask,causal,grad"]),
    "numpy": ("tests.fixture_targets:two_bugs", "reference", []),
    "jax": ("tests.fixture_jax_targets:drops_last_key", "correct", ["--framework", "jax", "--features", "grad"]),
}


@pytest.mark.parametrize("framework", sorted(_EXPORTED))
def test_export_writes_a_standalone_test_that_fails_on_the_bug_and_passes_on_the_fix(framework, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from verify.commands import main

    pytest.importorskip(framework)
    target, fixed, flags = _EXPORTED[framework]
    js = tmp_path / "camp.json"
    assert main(["fuzz", "--target", target, *flags, "--dtypes", "fp32", "--max-examples", "60", "--no-database",
                 "--repro-dir", str(tmp_path / "f"), "--json", str(js), "--quiet", "--in-process"]) == 1
    case_file = json.loads(js.read_text())["findings"][0]["case_file"]
    test = tmp_path / "test_repro.py"
    assert main(["export", case_file, "--out", str(test)]) == 0
    text = test.read_text()
    assert "import verify" not in text and "from verify" not in text  # standalone: numpy + the framework

    def pytest_on(path: Path) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                               "no:attnverify", str(path)], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=300)

    res = pytest_on(test)
    assert res.returncode == 1 and "elements beyond their allowance" in res.stdout, res.stdout + res.stderr
    module, _, function = target.partition(":")
    fixed_test = tmp_path / "test_fixed.py"
    fixed_test.write_text(text.replace(f"from {module} import {function} as", f"from {module} import {fixed} as"))
    res = pytest_on(fixed_test)
    assert res.returncode == 0, res.stdout + res.stderr
