"""Accuracy sweeps (verify.report): figures against direct computation, outputs, resume, gate, Dask, workers."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")

from oracles import mp, naive, spec  # noqa: E402
from verify import report, tolerance  # noqa: E402
from verify.strategies import make_case  # noqa: E402
from verify.targets import load  # noqa: E402

TINY = report.Settings(dtypes=("fp32", "bf16"), lengths=(8, 16), query_chunks=("8",), key_chunks=("4", "L"),
                       families=("normal",), masks=("none",), seeds=1)
TORCH = report.TargetSpec("chunked-torch")
WORSE = '''
import torch
from verify.targets.chunked_torch import attention as _attention

U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def attention(q, k, v, **kw):
    """chunked-torch plus 20 u·A: a deliberately worsened implementation."""
    return _attention(q, k, v, **kw) + 20 * U[q.dtype] * _attention(q, k, v.abs(), **kw)


def unchanged(q, k, v, **kw):
    return _attention(q, k, v, **kw)
'''


def _strip(cells: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "seconds"} for c in cells]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny")
    rep = report.sweep(TORCH, TINY, out, workers=1, progress=False)
    report.write(rep, out)
    return out, rep


def test_plan_respects_declared_features_and_chunk_limits() -> None:
    info = load("chunked-torch").info
    sett = report.Settings(dtypes=("bf16",), lengths=(64,), query_chunks=("16", "L", "128"), key_chunks=("1", "L"),
                           families=("normal",), masks=("none", "causal"))
    cells, skipped = report.plan(info, sett)
    assert {(c["query_chunk"], c["key_chunk"]) for c in cells} == {(16, 64), (64, 64), (128, 64)}
    assert skipped["chunks"] == ["L=64: key chunk 1 (> 16 chunks)"]
    no_chunks = info.__class__(**{**info.__dict__, "features": frozenset({"grad"}), "dtypes": ("fp32",)})
    cells, skipped = report.plan(no_chunks, report.Settings(**{**sett.__dict__, "dtypes": ("bf16", "fp32")}))
    assert [(c["dtype"], c["query_chunk"], c["key_chunk"], c["mask"]) for c in cells] == [("fp32", None, None, "none")]
    assert skipped["dtypes"] == ["bf16"] and skipped["masks"] == ["causal"]


def test_ulp_distance() -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    tiny = float(spec.finfo("bf16").smallest_subnormal)
    a = np.array([1.0, -0.0, tiny, 1.0, 65504.0])
    b = np.array([1.0 + 2.0**-7, 0.0, -tiny, 2.0, 65472.0])
    assert report.ulp_distance(a[:3], b[:3], bf16).tolist() == [1, 0, 2]
    assert report.ulp_distance(a[3:], b[3:], "fp16").tolist() == [1024, 1]
    assert report.ulp_distance(np.array([1.0]), np.array([np.nextafter(1.0, 2.0)]), "fp64").tolist() == [1]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cell_figures_equal_direct_computation(tiny: tuple[Path, dict], dtype: str) -> None:
    _, rep = tiny
    cell = next(c for c in rep["cells"] if c["dtype"] == dtype and c["length"] == 16 and c["key_chunk"] == 4)
    assert cell["reference"] == "mp" and cell["errors"] == 0
    adapter = load("chunked-torch")
    seed = report.data_seed(TINY.seed, dtype, 16, "normal", "none", 0)
    case = make_case(seed, dtype, dims=TINY.dims(16), family="normal", query_chunk_size=8, key_chunk_size=4)
    got = {"out": adapter.forward(case), **adapter.vjp(case)}
    exact = mp.attention_vjp(case.q, case.k, case.v, case.g, probs=True)
    scale_a = mp.attention(case.q, case.k, np.abs(case.v)).out  # A = sum p |v|, from its definition
    scales = {"out": scale_a, **tolerance.bound(case, adapter.info.contract, exact.p).grad_scales}
    c = adapter.info.contract
    same = naive.attention_vjp(case.q, case.k, case.v, case.g, dtype=dtype, accumulate=c.accumulate,
                               round_logits=c.round_logits, round_probs=c.round_probs)
    u = spec.unit_roundoff(dtype)
    uint = np.uint16 if dtype == "bf16" else np.uint32
    for name in ("out", "dq", "dk", "dv"):
        want = getattr(exact, name)
        err = np.abs(got[name].astype(np.float64) - want)
        norm = err / (u * scales[name])
        rounded = naive.round_to_dtype(want, dtype).astype(spec.as_dtype(dtype))
        g_bits, w_bits = got[name].view(uint).astype(np.int64), rounded.view(uint).astype(np.int64)
        same_sign = (g_bits >> (8 * np.dtype(uint).itemsize - 1)) == (w_bits >> (8 * np.dtype(uint).itemsize - 1))
        naive_norm = np.abs(getattr(same, name) - want) / (u * scales[name])
        figs = cell["outputs"][name]
        assert figs["max_norm"] == pytest.approx(norm.max(), rel=1e-9)
        assert figs["median_norm"] == pytest.approx(np.median(norm), rel=1e-9)
        assert figs["max_abs"] == pytest.approx(err.max(), rel=1e-12)
        if same_sign.all():  # then the ulp distance is the difference of the bit patterns
            assert figs["max_ulp"] == int(np.abs(g_bits - w_bits).max())
        assert figs["nonfinite"] == 0 and figs["n"] == want.size
        assert figs["naive_max_norm"] == pytest.approx(naive_norm.max(), rel=1e-9)
        assert figs["ratio"] == pytest.approx(norm.max() / naive_norm.max(), rel=1e-9)
    assert rep["naive64_vs_mp"]["cases"] == len(rep["cells"])
    assert max(rep["naive64_vs_mp"]["max_error_in_A"].values()) < 1e-13


def test_outputs_exist(tiny: tuple[Path, dict]) -> None:
    out, rep = tiny
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == report.SCHEMA_VERSION and len(data["cells"]) == 8
    assert data["target"]["unexercised"] == ["lse"]
    md = (out / "report.md").read_text()
    assert "## bf16" in md and "| q chunk | k chunk | L=8 (mp) | L=16 (mp) |" in md
    page = (out / "index.html").read_text()
    for name in report.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"src='{name}'" in page
    assert len(list((out / "cells").glob("*.json"))) == 8


def test_naive64_reference_agrees_with_mp(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    sett = report.Settings(**{**TINY.__dict__, "dtypes": ("fp32",), "lengths": (16,), "mp_max_len": 8})
    rep = report.sweep(TORCH, sett, tmp_path, workers=1, progress=False)
    by_key = {report.cell_key(c): c for c in tiny[1]["cells"]}
    for cell in rep["cells"]:
        assert cell["reference"] == "naive64"
        for name, figs in cell["outputs"].items():
            # naive64 errs by ~1e-16 A, i.e. ~1e-9 u·A in fp32: figures agree to that
            assert figs["max_norm"] == pytest.approx(by_key[report.cell_key(cell)]["outputs"][name]["max_norm"],
                                                     abs=1e-6)


def test_rerun_resumes(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(tiny[0], out)
    victim = tiny[1]["cells"][3]
    (out / "cells" / f"{victim['id']}.json").unlink()
    rep = report.sweep(TORCH, TINY, out, workers=1, progress=False)
    assert (rep["run"]["computed"], rep["run"]["reused"]) == (1, 7)
    assert _strip(rep["cells"]) == _strip(tiny[1]["cells"])
    assert report.sweep(TORCH, TINY, out, workers=1, progress=False)["run"]["computed"] == 0


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers(dest="command"))
    return report.run(parser.parse_args(["report", *argv]))


def test_gate_fails_worse_implementation_and_passes_unchanged(
    tiny: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "worse_target.py").write_text(WORSE)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--framework", "torch", "--features", "chunks,grad", "--target-dtypes", "fp32,bf16",
              "--dtypes", "fp32,bf16", "--lengths", "8,16", "--query-chunks", "8", "--key-chunks", "4,L",
              "--families", "normal", "--masks", "none", "--seeds", "1", "--workers", "1",
              "--baseline", str(tiny[0] / "report.json")]
    assert _cli(["--target", "worse_target:unchanged", "--out", str(tmp_path / "same"), *common]) == 0
    assert "baseline gate: pass (8 cells compared" in capsys.readouterr().out
    assert _cli(["--target", "worse_target:attention", "--out", str(tmp_path / "worse"), *common]) == 1
    printed = capsys.readouterr().out
    assert "baseline gate: FAIL" in printed and "bf16 q=8 k=4 L=16 normal mask=none out: max error" in printed
    gated = json.loads((tmp_path / "worse" / "report.json").read_text())["gate"]
    assert {r["output"] for r in gated["regressions"]} >= {"out", "dv"}
    assert all(r["factor"] > 2 for r in gated["regressions"])
    assert "## Baseline gate" in (tmp_path / "worse" / "report.md").read_text()


def test_gate_floor_and_nonfinite() -> None:
    def rep(out: float | None, nonfinite: int = 0) -> dict:
        figs = {"max_norm": out, "nonfinite": nonfinite}
        return {"schema_version": report.SCHEMA_VERSION, "cells": [
            {"dtype": "fp16", "query_chunk": 16, "key_chunk": 1024, "length": 2048, "family": "normal",
             "mask": "none", "errors": 0, "outputs": {"out": figs}}]}

    assert report.gate(rep(0.45), rep(0.0))["regressions"] == []  # 0 -> rounding noise
    assert report.gate(rep(1.0), rep(0.45))["regressions"] == []  # within 2x of the floor
    worse = report.gate(rep(2.5), rep(1.0), 2.0)["regressions"]
    assert [(r["what"], r["factor"]) for r in worse] == [("max_norm", 2.5)]
    assert report.gate(rep(2.5), rep(1.0), 3.0)["regressions"] == []
    assert [r["what"] for r in report.gate(rep(1.0, 3), rep(1.0))["regressions"]] == ["nonfinite"]
    with pytest.raises(ValueError, match="schema version"):
        report.gate(rep(1.0), {"schema_version": 0, "cells": []})


def test_dask_scheduler_gives_the_same_report(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        rep = report.sweep(TORCH, TINY, tmp_path, scheduler=lc.scheduler_address, progress=False)
    assert rep["run"]["workers"] == f"dask {lc.scheduler_address}"
    assert _strip(rep["cells"]) == _strip(tiny[1]["cells"])


def test_two_worker_processes_give_the_same_report(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    rep = report.sweep(TORCH, TINY, tmp_path, workers=2, progress=False)
    assert _strip(rep["cells"]) == _strip(tiny[1]["cells"])
