"""``attnverify memory``: XLA buffer accounting, exponents in L, chunk-size dependence, the command.

JAX figures are compile-only (XLA's memory analysis), so long lengths cost seconds. Shapes B=1, H=1,
D=64, float32 unless a test says otherwise.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from verify import memory
from verify.memory.analysis import chunk_model, exponents, fit_exponent
from verify.memory.measure import Row, measure, parse_policies, result_shaped_temp_bytes, shape_key
from verify.memory.render import _sign_note
from verify.targets import TargetSpec

pytest.importorskip("jax")


def _measure(name: str, lengths: list[int], policies: str | list, **kw) -> list[Row]:
    pols = parse_policies(policies) if isinstance(policies, str) else policies
    return measure(TargetSpec(name).load(), lengths, pols, **kw)

ASSIGNMENT = """BufferAssignment:
allocation 0: size 1024, maybe-live-out:
 value: <1 while.1{1} (phi) @0> (size=1024,offset=0): f32[1,16,1,16]{3,2,1,0}
allocation 1: size 1024, parameter 0, shape |f32[1,16,1,16]| at ShapeIndex {}:
 value: <2 q.1 @0> (size=1024,offset=0): f32[1,16,1,16]{3,2,1,0}
allocation 2: size 3000, preallocated-temp:
 value: <3 stacked @0> (size=1024,offset=0): f32[4,1,4,1,16]{4,3,2,1,0}
 value: <4 acc @0> (size=1024,offset=1024): f32[16,16]{1,0}
 value: <5 acc.t @0> (size=1024,offset=1024): f32[1,1,16,16]{3,2,1,0}
 value: <6 acc32 @0> (size=512,offset=2048): bf16[1,16,1,16]{3,2,1,0}
 value: <7 tuple @0> (size=16,offset=2600): (f32[16,16], s32[])
"""


def _exponent(rows: list[Row], pass_: str, measure_name: str) -> float:
    (e,) = [x["exponent"] for x in exponents(rows) if x["pass"] == pass_ and x["measure"] == measure_name]
    return e


def test_result_shaped_temp_bytes_counts_each_range_once() -> None:
    keys = {shape_key((1, 16, 1, 16))}
    # acc and its transpose share [1024, 2048); the bf16 array of a result's shape counts; the stacked
    # [4, 4, 16] staging buffer and the parameter / live-out allocations do not
    assert result_shaped_temp_bytes(ASSIGNMENT, keys) == 1024 + 512
    assert result_shaped_temp_bytes(ASSIGNMENT, {shape_key((4, 4, 16))}) == 1024
    assert result_shaped_temp_bytes("allocation 0: size 4, constant:\n", keys) is None


def test_fit_exponent_of_a_power_law() -> None:
    lengths = [1024, 4096, 16384]
    assert fit_exponent(lengths, [3 * n**0.5 for n in lengths]) == pytest.approx(0.5)
    assert fit_exponent([1024], [5]) is None


def test_chunked_jax_sqrt_key_chunk_grows_like_sqrt_length() -> None:
    """Paper policy (query chunk 1024 fixed, key chunk sqrt(L)): the exponent of temp beyond the results.

    Memory is ~ query_chunk * (a + b * sqrt(L)); the L-independent part a (query chunk and its
    accumulators, ~490 B per query row at D=64) keeps the fitted exponent at 0.23 over L = 1024..65536,
    so the slope is measured where b * sqrt(L) dominates (L = 16384..262144): 0.40 forward, 0.44
    fwd+bwd. The fwd+bwd *total* temp has exponent ~0.9: per query chunk, autodiff builds dk and dv
    partials of full length L (two O(L * D) result-shaped temporaries), which ``beyond`` leaves out.
    """
    rows = _measure("chunked-jax", [16384, 65536, 262144], "1024xsqrt")
    assert 0.35 <= _exponent(rows, "forward", "beyond") <= 0.75
    assert 0.35 <= _exponent(rows, "fwd+bwd", "beyond") <= 0.75
    fwd = [r for r in rows if r.pass_ == "forward"]
    assert all(r.temp == r.beyond for r in fwd), "the forward holds no result-shaped temporary"
    assert _exponent(rows, "fwd+bwd", "temp") > 0.8


def test_chunked_jax_fixed_chunks_forward_memory_is_flat_in_length() -> None:
    """Both chunks fixed: no O(L) temporary in the forward (a stacked [chunks, ...] output would be one)."""
    rows = _measure("chunked-jax", [1024, 4096, 16384], "64x64", passes=("forward",))
    assert abs(_exponent(rows, "forward", "temp")) < 0.05
    assert max(r.temp for r in rows) < 0.2 * 2**20


def test_dense_reference_grows_like_length_squared() -> None:
    rows = _measure("jax-dpa", [4096, 16384, 65536], [])
    for pass_ in memory.PASSES:
        for measure_name in ("temp", "beyond"):
            assert 1.8 <= _exponent(rows, pass_, measure_name) <= 2.2, (pass_, measure_name)


def test_temp_is_about_linear_in_the_query_chunk() -> None:
    """At L = 4096 and key chunk 64: query chunk 64 -> 256 -> 1024 multiplies memory by ~3 each time."""
    rows = _measure("chunked-jax", [4096], "64x64,256x64,1024x64")
    for pass_ in memory.PASSES:
        values = [r.beyond for r in rows if r.pass_ == pass_]
        assert values == sorted(values), (pass_, values)
        assert 8 <= values[-1] / values[0] <= 16, (pass_, values)  # x16 query chunk; 16 would be exactly linear


def test_memory_run_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    sett = memory.Settings(lengths=(1024, 4096), policies="64x64", query_chunks=(64, 256),
                           key_chunks=(32, 64, 128, 256))
    doc = memory.run(TargetSpec("chunked-jax"), sett, tmp_path)
    assert doc == json.loads((tmp_path / "memory.json").read_text())
    assert set(doc["measures"]) == {"temp", "beyond"}
    assert {r["target"] for r in doc["rows"]} == {"chunked-jax", "jax-dpa"}
    assert {r["pass"] for r in doc["ratios"]} == set(memory.PASSES)
    assert all(r["length"] == 4096 and r["ratio"] > 1 for r in doc["ratios"])
    md = (tmp_path / "memory.md").read_text()
    for r in doc["ratios"]:  # every measured ratio is in the table, next to the paper's figure
        assert f"| {r['pass']} | {r['policy']} | 4096 | {r['measure']} |" in md and f"{r['ratio']:.1f}x" in md
    assert "seed.md" not in md and "seconds" not in doc
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = memory.summary(doc)
    assert len(lines) < 20 and any("dense / chunked" in x for x in lines)


def test_memory_command_accepts_user_target_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from verify.commands import main

    code = main(["memory", "--target", "verify.targets.chunked_jax:attention", "--framework", "jax", "--features",
                 "chunks,grad", "--lengths", "1024", "--policies", "64x64", "--reference", "none", "--query-chunks",
                 "64", "--key-chunks", "32,64,128,256", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) < 12 and "memory.md" in printed


def test_negative_fitted_coefficient_is_explained() -> None:
    rows = [Row("t", "forward", f"k-sweep 1024x{k}", 1024, k, 16384, 1000 + 8 * 1024 * k - 5 * (16384 // k), None, 0)
            for k in (32, 64, 128, 256, 512)]
    model = chunk_model(rows)
    assert model["C"] < 0 and "absent" in _sign_note(model)
    assert _sign_note({**model, "C": 1.0}) == ""


def test_torch_peak_dense_quadratic_chunked_flat() -> None:
    pytest.importorskip("torch")
    dense = _measure("torch-sdpa", [256, 1024], [], passes=("forward",))
    chunked = _measure("chunked-torch", [256, 1024], "64x64", passes=("forward",))
    assert 1.8 <= _exponent(dense, "forward", "temp") <= 2.2
    assert abs(_exponent(chunked, "forward", "temp")) < 0.1
    assert all(r.beyond is None for r in dense + chunked)


def test_beyond_is_measured_when_the_persistent_cache_already_holds_the_program(tmp_path: Path) -> None:
    """JAX decides once per process whether it uses its persistent cache; once it does, turning the
    config off changed nothing, so a program compiled before (an earlier test, an earlier run) came
    from the cache without a dump and ``beyond`` was None."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.compilation_cache import compilation_cache

    m = importlib.import_module("verify.memory.measure")  # the module (verify.memory.measure is also a function)

    def dense(q, k, v):
        return jnp.einsum("bqhk,bkhd->bqhd", jax.nn.softmax(jnp.einsum("bqhd,bkhd->bqhk", q, k), axis=-1), v)

    saved = {n: getattr(jax.config, n) for n in ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
                                                 "jax_persistent_cache_min_compile_time_secs")}
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()
        jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()  # the process now uses the cache
        first = m._jax_bytes(dense, "cpu", (1, 256, 1, 32), jnp.float32, "forward")
        m._XLA_MEMO.clear()
        again = m._jax_bytes(dense, "cpu", (1, 256, 1, 32), jnp.float32, "forward")
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
    assert first[1] is not None and again == first
