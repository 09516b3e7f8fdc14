"""Runs a numpy target on a case: forward always, gradients only when the target provides them.

numpy has no autodiff, so a numpy target that declares ``grad`` must carry its own VJP as an
attribute of the function::

    def attention(q, k, v, *, mask=None, ...): ...
    def _vjp(q, k, v, g, *, mask=None, ...) -> dict: ...   # {"dq", "dk", "dv"[, "dbias"]}
    attention.vjp = _vjp

``vjp`` receives the same keyword arguments as the forward call and the cotangent ``g`` (the
case's, in its own dtype) and returns numpy arrays shaped like ``q, k, v`` (and ``bias``).
Without it, ``NumpyAdapter.vjp`` raises ``Unsupported``. Inputs are passed as copies, so a target
cannot alter the case.
"""

from __future__ import annotations

import numpy as np

from verify.case import Case
from verify.targets.base import Adapter, Unsupported, split_arrays


class NumpyAdapter(Adapter):
    """Adapter for targets taking and returning numpy arrays."""

    def _args(self, case: Case) -> tuple[list[np.ndarray], dict, list[str]]:
        kw = self.kwargs(case)
        arrays, names = split_arrays(case, kw)
        arrays = [np.array(a, copy=True) for a in arrays]
        if "bias" in kw:
            kw["bias"] = arrays[3]
        if "mask" in kw:
            kw["mask"] = np.array(kw["mask"], copy=True)
        return arrays, kw, names

    def forward(self, case: Case) -> np.ndarray:
        arrays, kw, _ = self._args(case)
        return np.asarray(self.fn(*arrays[:3], **kw))

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
        grads = vjp(*arrays[:3], np.array(case.g, copy=True), **kw)
        missing = [n for n in names if n not in grads]
        if missing:
            raise ValueError(f"{self.info.name}.vjp returned no {', '.join(missing)}")
        return {n: np.asarray(grads[n]) for n in names}


ADAPTER = NumpyAdapter
