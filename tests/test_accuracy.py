"""Accuracy sweeps (verify.accuracy): figures against direct computation, outputs, resume, gate, Dask, workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")

from oracles import mp, naive, spec  # noqa: E402
from verify import accuracy, tolerance  # noqa: E402
from verify.commands import main  # noqa: E402
from verify.strategies import make_case  # noqa: E402
from verify.targets import TargetSpec, load  # noqa: E402

TINY = accuracy.Settings(dtypes=("fp32", "bf16"), lengths=(8, 16), query_chunks=("8",), key_chunks=("4", "L"),
                       families=("normal",), masks=("none",), seeds=1)
TORCH = TargetSpec("chunked-torch")
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


FINDINGS = [{"category": "forward", "output": "out", "dtype": "bf16", "family": "normal", "mask_kind": "none",
             "ratio": 12.5, "case_file": "findings/x-forward-out-bf16-0123abcd.npz", "detail": ""}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny")
    rep = accuracy.sweep(TORCH, TINY, out, workers=1)
    rep["findings"] = FINDINGS
    accuracy.write(rep, out)
    return out, rep


def test_plan_respects_declared_features_and_chunk_limits() -> None:
    info = load("chunked-torch").info
    sett = accuracy.Settings(dtypes=("bf16",), lengths=(64,), query_chunks=("16", "L", "128"), key_chunks=("1", "L"),
                           families=("normal",), masks=("none", "causal"))
    cells, skipped = accuracy.plan(info, sett)
    assert {(c["query_chunk"], c["key_chunk"]) for c in cells} == {(16, 64), (64, 64), (128, 64)}
    assert skipped["chunks"] == ["L=64: key chunk 1 (> 16 chunks)"]
    no_chunks = info.__class__(**{**info.__dict__, "features": frozenset({"grad"}), "dtypes": ("fp32",)})
    cells, skipped = accuracy.plan(no_chunks, accuracy.Settings(**{**sett.__dict__, "dtypes": ("bf16", "fp32")}))
    assert [(c["dtype"], c["query_chunk"], c["key_chunk"], c["mask"]) for c in cells] == [("fp32", None, None, "none")]
    assert skipped["dtypes"] == ["bf16"] and skipped["masks"] == ["causal"]


def test_ulp_distance() -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    tiny = float(spec.finfo("bf16").smallest_subnormal)
    a = np.array([1.0, -0.0, tiny, 1.0, 65504.0])
    b = np.array([1.0 + 2.0**-7, 0.0, -tiny, 2.0, 65472.0])
    assert accuracy.ulp_distance(a[:3], b[:3], bf16).tolist() == [1, 0, 2]
    assert accuracy.ulp_distance(a[3:], b[3:], "fp16").tolist() == [1024, 1]
    assert accuracy.ulp_distance(np.array([1.0]), np.array([np.nextafter(1.0, 2.0)]), "fp64").tolist() == [1]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cell_figures_equal_direct_computation(tiny: tuple[Path, dict], dtype: str) -> None:
    _, rep = tiny
    cell = next(c for c in rep["cells"] if c["dtype"] == dtype and c["length"] == 16 and c["key_chunk"] == 4)
    assert cell["reference"] == "mp" and cell["errors"] == 0
    adapter = load("chunked-torch")
    seed = accuracy.data_seed(TINY.seed, dtype, 16, "normal", "none", 0)
    case = make_case(seed, dtype, dims=TINY.dims(16), family="normal", query_chunk_size=8, key_chunk_size=4)
    got = {"out": adapter.forward(case).out, **adapter.vjp(case)}
    exact = mp.attention_vjp(case.q, case.k, case.v, case.g, probs=True)
    scale_a = mp.attention(case.q, case.k, np.abs(case.v)).out  # A = sum p |v|, from its definition
    bound = tolerance.bound(case, adapter.info.contract, exact.p)
    scales = {"out": scale_a, **bound.grad_scales}
    allowed = {"out": bound.out, **bound.grads}
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
        assert figs["max_allow"] == pytest.approx((err / allowed[name]).max(), rel=1e-9)
        assert figs["pass"] is bool(figs["max_allow"] <= 1)
    assert rep["naive64_vs_mp"]["cases"] == len(rep["cells"])
    assert max(rep["naive64_vs_mp"]["max_error_in_A"].values()) < 1e-13


def test_outputs_exist(tiny: tuple[Path, dict]) -> None:
    out, rep = tiny
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == accuracy.SCHEMA_VERSION and len(data["cells"]) == 8
    assert data["target"]["unexercised"] == load("chunked-torch").info.unexercised()
    assert "seconds" not in data["run"] and all("seconds" not in c for c in data["cells"])  # timings apart
    timings = json.loads((out / "timings.json").read_text())
    assert timings["run"]["seconds"] > 0 and set(timings["cells"]) == {c["id"] for c in data["cells"]}
    md = (out / "report.md").read_text()
    assert "## bf16: error in allowances by chunk sizes and length" in md
    assert "| q chunk | k chunk | L=8 (mp) | L=16 (mp) |" in md and "(mp) the exact mpmath oracle" in md
    assert "## Findings of the fuzz campaign" in md and "attnverify repro findings/x-forward-out-bf16" in md
    assert "![" not in md  # no relative image links that break in a PR comment
    assert "![" in accuracy.to_markdown(rep, "https://ci.example/run/7")
    page = (out / "index.html").read_text()
    assert "Findings of the fuzz campaign" in page and "x-forward-out-bf16-0123abcd" in page
    for name in accuracy.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"src='{name}'" in page
    assert len(list((out / "cells").glob("*.json"))) == 8


def test_a_dtype_where_every_call_failed_still_plots(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    """jax-dpa raises on every fp16 call on CPU: its plots get a note there instead of failing the report."""
    _, rep = tiny
    failed = json.loads(json.dumps(rep))
    for cell in failed["cells"]:
        if cell["dtype"] == "bf16":
            for figures in cell["outputs"].values():
                figures.update({k: None for k, v in figures.items() if isinstance(v, float)})
    accuracy.write(failed, tmp_path)
    for name in accuracy.PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fresh_sweep_rewrites_identical_files(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    """Committed reports must not change when nothing changed: report.json and report.md are deterministic."""
    rep = accuracy.sweep(TORCH, TINY, tmp_path, workers=1, fresh=True)
    rep["findings"] = FINDINGS
    accuracy.write(rep, tmp_path)
    for name in ("report.json", "report.md", "index.html"):
        assert (tmp_path / name).read_text() == (tiny[0] / name).read_text(), name


def test_tables_say_pass_or_fail_per_family(tiny: tuple[Path, dict]) -> None:
    rep = tiny[1]
    summary = accuracy.tables(rep)[0]
    assert summary["header"][-1] == "verdict" and {r[-1] for r in summary["rows"]} == {"pass"}
    broken = json.loads(json.dumps(rep))
    broken["cells"][0]["outputs"]["out"].update(max_allow=40.0, **{"pass": False})
    rows = accuracy.tables(broken)[0]["rows"]
    assert any(r[-1] == "FAIL" and "40 ✗" in r[2] for r in rows)


def test_naive64_reference_agrees_with_mp(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    sett = accuracy.Settings(**{**TINY.__dict__, "dtypes": ("fp32",), "lengths": (16,), "mp_max_len": 8})
    rep = accuracy.sweep(TORCH, sett, tmp_path, workers=1)
    by_key = {accuracy.cell_key(c): c for c in tiny[1]["cells"]}
    for cell in rep["cells"]:
        assert cell["reference"] == "naive64"
        for name, figs in cell["outputs"].items():
            # naive64 errs by ~1e-16 A, i.e. ~1e-9 u·A in fp32: figures agree to that
            assert figs["max_norm"] == pytest.approx(by_key[accuracy.cell_key(cell)]["outputs"][name]["max_norm"],
                                                     abs=1e-6)


def test_rerun_resumes(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(tiny[0], out)
    victim = tiny[1]["cells"][3]
    (out / "cells" / f"{victim['id']}.json").unlink()
    rep = accuracy.sweep(TORCH, TINY, out, workers=1)
    assert (rep["run"]["computed"], rep["run"]["reused"]) == (1, 7)
    assert _strip(rep["cells"]) == _strip(tiny[1]["cells"])
    assert accuracy.sweep(TORCH, TINY, out, workers=1)["run"]["computed"] == 0


def _cli(argv: list[str]) -> int:
    return main(["report", "--quiet", *argv])


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
    assert "baseline gate: pass against the baseline" in capsys.readouterr().out
    assert _cli(["--target", "worse_target:attention", "--out", str(tmp_path / "worse"), *common]) == 1
    printed = capsys.readouterr().out
    assert "baseline gate: FAIL" in printed and "bf16 q=8 k=4 L=16 normal mask=none out: max error" in printed
    gated = json.loads((tmp_path / "worse" / "report.json").read_text())["gate"]
    assert {r["output"] for r in gated["regressions"]} >= {"out", "dv"}
    assert all(r["factor"] > 2 for r in gated["regressions"] if r["what"] == "max_norm")
    assert {r["what"] for r in gated["regressions"]} == {"max_norm", "allowance"}  # 20 u·A is beyond allowance
    assert "## Baseline gate" in (tmp_path / "worse" / "report.md").read_text()


def test_gate_floor_nonfinite_and_allowance() -> None:
    def rep(out: float | None, nonfinite: int = 0, passed: bool = True, errors: int = 0) -> dict:
        figs = {"max_norm": out, "nonfinite": nonfinite, "pass": passed, "max_allow": 0.5 if passed else 3.0}
        return {"schema_version": accuracy.SCHEMA_VERSION, "cells": [
            {"dtype": "fp16", "query_chunk": 16, "key_chunk": 1024, "length": 2048, "family": "normal",
             "mask": "none", "softcap": 30.0, "window": [None, 4], "errors": errors, "outputs": {"out": figs}}]}

    gate = accuracy.gate
    assert gate(rep(0.45), rep(0.0))["regressions"] == []  # 0 -> rounding noise
    assert gate(rep(1.0), rep(0.45))["regressions"] == []  # within 2x of the floor
    worse = gate(rep(2.5), rep(1.0), 2.0)["regressions"]
    assert [(r["what"], r["factor"]) for r in worse] == [("max_norm", 2.5)]
    assert accuracy.regression_lines(gate(rep(2.5), rep(1.0)))[0].startswith(
        "fp16 q=16 k=1024 L=2048 normal mask=none softcap=30 window=:4 out: max error 1 -> 2.5")
    assert gate(rep(2.5), rep(1.0), 3.0)["regressions"] == []
    assert [r["what"] for r in gate(rep(1.0, 3), rep(1.0))["regressions"]] == ["nonfinite"]
    assert [r["what"] for r in gate(rep(1.0, passed=False), rep(1.0))["regressions"]] == ["allowance"]
    both = gate(rep(1.0, errors=2), rep(1.0, errors=2))
    assert both["regressions"] == [] and "1 cell(s) have target errors in both" in accuracy.verdict(both)
    with pytest.raises(ValueError, match="schema version 2, this attnverify writes 3: their cells cannot be compared"):
        gate(rep(1.0), {"schema_version": 2, "cells": []})


def test_dask_scheduler_gives_the_same_report(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        rep = accuracy.sweep(TORCH, TINY, tmp_path, scheduler=lc.scheduler_address)
    assert rep["run"]["workers"] == f"dask {lc.scheduler_address}"
    assert _strip(rep["cells"]) == _strip(tiny[1]["cells"])


def test_two_worker_processes_give_the_same_report(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    rep = accuracy.sweep(TORCH, TINY, tmp_path, workers=2)
    assert _strip(rep["cells"]) == _strip(tiny[1]["cells"])


OPTIONS = accuracy.Settings(dtypes=("fp32",), lengths=(8,), families=("normal",), masks=("none",), seeds=1,
                            softcaps=("none", "5"), windows=("none", "2:0"))
COMBOS = [(None, None), (None, [2, 0]), (5.0, None), (5.0, [2, 0])]


def test_option_values_parse_and_undeclared_ones_are_skipped() -> None:
    assert [accuracy.parse_window(w) for w in ("none", "16:0", ":4", "64:", ":")] == [
        None, [16, 0], [None, 4], [64, None], [None, None]]
    assert [accuracy.window_label(accuracy.parse_window(w)) for w in ("16:0", ":4", "64:")] == ["16:0", ":4", "64:"]
    assert accuracy.parse_softcap("none") is None and accuracy.parse_softcap("2.5") == 2.5
    sett = accuracy.Settings(**{**OPTIONS.__dict__, "softcaps": ("none", "5", "5.0"), "windows": ("2:0", "none")})
    cells, skipped = accuracy.plan(load("tests.fixture_targets:modern_reference").info, sett)
    assert [(c["softcap"], c["window"]) for c in cells] == [(None, [2, 0]), (None, None), (5.0, [2, 0]), (5.0, None)]
    assert skipped["softcaps"] == skipped["windows"] == []
    cells, skipped = accuracy.plan(load("tests.fixture_targets:reference").info, sett)
    assert [(c["softcap"], c["window"]) for c in cells] == [(None, None)]
    assert skipped["softcaps"] == ["5"] and skipped["windows"] == ["2:0"]


def test_softcap_and_window_sweep(tmp_path: Path) -> None:
    """Every combination runs on the same inputs and gets its own table; a plain target gets a skip note."""
    target = "tests.fixture_targets:modern_reference"
    rep = accuracy.sweep(TargetSpec(target), OPTIONS, tmp_path / "modern", workers=1)
    accuracy.write(rep, tmp_path / "modern")
    assert [(c["softcap"], c["window"]) for c in rep["cells"]] == COMBOS
    assert all(f["pass"] for c in rep["cells"] for f in c["outputs"].values())
    assert len({c["outputs"]["out"]["max_abs"] for c in rep["cells"]}) == 4  # softcap and window were applied
    # the same q, k, v, mask and g in every row: what make_case gives for the seed with no option at all
    seed = accuracy.data_seed(OPTIONS.seed, "fp32", 8, "normal", "none", 0)
    plain = make_case(seed, "fp32", dims=OPTIONS.dims(8), family="normal", features=load(target).info.features)
    assert {(s["data_seed"], s["inputs"]) for c in rep["cells"] for s in c["seeds"]} == {
        (seed, accuracy.inputs_digest(plain))}
    assert accuracy.inputs_digest(plain) != accuracy.inputs_digest(plain.with_(q=plain.q * 2))
    md = (tmp_path / "modern" / "report.md").read_text()
    assert "softcaps none,5; windows none,2:0" in md and "not run" not in md
    assert "## Summary by dtype and softcap" in md and "| fp32 | 5 | " in md
    assert "## Summary by dtype and window" in md and "| fp32 | 2:0 | " in md
    assert "worst over chunk sizes, lengths, masks, softcaps and windows" in md

    rep = accuracy.sweep(TargetSpec("tests.fixture_targets:reference"), OPTIONS, tmp_path / "plain", workers=1)
    accuracy.write(rep, tmp_path / "plain")
    assert [(c["softcap"], c["window"]) for c in rep["cells"]] == [(None, None)]
    md = (tmp_path / "plain" / "report.md").read_text()
    assert "- not run (undeclared or too many chunks): softcaps 5; windows 2:0" in md
    assert "by dtype and softcap" not in md and "by dtype and window" not in md


def test_sweep_catches_a_wrong_softcap_in_its_rows_only(tmp_path: Path) -> None:
    """c·tanh(s) instead of c·tanh(s/c): the softcap rows fail far beyond the allowance, the others pass."""
    rep = accuracy.sweep(TargetSpec("tests.fixture_targets:wrong_softcap"), OPTIONS, tmp_path, workers=1)
    assert [(c["softcap"], c["window"]) for c in rep["cells"]] == COMBOS
    for cell in rep["cells"]:
        out = cell["outputs"]["out"]
        if cell["softcap"] is None:
            assert out["pass"] and out["max_allow"] < 1
        else:
            assert not out["pass"] and out["max_allow"] > 100
    table = next(t for t in accuracy.tables(rep) if t["title"] == "Summary by dtype and softcap")
    assert [(r[1], r[-1]) for r in table["rows"]] == [("none", "pass"), ("5", "FAIL")]


@pytest.mark.parametrize(("flags", "message"), [
    (["--softcaps", "none,x"], "softcap 'x': give a finite number > 0 or none"),
    (["--softcaps", "0"], "softcap '0': give a finite number > 0 or none"),
    (["--windows", "none,3"], "window '3': give LEFT:RIGHT (ints >= 0, an empty side unbounded"),
    (["--windows", "4:0:1"], "window '4:0:1': give LEFT:RIGHT"),
])
def test_bad_softcaps_and_windows_are_one_line_errors(flags: list[str], message: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert _cli(["--target", "tests.fixture_targets:modern_reference", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "cells").exists()


def test_the_default_sweep_measures_error_against_rescalings(tmp_path: Path) -> None:
    assert "rising" in accuracy.Settings().families
    sett = accuracy.Settings(**{**TINY.__dict__, "dtypes": ("fp32",), "families": ("rising",)})
    rep = accuracy.sweep(TORCH, sett, tmp_path, workers=1)
    by_chunks = [t for t in accuracy.tables(rep) if "by number of key chunks" in t["title"]]
    assert by_chunks and any("rescalings" in note for note in by_chunks[0]["notes"])
    assert by_chunks[0]["header"] == ["family", "1 chunk", "2 chunks", "4 chunks"]  # L=8, 16 in chunks of 4 and L


def test_seeds_whose_rows_have_no_single_answer_are_declined(tmp_path: Path) -> None:
    """Under ``uniform``, a row that a -inf bias empties after the window hid its other keys has two right
    answers (replace or add the fill): such a seed is declined and counted, as campaigns do, never failed."""
    from verify import policies

    target = TargetSpec("tests.fixture_targets:uniform_rows", features=("mask", "bias", "causal", "window"))
    sett = accuracy.Settings(dtypes=("fp32",), lengths=(8,), families=("normal",), masks=("bias-inf",), seeds=6,
                             windows=("none", "0:0"))
    rep = accuracy.sweep(target, sett, tmp_path, workers=1)
    accuracy.write(rep, tmp_path)
    info = target.load().info
    declined = 0
    for cell in rep["cells"]:
        for s in cell["seeds"]:
            case = make_case(s["data_seed"], "fp32", dims=sett.dims(8), family="normal", mask_kind="bias-inf",
                             features=info.features, grad=False, window=cell["window"])
            undefined = policies.undefined_rows(case, info.masked_rows) > 0
            assert ("declined" in s) == undefined and ("outputs" in s) != undefined
            declined += undefined
        assert cell.get("declined", 0) == sum("declined" in s for s in cell["seeds"])
        assert all(f["pass"] for f in cell["outputs"].values())
    assert declined > 0 and any(c["window"] is None and "declined" not in c for c in rep["cells"])
    assert f"{declined} seed(s) not run: " in (tmp_path / "report.md").read_text()
