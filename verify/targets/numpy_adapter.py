"""Runs a numpy target on a case: forward always, gradients only when the target provides them.

numpy has no autodiff, so a numpy target that declares ``grad`` must carry its own VJP as an
attribute of the function::

    def attention(q, k, v, *, mask=None, ...): ...
    def _vjp(q, k, v, g, *, mask=None, g_lse=None, ...) -> dict: ...  # {"dq", "dk", "dv"[, "dbias", "dsinks"]}
    attention.vjp = _vjp

``vjp`` receives the same keyword arguments as the forward call, the cotangent ``g`` (the case's,
in its own dtype) and, for a target returning lse, ``g_lse``; it returns numpy arrays shaped like
``q, k, v`` (and ``bias``, ``sinks``). Without it, ``NumpyAdapter.vjp`` raises ``Unsupported``.
Inputs are passed as copies laid out as ``case.layout`` says, so a target cannot alter the case.
"""

from __future__ import annotations

import numpy as np

from verify.case import Case
from verify.targets import layouts
from verify.targets.base import Adapter, Output, Unsupported, split_arrays, split_result


def _heads_first(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(x, 1, 2)).swapaxes(1, 2)


def _padded(x: np.ndarray) -> np.ndarray:
    b, n, h, d = x.shape
    buf = np.zeros((b, n + 2, h, d + 3), dtype=x.dtype)
    buf[:, 1:n + 1, :, :d] = x
    return buf[:, 1:n + 1, :, :d]


def _expand(x: np.ndarray, hq: int) -> np.ndarray:
    return np.broadcast_to(x, (x.shape[0], x.shape[1], hq, x.shape[3]))


class NumpyAdapter(Adapter):
    """Adapter for targets taking and returning numpy arrays."""

    def _args(self, case: Case) -> tuple[list[np.ndarray], dict, list[str]]:
        kw = self.kwargs(case)
        arrays, names = split_arrays(case, kw)
        arrays = [np.array(a, copy=True) for a in arrays]
        hq = case.dims["Hq"]
        arrays[:3] = [layouts.view(case.layout, n, a, heads_first=_heads_first, pad=_padded, expand=_expand, hq=hq)
                      for n, a in zip(("q", "k", "v"), arrays[:3], strict=True)]
        for key, arr in zip(names[3:], arrays[3:], strict=True):
            kw["bias" if key == "dbias" else "sinks"] = arr
        for key in ("mask", "alibi_slopes", "q_segment_ids", "kv_segment_ids"):
            if key in kw:
                kw[key] = np.array(kw[key], copy=True)
        return arrays, kw, names

    def forward(self, case: Case) -> Output:
        arrays, kw, _ = self._args(case)
        out, lse = split_result(self.fn(*arrays[:3], **kw), kw, self.info.name)
        return Output(np.asarray(out), None if lse is None else np.asarray(lse))

    def vjp(self, case: Case) -> dict[str, np.ndarray]:
        if "grad" not in self.info.features:
            raise Unsupported(f"{self.info.name} does not declare grad")
        vjp = getattr(self.fn, "vjp", None)
        if not callable(vjp):
            raise Unsupported(
                f"{self.info.name} is a numpy target without a vjp: attach fn.vjp(q, k, v, g, **kw) -> dict"
            )
        if case.g is None:
            raise ValueError("vjp needs a cotangent: the case has no g")
        arrays, kw, names = self._args(case)
        g = layouts.view(case.layout, "g", np.array(case.g, copy=True), heads_first=_heads_first, pad=_padded,
                         expand=_expand, hq=case.dims["Hq"])
        if kw.get("return_lse") and case.g_lse is not None:
            kw["g_lse"] = np.array(case.g_lse, copy=True)
        kw.pop("return_lse", None)
        grads = vjp(*arrays[:3], g, **kw)
        missing = [n for n in names if n not in grads]
        if missing:
            raise ValueError(f"{self.info.name}.vjp returned no {', '.join(missing)}")
        out = {n: np.asarray(grads[n]) for n in names}
        if case.layout == "broadcast-kv":  # the chain rule of the stride-0 expansion: sum over the copies
            for n in ("dk", "dv"):
                out[n] = out[n].astype(np.float64).sum(axis=2, keepdims=True).astype(out[n].dtype)
        return out


ADAPTER = NumpyAdapter
