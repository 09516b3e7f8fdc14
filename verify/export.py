"""``export``: one finding as a standalone pytest file, for a bug report to the kernel's maintainers.

The file needs numpy and the kernel's framework, not attnverify: it carries the inputs, the exact
values (from attnverify's mp oracle or its certified float64 reference) and the allowance of each
element, base64-encoded in one ``.npz``, calls the kernel with plain tensors and asserts every
element within its allowance -- so it fails on the kernel as found and passes once it is fixed.
"""

from __future__ import annotations

import base64
import io
import json
import textwrap

import numpy as np

from verify.case import Case
from verify.checks import passes_for
from verify.targets import BUNDLED, Adapter
from verify.targets.base import split_arrays
from verify.truth import decide

_INPUTS = ("q", "k", "v", "mask", "bias", "alibi_slopes", "sinks", "q_segment_ids", "kv_segment_ids", "g", "g_lse")


def _import_line(adapter: Adapter) -> tuple[str, str]:
    """(module, function) of the target, importable where the test runs."""
    name = adapter.info.name
    if name in BUNDLED:
        return BUNDLED[name], "attention"
    module, _, attr = name.partition(":")
    return module, attr


def _npz(arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return "\n".join(textwrap.wrap(base64.b64encode(buf.getvalue()).decode(), 100))


def export(adapter: Adapter, case: Case, message: str) -> str:
    """The text of a standalone pytest file reproducing ``message`` (a finding of ``adapter`` on ``case``).

    Inputs are passed contiguous: a finding that needs a strided layout (``case.layout``) says so in the
    header and may not reproduce from the file.
    """
    info = adapter.info
    if case.layout != "contiguous":
        message += f"\n(found with inputs laid out {case.layout}; this file passes contiguous tensors)"
    passes = passes_for(info, case, ("forward", "grad"))
    truth = decide(case, info, "grad" in passes)
    kw = adapter.kwargs(case)
    arrays, dtypes = {}, {}
    for name in _INPUTS:
        x = getattr(case, name)
        if x is None or (name not in kw and name not in ("q", "k", "v", "g", "g_lse")):
            continue
        x = np.asarray(x)
        dtypes[name] = x.dtype.name
        arrays[name] = x.astype(np.float32) if x.dtype.name == "bfloat16" else x
    expected = {"out": (truth.exact.out, truth.allow.out)}
    if kw.get("return_lse"):
        expected["lse"] = (truth.exact.lse, truth.allow.lse)
    if "grad" in passes:
        _, names = split_arrays(case, kw)
        expected.update({n: (truth.exact.grads[n], truth.allow.grads[n]) for n in names})
    for name, (exact, allow) in expected.items():
        arrays[f"exact_{name}"], arrays[f"allow_{name}"] = exact, np.nan_to_num(allow, nan=np.inf, posinf=np.inf)
    static = {key: val for key, val in kw.items() if key not in _INPUTS}
    module, function = _import_line(adapter)
    header = "\n".join(f"# {line}" for line in message.splitlines())
    body = _TEMPLATES[info.framework].format(module=module, function=function, static=repr(static),
                                             grads=repr([n for n in expected if n.startswith("d")]),
                                             lse=bool(kw.get("return_lse")))
    return (f'"""Standalone reproducer of an attnverify finding on {info.name} (attnverify export).\n\n'
            f"Inputs, exact values ({truth.exact.reference}) and per-element allowances are in DATA; it needs numpy "
            f'and {info.framework}.\n"""\n\n{header}\n\nimport base64\nimport io\n\nimport numpy as np\n'
            f"{body}\nDTYPES = {json.dumps(dtypes)}\nDATA = \"\"\"\n{_npz(arrays)}\n\"\"\"\n{_COMMON}")


_COMMON = '''

def _data():
    with np.load(io.BytesIO(base64.b64decode("".join(DATA.split())))) as f:
        return {k: f[k] for k in f.files}


def _within(name, got, exact, allow):
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - exact)
    bad = ~(err <= allow) & ~(np.isnan(exact) & np.isnan(got)) & ~(got == exact)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.size} elements beyond their allowance; worst "
                           f"{name}{list(np.unravel_index(np.nanargmax(np.where(bad, err / allow, 0)), bad.shape))}")


def test_reproduces_the_finding():
    d = _data()
    out, lse, grads = _call(d)
    _within("out", out, d["exact_out"], d["allow_out"])
    if lse is not None:
        _within("lse", lse, d["exact_lse"], d["allow_lse"])
    for name, value in (grads or {}).items():
        _within(name, value, d[f"exact_{name}"], d[f"allow_{name}"])
'''

_TEMPLATES = {
    "torch": '''import torch

from {module} import {function} as attention

STATIC = {static}
GRADS = {grads}


def _tensor(d, name):
    x = torch.from_numpy(d[name])
    return x.to(torch.bfloat16) if DTYPES[name] == "bfloat16" else x


def _call(d):
    leaves = {{n: _tensor(d, n).requires_grad_(bool(GRADS)) for n in ("q", "k", "v", "bias", "sinks") if n in d}}
    extra = {{n: _tensor(d, n) for n in ("mask", "alibi_slopes", "q_segment_ids", "kv_segment_ids") if n in d}}
    result = attention(leaves["q"], leaves["k"], leaves["v"], **STATIC, **extra,
                       **{{n: t for n, t in leaves.items() if n in ("bias", "sinks")}})
    out, lse = result if {lse} else (result, None)
    grads = None
    if GRADS:
        outs, cots = [out], [_tensor(d, "g").to(out.dtype)]
        if lse is not None and "g_lse" in d:
            outs.append(lse)
            cots.append(_tensor(d, "g_lse").to(lse.dtype))
        torch.autograd.backward(outs, cots)
        grads = {{g: leaves[g[1:]].grad.float().numpy() for g in GRADS}}
    return out.detach().float().numpy(), None if lse is None else lse.detach().float().numpy(), grads
''',
    "jax": '''import jax
import jax.numpy as jnp
import ml_dtypes

from {module} import {function} as attention

STATIC = {static}
GRADS = {grads}


def _array(d, name):
    x = d[name]
    return jnp.asarray(x.astype(ml_dtypes.bfloat16) if DTYPES[name] == "bfloat16" else x)


def _call(d):
    diff = [n for n in ("bias", "sinks") if n in d]
    extra = {{n: _array(d, n) for n in ("mask", "alibi_slopes", "q_segment_ids", "kv_segment_ids") if n in d}}

    def f(q, k, v, *rest):
        return attention(q, k, v, **STATIC, **extra, **dict(zip(diff, rest)))

    args = [_array(d, n) for n in ("q", "k", "v", *diff)]
    result, back = jax.vjp(f, *args)
    out, lse = result if {lse} else (result, None)
    grads = None
    if GRADS:
        g = _array(d, "g").astype(out.dtype)
        cot = g if lse is None else (g, _array(d, "g_lse").astype(lse.dtype) if "g_lse" in d else jnp.zeros_like(lse))
        grads = dict(zip(("dq", "dk", "dv", *("d" + n for n in diff)), (np.asarray(x, np.float64) for x in back(cot))))
    return np.asarray(out, np.float64), None if lse is None else np.asarray(lse, np.float64), grads
''',
    "numpy": '''import ml_dtypes

from {module} import {function} as attention

STATIC = {static}
GRADS = {grads}


def _array(d, name):
    return d[name].astype(ml_dtypes.bfloat16) if DTYPES[name] == "bfloat16" else d[name]


def _call(d):
    kw = {{n: _array(d, n) for n in ("mask", "bias", "alibi_slopes", "sinks", "q_segment_ids", "kv_segment_ids")
          if n in d}}
    q, k, v = (_array(d, n) for n in ("q", "k", "v"))
    result = attention(q, k, v, **STATIC, **kw)
    out, lse = result if {lse} else (result, None)
    grads = None
    if GRADS:
        static = {{k: v for k, v in STATIC.items() if k != "return_lse"}}
        extra = {{"g_lse": d["g_lse"]}} if {lse} and "g_lse" in d else {{}}
        grads = attention.vjp(q, k, v, _array(d, "g"), **static, **kw, **extra)
        grads = {{n: np.asarray(grads[n], np.float64) for n in GRADS}}
    return np.asarray(out, np.float64), None if lse is None else np.asarray(lse, np.float64), grads
''',
}
