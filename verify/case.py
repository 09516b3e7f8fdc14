"""A case: plain data (numpy arrays + parameters) that any target, oracle or check can consume.

Cases are what strategies produce and what findings save. They round-trip through ``.npz``
(arrays; bf16 stored as its uint16 bit pattern) plus ``.json`` (parameters) without pickle and
without Hypothesis, so ``attnverify repro FILE`` replays them anywhere. The semantic fields are
exactly ``oracles.spec.normalize``'s keywords (``Case.semantics``); ``g`` and ``g_lse`` are the
cotangents of the output and of lse; ``layout`` says how the adapter lays the inputs out in memory
(``verify.targets.layouts``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from oracles import spec

FORMAT_VERSION = 2
_ARRAYS = ("q", "k", "v", "g", "g_lse", "mask", "bias", "alibi_slopes", "sinks", "q_segment_ids", "kv_segment_ids")
_PARAMS = ("scale", "causal", "align", "window", "softcap", "query_chunk_size", "key_chunk_size", "layout")


@dataclass(frozen=True)
class Case:
    """One attention call to check: inputs, optional cotangents and the call's parameters."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    g: np.ndarray | None = None
    mask: np.ndarray | None = None
    bias: np.ndarray | None = None
    scale: float | None = None
    causal: bool = False
    query_chunk_size: int | None = None
    key_chunk_size: int | None = None
    family: str = "custom"
    mask_kind: str = "none"
    meta: dict = field(default_factory=dict)
    align: str = "top-left"
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    alibi_slopes: np.ndarray | None = None
    sinks: np.ndarray | None = None
    q_segment_ids: np.ndarray | None = None
    kv_segment_ids: np.ndarray | None = None
    g_lse: np.ndarray | None = None
    layout: str = "contiguous"

    def __post_init__(self) -> None:
        if self.window is not None and not isinstance(self.window, tuple):
            object.__setattr__(self, "window", tuple(self.window))

    @property
    def dtype(self) -> str:
        return spec.dtype_name(self.q.dtype)

    @property
    def dims(self) -> dict[str, int]:
        b, lq, hq, dk = self.q.shape
        _, lk, hkv, dv = self.v.shape
        return {"B": b, "Lq": lq, "Lk": lk, "Hq": hq, "Hkv": hkv, "Dk": dk, "Dv": dv}

    def semantics(self) -> dict:
        """Keyword arguments for ``spec.normalize`` and the oracles."""
        return {"mask": self.mask, "bias": self.bias, "scale": self.scale, "causal": self.causal,
                "align": self.align, "window": self.window, "softcap": self.softcap,
                "alibi_slopes": self.alibi_slopes, "sinks": self.sinks, "q_segment_ids": self.q_segment_ids,
                "kv_segment_ids": self.kv_segment_ids}

    def options(self) -> list[str]:
        """The modern options this case uses, as a reader writes them (``softcap=50``, ``window=(3, 0)``)."""
        out = []
        if self.causal:
            out.append("causal")
        if self.align != "top-left":
            out.append(f"align={self.align}")
        if self.window is not None:
            out.append(f"window=({', '.join('None' if w is None else str(w) for w in self.window)})")
        if self.softcap is not None:
            out.append(f"softcap={self.softcap:g}")
        if self.alibi_slopes is not None:
            out.append(f"alibi{list(self.alibi_slopes.shape)}")
        if self.sinks is not None:
            out.append(f"sinks{list(self.sinks.shape)}")
        if self.q_segment_ids is not None:
            out.append(f"segments={int(np.unique(self.kv_segment_ids).size)}")
        if self.bias is not None:
            out.append(f"bias{list(self.bias.shape)}")
        if self.g_lse is not None:
            out.append("g_lse")
        if self.layout != "contiguous":
            out.append(f"layout={self.layout}")
        return out

    def describe(self) -> str:
        """One line a reader can picture: shapes, chunks, scale, family, mask and options."""
        d = self.dims
        heads = f"Hq=Hkv={d['Hq']}" if d["Hq"] == d["Hkv"] else f"Hq={d['Hq']} Hkv={d['Hkv']}"
        dims = f"Dk=Dv={d['Dk']}" if d["Dk"] == d["Dv"] else f"Dk={d['Dk']} Dv={d['Dv']}"
        scale = "1/sqrt(Dk)" if self.scale is None else f"{self.scale:.6g}"
        extra = self.options()
        return (
            f"B={d['B']} Lq={d['Lq']} Lk={d['Lk']} {heads} {dims} · query_chunk={self.query_chunk_size} "
            f"key_chunk={self.key_chunk_size} · scale={scale} · family={self.family} mask={self.mask_kind}"
            + (" · " + " ".join(extra) if extra else "")
        )

    def with_(self, **changes: object) -> Case:
        return replace(self, **changes)

    def digest(self, chunks: bool = True) -> str:
        """A hex digest of everything that defines the call (arrays with dtypes and shapes, parameters).

        ``chunks=False`` leaves the chunk sizes out: cases that differ only in them share exact values.
        """
        h = hashlib.sha256()
        for name in _ARRAYS:
            arr = getattr(self, name)
            h.update(name.encode())
            if arr is not None:
                arr = np.ascontiguousarray(arr)
                h.update(f"{arr.dtype}{arr.shape}".encode() + arr.tobytes())
        params = [getattr(self, p) for p in _PARAMS if chunks or not p.endswith("chunk_size")]
        h.update(json.dumps(params).encode())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write ``PATH.npz`` and ``PATH.json`` (``path`` is a stem: any dots in it are kept); returns the .npz."""
        path = _stem(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays, dtypes = {}, {}
        for name in _ARRAYS:
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
                dtypes[name] = str(arr.dtype)
            else:
                dtypes[name] = spec.dtype_name(arr.dtype)
            arrays[name] = arr.view(np.uint16) if dtypes[name] == "bf16" else arr
        npz, js = _with(path, ".npz"), _with(path, ".json")
        np.savez(npz, **arrays)
        params = {"format": FORMAT_VERSION, "dtypes": dtypes, "family": self.family, "mask_kind": self.mask_kind,
                  "meta": self.meta, **{p: getattr(self, p) for p in _PARAMS}}
        js.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        return npz

    @classmethod
    def load(cls, path: str | Path) -> Case:
        """Read a case written by ``save`` (given its stem, or the .npz or the .json path)."""
        path = _stem(path)
        params = json.loads(_with(path, ".json").read_text())
        version = params.get("format")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"{path}.json: unknown case format {version!r}")
        arrays = {}
        with np.load(_with(path, ".npz"), allow_pickle=False) as data:
            for name, dt in params["dtypes"].items():
                arr = data[name]
                arrays[name] = arr.view(spec.as_dtype("bf16")) if dt == "bf16" else arr
        kw = {p: params[p] for p in _PARAMS if p in params}
        if kw.get("window") is not None:
            kw["window"] = tuple(kw["window"])
        return cls(**arrays, **kw, family=params["family"], mask_kind=params["mask_kind"],
                   meta=params.get("meta", {}))


def _stem(path: str | Path) -> Path:
    """``path`` without a trailing ``.npz`` / ``.json`` (other dots, as in ``mykernels.attn``, stay)."""
    path = Path(path)
    return path.with_name(path.name[: -len(path.suffix)]) if path.suffix in (".npz", ".json") else path


def _with(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def case_files(stem: str | Path) -> tuple[Path, Path]:
    """The ``.npz`` and ``.json`` files of the case saved at ``stem``."""
    stem = _stem(stem)
    return _with(stem, ".npz"), _with(stem, ".json")
