"""Runs a PyTorch target on a case: numpy <-> torch conversion and gradients from torch autograd.

Conversions are exact: bf16 goes numpy(ml_dtypes.bfloat16) -> float32 -> torch.bfloat16 and back
the same way; fp16, fp32 and fp64 keep their dtype; a mask stays bool, a bias keeps its own
dtype. Inputs are placed on the target's declared device (``TargetInfo.device``).

Gradients: fresh leaf tensors for ``q, k, v`` (and ``bias``), then ``out.backward(g)`` with the
cotangent in the output's dtype, and each leaf's ``.grad``. ``backward`` rather than
``torch.autograd.grad`` because a target that uses the default (reentrant)
``torch.utils.checkpoint`` -- memory-efficient-attention 0.1.3 does -- refuses ``.grad()``;
for fresh leaves the two compute the same vector-Jacobian product. An input the output does not
depend on (or an output with no autograd graph at all) gets a zero gradient.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from verify.case import Case
from verify.targets.base import Adapter, Unsupported, split_arrays

try:
    import torch
except ImportError:  # the adapter stays importable; unavailable_reason() says why it cannot run
    torch = None

_BF16 = np.dtype(ml_dtypes.bfloat16)


def to_torch(arr: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """An exact torch copy of a numpy array (bf16 through float32), on ``device``."""
    arr = np.asarray(arr)
    if arr.dtype == _BF16:
        return torch.from_numpy(arr.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True)).to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """An exact numpy copy of a tensor, keeping its dtype (bf16 through float32)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(_BF16)
    return t.numpy().copy()


class TorchAdapter(Adapter):
    """Adapter for targets taking and returning ``torch.Tensor``."""

    def unavailable_reason(self) -> str | None:
        if torch is None:
            return "PyTorch is not installed (pip install attnverify[torch])."
        device = self.info.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            return f"it runs on {device!r} but this PyTorch build sees no CUDA device."
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            return f"device {device!r} is not usable here: {exc}"
        return None

    def _call(self, case: Case, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
        kw = self.kwargs(case)
        device = self.info.device
        arrays, names = split_arrays(case, kw)
        tensors = [to_torch(a, device).requires_grad_(grad) for a in arrays]
        if "bias" in kw:
            kw["bias"] = tensors[3]
        if "mask" in kw:
            kw["mask"] = to_torch(kw["mask"], device)
        with torch.set_grad_enabled(grad):
            out = self.fn(*tensors[:3], **kw)
        return out, tensors, names

    def forward(self, case: Case) -> np.ndarray:
        out, _, _ = self._call(case, grad=False)
        return to_numpy(out)

    def vjp(self, case: Case) -> dict[str, np.ndarray]:
        if "grad" not in self.info.features:
            raise Unsupported(f"{self.info.name} does not declare grad")
        if case.g is None:
            raise ValueError("vjp needs a cotangent: the case has no g")
        out, tensors, names = self._call(case, grad=True)
        if out.requires_grad:
            g = to_torch(case.g, self.info.device).to(out.dtype)
            out.backward(g)
        return {
            name: to_numpy(t.grad if t.grad is not None else torch.zeros_like(t))
            for name, t in zip(names, tensors, strict=True)
        }


ADAPTER = TorchAdapter
