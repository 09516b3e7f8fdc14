"""chunked-torch with today's options, each alone and combined, against the mp oracle under the error model.

Every case goes through ``verify.checks.run_case`` (forward, lse and every gradient compared with
the exact values, each element within the allowance a correct fp32-statistics kernel has): a
correct kernel gives no finding. Chunk sizes 1, a non-divisor and >= L exercise the key-chunk
skipping of causal and window rows; Lq != Lk both ways exercises bottom-right alignment, with
empty rows when Lq > Lk.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from oracles import spec  # noqa: E402
from verify import checks  # noqa: E402
from verify.case import Case  # noqa: E402
from verify.targets import load  # noqa: E402

OPTIONS = {
    "bottom-right": {"causal": True, "align": "bottom-right"},
    "window": {"window": (2, 1)},
    "window-left-only": {"window": (1, None), "causal": True},
    "window-beyond": {"window": (None, 40)},
    "window-diagonal": {"window": (0, 0)},
    "softcap-1": {"softcap": 1.0},
    "softcap-50": {"softcap": 50.0},
    "alibi": {"alibi": (2,)},
    "alibi-batch": {"alibi": (2, 2)},
    "sinks": {"sinks": "mild"},
    "sinks-dominant": {"sinks": "dominant"},
    "sinks-minus-inf": {"sinks": "-inf"},
    "segments": {"segments": True},
    "everything": {"causal": True, "align": "bottom-right", "window": (3, 2), "softcap": 20.0, "alibi": (2,),
                   "sinks": "mild", "segments": True, "bias": True},
}


def _case(rng: np.random.Generator, dtype: str, lq: int, lk: int, opts: dict, chunks: tuple) -> Case:
    dt = spec.as_dtype(dtype)
    b, hq, hkv, d = 2, 2, 1, 4

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32).astype(dt)

    kw: dict = {k: v for k, v in opts.items() if k in ("causal", "align", "window", "softcap")}
    if "alibi" in opts:
        kw["alibi_slopes"] = (rng.random(opts["alibi"]) * 0.3).astype(np.float32)
    if "sinks" in opts:
        how = opts["sinks"]
        value = {"mild": rng.standard_normal(hq) * 2, "dominant": np.full(hq, 30.0), "-inf": np.full(hq, -np.inf)}
        kw["sinks"] = value[how].astype(dt)
    if opts.get("segments"):
        kw["q_segment_ids"] = (np.arange(lq)[None] * 3 // max(lq, 1) + np.zeros((b, 1), int)).astype(np.int32)
        kw["kv_segment_ids"] = (np.arange(lk)[None] * 3 // max(lk, 1) + np.zeros((b, 1), int)).astype(np.int32)
    if opts.get("bias"):
        kw["bias"] = arr(b, 1, lq, lk)
    return Case(arr(b, lq, hq, d), arr(b, lk, hkv, d), arr(b, lk, hkv, 3), g=arr(b, lq, hq, 3),
                g_lse=rng.standard_normal((b, hq, lq)).astype(np.float64 if dtype == "fp64" else np.float32),
                query_chunk_size=chunks[0], key_chunk_size=chunks[1], **kw)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize(("lq", "lk"), [(7, 7), (3, 11), (11, 3)])
@pytest.mark.parametrize("chunks", [(None, None), (1, 1), (4, 3), (16, 16)])
def test_chunked_torch_options_have_no_findings(name, lq, lk, chunks):
    rng = np.random.default_rng(abs(hash((name, lq, lk, chunks))) % 2**32)
    case = _case(rng, "fp32", lq, lk, OPTIONS[name], chunks)
    out = checks.run_case(load("chunked-torch"), case)
    assert out.findings == [], "\n\n".join(f.message() for f in out.findings)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp64"])
def test_chunked_torch_everything_in_each_dtype(dtype):
    rng = np.random.default_rng(11)
    case = _case(rng, dtype, 9, 13, OPTIONS["everything"], (4, 5))
    out = checks.run_case(load("chunked-torch"), case)
    assert out.findings == [], "\n\n".join(f.message() for f in out.findings)
    assert set(out.ratios) == {"out", "lse", "dq", "dk", "dv", "dbias", "dsinks"}


def test_a_minus_inf_sink_is_exactly_no_sink():
    rng = np.random.default_rng(3)
    case = _case(rng, "fp32", 5, 6, {"sinks": "-inf", "causal": True}, (2, 4))
    adapter = load("chunked-torch")
    with_sink, without = adapter.forward(case), adapter.forward(case.with_(sinks=None))
    assert np.array_equal(with_sink.out, without.out) and np.array_equal(with_sink.lse, without.lse)


def test_bottom_right_with_more_queries_than_keys_leaves_empty_rows():
    rng = np.random.default_rng(4)
    case = _case(rng, "fp32", 11, 3, OPTIONS["bottom-right"], (4, 2))
    res = load("chunked-torch").forward(case)
    assert (res.out[:, :8] == 0).all() and np.isneginf(res.lse[:, :, :8]).all()  # rows 0..7 see no key
    assert np.isfinite(res.lse[:, :, 8:]).all()
