"""Small numpy targets for the harness's own tests: one correct reference and one per failure mode.

Each is importable as ``tests.fixture_targets:NAME`` (from the repository root) and carries its
metadata in ``fn.attnverify``, so the CLI needs no other flags.
"""

from __future__ import annotations

import ctypes
import os
import time

import numpy as np

from oracles import naive

_CONTRACT = {"accumulate": "fp32", "round_logits": True, "round_probs": True}


def _meta(fn, features=("mask", "bias", "causal", "gqa", "grad")):
    fn.attnverify = {"framework": "numpy", "features": list(features), "contract": _CONTRACT}
    return fn


def _same_dtype(q, k, v, *, return_lse=False, **kw):
    r = naive.attention(q, k, v, dtype=q.dtype, **kw)
    out = r.out.astype(q.dtype)
    return (out, r.lse.astype(np.float64 if q.dtype == np.float64 else np.float32)) if return_lse else out


def _same_dtype_vjp(q, k, v, g, *, bias=None, sinks=None, **kw):
    r = naive.attention_vjp(q, k, v, g, bias=bias, sinks=sinks, dtype=q.dtype, **kw)
    grads = {"dq": r.dq.astype(q.dtype), "dk": r.dk.astype(q.dtype), "dv": r.dv.astype(q.dtype)}
    if bias is not None:
        grads["dbias"] = r.dbias.astype(bias.dtype)
    if sinks is not None:
        grads["dsinks"] = r.dsinks.astype(sinks.dtype)
    return grads


def reference(q, k, v, **kw):
    """A correct plain implementation in the input dtype (fp32 accumulation, rounded logits/probs)."""
    return _same_dtype(q, k, v, **kw)


reference.vjp = _same_dtype_vjp
_meta(reference)


def modern_reference(q, k, v, **kw):
    """The same plain implementation with every modern option and lse declared."""
    return _same_dtype(q, k, v, **kw)


modern_reference.vjp = _same_dtype_vjp
_meta(modern_reference, ("mask", "bias", "causal", "gqa", "grad", "lse", "bottom-right", "window", "softcap",
                         "alibi", "sinks", "segments"))


def wrong_softcap(q, k, v, *, scale=None, softcap=None, **kw):
    """Soft-caps as c·tanh(s) instead of c·tanh(s/c) (the logits scaled by c first); correct without softcap."""
    if softcap is not None:
        scale = (1 / np.sqrt(q.shape[-1]) if scale is None else scale) * softcap
    return _same_dtype(q, k, v, scale=scale, softcap=softcap, **kw)


_meta(wrong_softcap, ("mask", "bias", "causal", "gqa", "window", "softcap"))


def crashes(q, k, v, **kw):
    raise RuntimeError("kernel launch failed")


def hangs(q, k, v, **kw):
    time.sleep(3)
    return _same_dtype(q, k, v, **kw)


def wrong_shape(q, k, v, **kw):
    return _same_dtype(q, k, v, **kw)[:, :, :, :1].copy()


def wrong_dtype(q, k, v, **kw):
    return _same_dtype(q, k, v, **kw).astype(np.float64)


def nan_output(q, k, v, **kw):
    out = _same_dtype(q, k, v, **kw)
    out[0, 0, 0, 0] = np.nan
    return out


def inf_output(q, k, v, **kw):
    out = _same_dtype(q, k, v, **kw)
    out[0, 0, 0, 0] = np.inf
    return out


def all_nan(q, k, v, **kw):
    return np.full_like(_same_dtype(q, k, v, **kw), np.nan)


def two_bugs(q, k, v, *, causal=False, **kw):
    """Two distinct bugs: raises on causal calls, and scales the output by 1.5 otherwise."""
    if causal:
        raise RuntimeError("causal path not implemented")
    return (_same_dtype(q, k, v, **kw).astype(np.float64) * 1.5).astype(q.dtype)


def hangs_on_long(q, k, v, **kw):
    """Correct, except that it hangs (sleeps a minute) when there are more than 16 keys."""
    if k.shape[1] > 16:
        time.sleep(60)
    return _same_dtype(q, k, v, **kw)


def segfaults(q, k, v, **kw):
    """Reads address 0 when there are more than 4 keys: SIGSEGV."""
    if k.shape[1] > 4:
        ctypes.string_at(0)
    return _same_dtype(q, k, v, **kw)


def aborts(q, k, v, **kw):
    """Calls abort() on causal calls: SIGABRT."""
    if kw.get("causal"):
        os.abort()
    return _same_dtype(q, k, v, **kw)


_calls = [0]


def nondeterministic(q, k, v, **kw):
    """Correct to within a few ulps, but never twice the same bits (a race in a reduction, say)."""
    _calls[0] += 1
    out = _same_dtype(q, k, v, **kw)
    noise = np.random.default_rng(_calls[0]).integers(-1, 2, out.shape)
    return np.nextafter(out, out + noise.astype(out.dtype)).astype(out.dtype) if out.dtype != np.float64 else out


def slow(q, k, v, **kw):
    """Correct and slow: 50 ms a call (for interrupting a campaign mid-run)."""
    time.sleep(0.05)
    return _same_dtype(q, k, v, **kw)


def flush_tiny(q, k, v, **kw):
    """Flushes every output below 2**-100 to zero: an underflow bug for tiny values."""
    out = _same_dtype(q, k, v, **kw)
    out[np.abs(out.astype(np.float64)) < 2.0**-100] = 0
    return out


def masked_rows_nan(q, k, v, **kw):
    """Returns NaN on fully masked rows while declaring the zeros policy."""
    kw = {**kw, "masked_rows": "nan"}
    return naive.attention(q, k, v, dtype=q.dtype, **kw).out.astype(q.dtype)


for _fn in (crashes, hangs, wrong_shape, wrong_dtype, nan_output, inf_output, all_nan, flush_tiny, masked_rows_nan,
            two_bugs, hangs_on_long, slow, segfaults, aborts, nondeterministic):
    _meta(_fn, ("mask", "bias", "causal", "gqa"))


def uniform_rows(q, k, v, **kw):
    """A correct implementation of the ``uniform`` masked-row policy (what a finfo.min fill gives)."""
    return _same_dtype(q, k, v, masked_rows="uniform", **kw)


uniform_rows.vjp = lambda q, k, v, g, **kw: _same_dtype_vjp(q, k, v, g, masked_rows="uniform", **kw)
_meta(uniform_rows)
uniform_rows.attnverify["masked_rows"] = "uniform"


def equal_head_dims_only(q, k, v, **kw):
    """A correct kernel that takes only Dk == Dv and says so by raising ``Unsupported`` (no declaration)."""
    from verify.targets import Unsupported

    if q.shape[-1] != v.shape[-1]:
        raise Unsupported("equal_head_dims_only needs Dk == Dv")
    return _same_dtype(q, k, v, **kw)


_meta(equal_head_dims_only, ("mask", "bias", "causal", "gqa"))
