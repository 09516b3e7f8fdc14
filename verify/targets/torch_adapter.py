"""Runs a PyTorch target on a case: numpy <-> torch conversion, layouts, and gradients from torch autograd.

Conversions are exact: bf16 goes numpy(ml_dtypes.bfloat16) -> float32 -> torch.bfloat16 and back
the same way; fp16, fp32 and fp64 keep their dtype; a mask stays bool, segment ids become int64,
a bias, ALiBi slopes and sinks keep their own dtype. Inputs are placed on the target's declared
device (``TargetInfo.device``) and laid out as ``case.layout`` says (``verify.targets.layouts``).

Gradients: fresh leaf tensors for ``q, k, v`` (and ``bias``, ``sinks``), the layout applied after the
leaves (so a stride-0 expansion sums its gradient back), then ``torch.autograd.backward`` of the
outputs with the cotangents in their dtypes (``g`` for out, ``g_lse`` for lse), and each leaf's
``.grad``. ``backward`` rather than ``torch.autograd.grad`` because a target that uses the default
(reentrant) ``torch.utils.checkpoint`` -- memory-efficient-attention 0.1.3 does -- refuses ``.grad()``;
for fresh leaves the two compute the same vector-Jacobian product. An input the outputs do not
depend on (or outputs with no autograd graph at all) gets a zero gradient.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from verify.case import Case
from verify.targets import layouts
from verify.targets.base import Adapter, Output, Unsupported, split_arrays, split_result

try:
    import torch
except ImportError:  # the adapter stays importable; unavailable_reason() says why it cannot run
    torch = None

_BF16 = np.dtype(ml_dtypes.bfloat16)


def to_torch(arr: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """An exact torch copy of a numpy array (bf16 through float32, integers as int64), on ``device``."""
    arr = np.asarray(arr)
    if arr.dtype == _BF16:
        return torch.from_numpy(arr.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    if np.issubdtype(arr.dtype, np.integer):
        return torch.from_numpy(arr.astype(np.int64)).to(device)
    return torch.from_numpy(np.array(arr, copy=True)).to(device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """An exact numpy copy of a tensor, keeping its dtype (bf16 through float32)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(_BF16)
    return t.numpy().copy()


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _padded(x: torch.Tensor) -> torch.Tensor:
    b, n, h, d = x.shape
    buf = x.new_zeros(b, n + 2, h, d + 3)
    buf[:, 1:n + 1, :, :d] = x  # an in-place copy autograd records: gradients reach x through the slice
    return buf[:, 1:n + 1, :, :d]


def _expand(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.expand(x.shape[0], x.shape[1], hq, x.shape[3])


def _laid_out(layout: str, name: str, x: torch.Tensor, hq: int) -> torch.Tensor:
    return layouts.view(layout, name, x, heads_first=_heads_first, pad=_padded, expand=_expand, hq=hq)


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

    def _call(self, case: Case, grad: bool) -> tuple[object, list[torch.Tensor], list[str], dict]:
        kw = self.kwargs(case)
        device = self.info.device
        arrays, names = split_arrays(case, kw)
        leaves = [to_torch(a, device).requires_grad_(grad) for a in arrays]
        hq = case.dims["Hq"]
        qkv = [_laid_out(case.layout, n, t, hq) for n, t in zip(("q", "k", "v"), leaves[:3], strict=True)]
        for key, leaf in zip(names[3:], leaves[3:], strict=True):
            kw["bias" if key == "dbias" else "sinks"] = leaf
        for key in ("mask", "alibi_slopes", "q_segment_ids", "kv_segment_ids"):
            if key in kw:
                kw[key] = to_torch(kw[key], device)
        with torch.set_grad_enabled(grad):
            result = self.fn(*qkv, **kw)
        return result, leaves, names, kw

    def forward(self, case: Case) -> Output:
        result, _, _, kw = self._call(case, grad=False)
        out, lse = split_result(result, kw, self.info.name)
        return Output(to_numpy(out), None if lse is None else to_numpy(lse))

    def vjp(self, case: Case) -> dict[str, np.ndarray]:
        if "grad" not in self.info.features:
            raise Unsupported(f"{self.info.name} does not declare grad")
        if case.g is None:
            raise ValueError("vjp needs a cotangent: the case has no g")
        result, leaves, names, kw = self._call(case, grad=True)
        out, lse = split_result(result, kw, self.info.name)
        device = self.info.device
        outputs = [out]
        cotangents = [_laid_out(case.layout, "g", to_torch(case.g, device).to(out.dtype), case.dims["Hq"])]
        if lse is not None and case.g_lse is not None:
            outputs.append(lse)
            cotangents.append(to_torch(case.g_lse, device).to(lse.dtype))
        live = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
        if live:
            torch.autograd.backward([o for o, _ in live], [c for _, c in live])
        return {
            name: to_numpy(t.grad if t.grad is not None else torch.zeros_like(t))
            for name, t in zip(names, leaves, strict=True)
        }


ADAPTER = TorchAdapter
