"""Runs a JAX target on cases: numpy -> jax arrays of the same dtype, jitted calls, ``jax.vjp`` gradients.

Arrays keep their dtype exactly (bf16 is ``ml_dtypes.bfloat16`` on both sides; the mask stays
bool, the bias keeps its own dtype) and are placed on the device the target declares (``cpu``
even where a GPU is present, ``gpu`` only where jax has one). The call is jitted with the
non-array keywords (scale, causal, align, window, softcap, chunk sizes, return_lse) static and the
array keywords (mask, bias, ALiBi slopes, sinks, segment ids) traced; compiled functions
are cached per static keywords, and jax's own cache handles new shapes and dtypes; a persistent
compilation cache (``.attnverify/jax-cache``) serves repeated campaigns.

Compilation dominates JAX campaigns (~0.5-1 s a program, ~1 ms a run), so a case with a cotangent
compiles one program, not two: its forward pass runs the pullback program, which returns the
outputs with the gradients, and keeps the gradients for the case's next gradient pass (each
forward pass recomputes them, so the determinism check's repeated passes are real reruns). If that
program fails, the forward pass runs a forward-only program instead and the gradient pass reports
its own failure: a target whose backward is broken keeps its forward findings.

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
from verify.targets.base import Adapter, Output, TargetInfo, Unsupported, split_arrays, split_result
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

_ARRAY_KWARGS = ("mask", "bias", "alibi_slopes", "sinks", "q_segment_ids", "kv_segment_ids")  # traced
_DIFFERENTIABLE = ("bias", "sinks")  # array keywords that get a gradient, in split_arrays' order
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
        self._pending: tuple[Case, dict[str, np.ndarray]] | None = None  # gradients a forward pass computed

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

    def forward(self, case: Case) -> Output:
        """The target's output (and lse) for ``case``, as numpy in the dtypes the target returned."""
        self._pending = None
        if "grad" in self.info.features and case.g is not None:
            try:
                out, lse, grads = self._joint(case)
            except Exception:  # noqa: BLE001 - the forward-only program below says what is wrong, if anything
                pass
            else:
                self._pending = (case, grads)
                return Output(out, lse)
        static, arrays, key = self._split(case)
        self._trim()
        fn = self._forward_cache.get(key)
        if fn is None:

            def call(q: jax.Array, k: jax.Array, v: jax.Array, extra: dict) -> object:
                return self.fn(q, k, v, **static, **extra)

            fn = self._forward_cache[key] = jax.jit(call)
        out, lse = split_result(fn(*self._qkv(case), arrays), static, self.info.name)
        return Output(np.asarray(out), None if lse is None else np.asarray(lse))

    def vjp(self, case: Case) -> dict[str, np.ndarray]:
        """Gradients from ``jax.vjp``, the cotangents ``case.g`` (and ``case.g_lse``) cast to the outputs' dtypes."""
        if "grad" not in self.info.features:
            raise Unsupported(f"{self.info.name} does not declare grad")
        if case.g is None:
            raise ValueError("vjp needs a cotangent: the case has no g")
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is case:
            return pending[1]
        return self._joint(case)[2]

    def _joint(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
        """(out, lse, gradients) of ``case`` from one jitted pullback program."""
        static, arrays, key = self._split(case)
        self._trim()
        _, names = split_arrays(case, arrays)
        differentiable = [n for n in _DIFFERENTIABLE if n in arrays]
        fn = self._vjp_cache.get(key)
        if fn is None:

            def pullback(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, g_lse: jax.Array | None,
                         extra: dict) -> tuple:
                fixed = {n: x for n, x in extra.items() if n not in differentiable}

                def f(q: jax.Array, k: jax.Array, v: jax.Array, *diff: jax.Array) -> object:
                    return self.fn(q, k, v, **static, **fixed, **dict(zip(differentiable, diff, strict=True)))

                result, back = jax.vjp(f, q, k, v, *(extra[n] for n in differentiable))
                if not static.get("return_lse"):
                    return result, None, back(g.astype(result.dtype))
                out, lse = split_result(result, static, self.info.name)
                glse = jax.numpy.zeros_like(lse) if g_lse is None else g_lse.astype(lse.dtype)
                return out, lse, back((g.astype(out.dtype), glse))

            fn = self._vjp_cache[key] = jax.jit(pullback)
        g_lse = None if case.g_lse is None else self._to_jax("g_lse", case.g_lse)
        out, lse, grads = fn(*self._qkv(case), self._to_jax("g", case.g), g_lse, arrays)
        return (np.asarray(out), None if lse is None else np.asarray(lse),
                {name: np.asarray(x) for name, x in zip(names, grads, strict=True)})


ADAPTER = JaxAdapter
