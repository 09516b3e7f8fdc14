"""Measuring temporary memory of one target pass: XLA's compiled memory analysis (JAX), the allocator peak (torch).


Shapes are ``[B, L, H, D]`` with Lq = Lk = L and Dk = Dv = D; "forward" is one call, "fwd+bwd" is
``dq, dk, dv`` = the VJP of the output with a cotangent ``g`` (forward and backward pass).

Two measures, both in bytes, both excluding the inputs (q, k, v, g):

- ``temp``. JAX targets: ``temp_size_in_bytes`` of XLA's memory analysis of the compiled program
  (``jax.jit(f).lower(...).compile().memory_analysis()``; compile only, nothing runs, the figure is
  deterministic). Arguments and results are counted apart by XLA (``argument_size_in_bytes``,
  ``output_size_in_bytes``), but a staging copy of a result, or an accumulator of result size that
  XLA does not place in the result buffer, is a temporary. Torch targets: the peak, over one call,
  of the bytes allocated by torch since the call began (CPU: the running sum of the allocation
  events of ``torch.profiler`` with ``profile_memory=True``; CUDA: ``torch.cuda.max_memory_allocated``),
  minus the bytes of the returned results, so that it is comparable with XLA's figure.
- ``beyond`` (JAX only): ``temp`` minus the temporary bytes that XLA's buffer assignment gives to
  arrays *shaped like a result* (the output, or one of dq, dk, dv: the same dimensions other than
  1, in any order and any dtype -- a transposed copy or a float32 accumulator counts; read from the
  ``*buffer-assignment.txt`` dump of the same compilation). It is the memory beyond the O(L * D)
  arrays an attention produces anyway -- the paper's O(sqrt(n)) is such additional memory. A
  differently shaped staging buffer (a stacked ``[chunks, chunk, ...]`` output) stays in. ``None``
  where the dump cannot be read (XLA's text format), and where a chunk spans the whole length
  (its per-chunk arrays are then result-shaped too).

Chunk policies are ``QxK`` with Q, K an integer or ``sqrt`` (``isqrt(L)``); sizes larger than L are
clipped to L (``attention`` does the same). A target without the ``chunks`` feature (jax-dpa,
torch-sdpa: the dense references) is measured once per length, as policy ``dense``.
"""

from __future__ import annotations

import glob
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oracles import spec
from verify.compat import torch_cpu_memory_events
from verify.targets import Adapter

PASSES = ("forward", "fwd+bwd")
MEASURES = {
    "jax": {
        "temp": "XLA compiled memory analysis, temp_size_in_bytes (compile only)",
        "beyond": "temp minus XLA temporaries holding arrays shaped like a result (buffer-assignment dump; "
        "empty where a chunk spans L)",
    },
    "torch": {
        "temp": "peak bytes allocated by torch during the call minus the results' bytes "
        "(CPU: torch.profiler memory events; CUDA: torch.cuda.max_memory_allocated)",
    },
}


@dataclass(frozen=True)
class Policy:
    """A (query chunk, key chunk) rule: each an integer, or ``sqrt`` for isqrt(L)."""

    query: str
    key: str

    @property
    def name(self) -> str:
        return "dense" if self == DENSE_POLICY else f"{self.query}x{self.key}"

    def sizes(self, length: int) -> tuple[int, int]:
        """(query chunk, key chunk) at sequence length ``length``, clipped to it."""
        return tuple(min(math.isqrt(length) if t == "sqrt" else int(t), length) for t in (self.query, self.key))


DENSE_POLICY = Policy("dense", "dense")


def parse_policies(text: str) -> list[Policy]:
    """``"1024x4096,1024xsqrt"`` -> policies; raises ValueError on a malformed one."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split("x")
        if len(parts) != 2 or not all(p == "sqrt" or (p.isdigit() and int(p) > 0) for p in parts):
            raise ValueError(f"bad chunk policy {item!r}: write QxK with Q, K a positive integer or sqrt")
        out.append(Policy(*parts))
    if not out:
        raise ValueError("no chunk policy given")
    return out


@dataclass(frozen=True)
class Row:
    """One measurement: bytes for one target, pass, chunk sizes and length."""

    target: str
    pass_: str
    policy: str
    query_chunk: int | None
    key_chunk: int | None
    length: int
    temp: int
    beyond: int | None
    result_bytes: int


def _chunk_kwargs(policy: Policy, length: int) -> dict:
    if policy == DENSE_POLICY:
        return {}
    qc, kc = policy.sizes(length)
    return {"query_chunk_size": qc, "key_chunk_size": kc}


# --- JAX: XLA memory analysis -----------------------------------------------------------------

_ALLOCATION = re.compile(r"^allocation \d+: size (\d+)(.*)$")
_VALUE = re.compile(r"^\s*value: <.*> \(size=(\d+),offset=(\d+)\): \w+\[([\d,]*)\]")


def shape_key(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape's dimensions other than 1, sorted: equal for an array, its transposes and bitcasts."""
    return tuple(sorted(d for d in shape if d != 1))


def result_shaped_temp_bytes(assignment: str, result_keys: set[tuple[int, ...]]) -> int | None:
    """Bytes of XLA's temporary allocations covered by arrays shaped like a result.

    ``assignment`` is the text of XLA's ``*buffer-assignment.txt``; ``result_keys`` the results'
    ``shape_key``s (any dtype matches: a float32 accumulator of a bf16 result counts). The union of
    such arrays' byte ranges is counted in each temporary allocation (arrays sharing a range count
    once). None if the text has no allocation XLA marks as a temporary.
    """
    covered, found = 0, False
    ranges: list[tuple[int, int]] | None = None

    def close() -> int:
        total, end = 0, -1
        for start, stop in sorted(ranges or []):
            if stop > end:
                total += stop - max(start, end)
                end = stop
        return total

    for line in assignment.splitlines():
        header = _ALLOCATION.match(line)
        if header:
            covered += close()
            is_temp = "preallocated-temp" in header.group(2) or header.group(2).strip() == ":"
            ranges = [] if is_temp else None
            found = found or is_temp
            continue
        value = _VALUE.match(line)
        if value and ranges is not None:
            size, offset, dims = int(value.group(1)), int(value.group(2)), value.group(3)
            if shape_key([int(d) for d in dims.split(",") if d]) in result_keys:
                ranges.append((offset, offset + size))
    covered += close()
    return covered if found else None


_XLA_MEMO: dict[str, tuple[int, int | None, int]] = {}  # HLO text -> (temp, beyond, result bytes)


def _jax_bytes(fn: Callable, device: str, shape: tuple[int, ...], dtype: np.dtype,
               pass_: str) -> tuple[int, int | None, int]:
    """(temp, beyond, result bytes) of XLA's compilation of one pass."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    sharding = jax.sharding.SingleDeviceSharding(jax.devices(device)[0])
    arg = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    if pass_ == "forward":
        f, args = (lambda q, k, v: fn(q, k, v)), (arg,) * 3
    else:
        f, args = (lambda q, k, v, g: jax.vjp(fn, q, k, v)[1](g)), (arg,) * 4
    lowered = jax.jit(f).lower(*args)
    key = lowered.as_text()
    if key not in _XLA_MEMO:
        results = jax.tree_util.tree_leaves(lowered.out_info)
        keys = {shape_key(r.shape) for r in results}
        # A cached executable comes without a dump, so the persistent cache is off for this compile.
        # JAX decides once per process whether it uses the cache (the first compile's answer stays),
        # so the switch only takes with reset_cache, before and after (the next compile re-decides).
        cache_was = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        compilation_cache.reset_cache()
        try:
            with tempfile.TemporaryDirectory(prefix="attnverify-xla-") as dump:
                compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
                files = glob.glob(os.path.join(dump, "*buffer-assignment.txt"))
                covered = result_shaped_temp_bytes(Path(files[0]).read_text(), keys) if len(files) == 1 else None
        finally:
            jax.config.update("jax_enable_compilation_cache", cache_was)
            compilation_cache.reset_cache()
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
        result_bytes = sum(math.prod(r.shape) * np.dtype(r.dtype).itemsize for r in results)
        _XLA_MEMO[key] = (temp, None if covered is None else temp - covered, result_bytes)
    return _XLA_MEMO[key]


# --- torch: allocator peak ----------------------------------------------------------------------


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _torch_peak(run: Callable, device: str) -> tuple[int, object]:
    """(peak bytes allocated above the level at the start, results) of ``run()``."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        results = run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, results
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        results = run()
    events = torch_cpu_memory_events(prof)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak, results


def _torch_bytes(fn: Callable, device: str, shape: tuple[int, ...], dtype: str, pass_: str) -> tuple[int, None, int]:
    """(temp, None, result bytes) of one pass run once (after one warm-up run)."""
    import torch

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[dtype]
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(shape, generator=gen).to(device=device, dtype=tdtype) for _ in range(4))
    if pass_ == "forward":

        def run() -> tuple:
            with torch.no_grad():
                return (fn(q, k, v),)
    else:
        for x in (q, k, v):
            x.requires_grad_(True)

        def run() -> tuple:
            return torch.autograd.grad(fn(q, k, v), (q, k, v), g)

    run()  # warm-up: lazy initialisation is not the algorithm's memory
    peak, results = _torch_peak(run, device)
    result_bytes = sum(t.numel() * t.element_size() for t in results)
    return peak - result_bytes, None, result_bytes


# --- measuring ------------------------------------------------------------------------------------


def _measure_one(adapter: Adapter, kwargs: dict, length: int, pass_: str, heads: int, dim: int, dtype: str,
                 batch: int) -> tuple[int, int | None, int]:
    def fn(q: object, k: object, v: object) -> object:
        return adapter.fn(q, k, v, **kwargs)

    shape = (batch, length, heads, dim)
    if adapter.info.framework == "jax":
        return _jax_bytes(fn, adapter.info.device, shape, spec.as_dtype(dtype), pass_)
    if adapter.info.framework == "torch":
        return _torch_bytes(fn, adapter.info.device, shape, dtype, pass_)
    raise ValueError(f"memory: target {adapter.info.name} is {adapter.info.framework}; only jax and torch are measured")


def measure(
    adapter: Adapter,
    lengths: Sequence[int],
    policies: Sequence[Policy],
    *,
    heads: int = 1,
    dim: int = 64,
    dtype: str = "fp32",
    batch: int = 1,
    passes: Sequence[str] = PASSES,
) -> list[Row]:
    """Bytes for each pass, policy and length; a target without chunks gets the single policy ``dense``."""
    if "chunks" not in adapter.info.features:
        policies = [DENSE_POLICY]
    rows = []
    for pass_ in passes:
        if pass_ not in PASSES:
            raise ValueError(f"unknown pass {pass_!r}; known: {', '.join(PASSES)}")
        for policy in policies:
            for length in lengths:
                kw = _chunk_kwargs(policy, length)
                temp, beyond, result = _measure_one(adapter, kw, length, pass_, heads, dim, dtype, batch)
                if length in kw.values():  # a chunk spanning L has result-shaped arrays of its own
                    beyond = None
                rows.append(Row(adapter.info.name, pass_, policy.name, kw.get("query_chunk_size"),
                                kw.get("key_chunk_size"), length, temp, beyond, result))
    return rows
