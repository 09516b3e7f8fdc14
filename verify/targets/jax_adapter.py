"""Runs a JAX target on cases: numpy -> jax arrays of the same dtype, jitted calls, ``jax.vjp`` gradients.

Arrays keep their dtype exactly (bf16 is ``ml_dtypes.bfloat16`` on both sides; the mask stays
bool, the bias keeps its own dtype) and are placed on the device the target declares (``cpu``
even where a GPU is present, ``gpu`` only where jax has one). The call is jitted with the
non-array keywords (scale, causal, chunk sizes) static and mask/bias traced; compiled functions
are cached per static keywords, and jax's own cache handles new shapes and dtypes; a persistent
compilation cache (``.attnverify/jax-cache``) serves repeated campaigns.

float64 needs ``jax_enable_x64``, which this adapter never switches on (it is a process-wide
flag that would change every other JAX target's defaults): the bundled JAX targets declare bf16,
fp16 and fp32 only, and an fp64 case is ``Unsupported`` unless the user enabled x64 themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from verify.case import Case
from verify.compat import jit_cache_size
from verify.targets.base import Adapter, TargetInfo, Unsupported, split_arrays
from verify.targets.loader import TargetSpec

try:
    import jax
except ImportError as _exc:  # reported by unavailable_reason, so a missing jax disables only JAX targets
    jax = None
    _IMPORT_ERROR: str | None = f"jax cannot be imported ({_exc})"
else:
    _IMPORT_ERROR = None
    # Campaigns replay the same cases (seeded runs, the example database): a persistent compilation
    # cache makes every run after the first skip most compilations. Left alone if the user set one;
    # ATTNVERIFY_JAX_CACHE="" turns it off.
    _CACHE = os.environ.get("ATTNVERIFY_JAX_CACHE", str(Path(".attnverify") / "jax-cache"))
    if _CACHE and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

_ARRAY_KWARGS = ("mask", "bias")
# Each compiled CPU executable keeps its own memory mappings; a campaign compiling thousands of
# shapes ran out of them (LLVM "Cannot allocate memory", then a segfault). Past this many live
# compilations the caches are dropped and programs recompile on demand.
MAX_COMPILED = 200


class JaxAdapter(Adapter):
    """Adapter for targets taking and returning ``jax.Array`` s."""

    def __init__(self, fn: Callable, info: TargetInfo, target: TargetSpec | None = None) -> None:
        super().__init__(fn, info, target)
        self._forward_cache: dict[tuple, Callable] = {}
        self._vjp_cache: dict[tuple, Callable] = {}

    def unavailable_reason(self) -> str | None:
        """Why the target cannot run here: jax missing, or its declared device absent."""
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        try:
            jax.devices(self.info.device)
        except RuntimeError:
            present = ", ".join(sorted({d.platform for d in jax.devices()}))
            return f"it declares device {self.info.device!r} but jax sees only {present}"
        return None

    def _device(self) -> object:
        return jax.devices(self.info.device)[0]

    def _to_jax(self, name: str, x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if x.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise Unsupported(f"{self.info.name}: {name} is float64 but jax_enable_x64 is off (jax would use float32)")
        return jax.device_put(x, self._device())

    def _split(self, case: Case) -> tuple[dict, dict, tuple]:
        """(static keywords, array keywords as jax arrays, cache key) for ``case``."""
        kw = self.kwargs(case)
        static = {name: value for name, value in kw.items() if name not in _ARRAY_KWARGS}
        arrays = {name: self._to_jax(name, kw[name]) for name in _ARRAY_KWARGS if kw.get(name) is not None}
        return static, arrays, (tuple(sorted(static.items())), tuple(sorted(arrays)))

    def _trim(self) -> None:
        """Drop every compiled program once more than ``MAX_COMPILED`` are alive."""
        live = sum(jit_cache_size(f) for f in (*self._forward_cache.values(), *self._vjp_cache.values()))
        if live > MAX_COMPILED:
            self._forward_cache.clear()
            self._vjp_cache.clear()
            jax.clear_caches()

    def _qkv(self, case: Case) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self._to_jax("q", case.q), self._to_jax("k", case.k), self._to_jax("v", case.v)

    def forward(self, case: Case) -> np.ndarray:
        """The target's output for ``case``, as numpy in the dtype the target returned."""
        static, arrays, key = self._split(case)
        self._trim()
        fn = self._forward_cache.get(key)
        if fn is None:

            def call(q: jax.Array, k: jax.Array, v: jax.Array, extra: dict) -> jax.Array:
                return self.fn(q, k, v, **static, **extra)

            fn = self._forward_cache[key] = jax.jit(call)
        return np.asarray(fn(*self._qkv(case), arrays))

    def vjp(self, case: Case) -> dict[str, np.ndarray]:
        """``dq, dk, dv`` (+ ``dbias``) from ``jax.vjp`` with cotangent ``case.g`` cast to the output dtype."""
        if "grad" not in self.info.features:
            raise Unsupported(f"{self.info.name} does not declare grad")
        if case.g is None:
            raise ValueError("vjp needs a cotangent: the case has no g")
        static, arrays, key = self._split(case)
        self._trim()
        _, names = split_arrays(case, arrays)
        fn = self._vjp_cache.get(key)
        if fn is None:

            def pullback(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, extra: dict) -> tuple:
                mask = {"mask": extra["mask"]} if "mask" in extra else {}

                def f(q: jax.Array, k: jax.Array, v: jax.Array, *bias: jax.Array) -> jax.Array:
                    return self.fn(q, k, v, **static, **mask, **({"bias": bias[0]} if bias else {}))

                primals = (q, k, v) + ((extra["bias"],) if "bias" in extra else ())
                out, back = jax.vjp(f, *primals)
                return back(g.astype(out.dtype))

            fn = self._vjp_cache[key] = jax.jit(pullback)
        grads = fn(*self._qkv(case), self._to_jax("g", case.g), arrays)
        return {name: np.asarray(x) for name, x in zip(names, grads, strict=True)}


ADAPTER = JaxAdapter
