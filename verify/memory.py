"""``attnverify memory``: temporary memory against sequence length, per (query chunk, key chunk) policy.

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

import argparse
import glob
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from oracles import spec
from verify.targets import Adapter, load

SCHEMA_VERSION = 1
PASSES = ("forward", "fwd+bwd")
DENSE = {"jax": "jax-dpa", "torch": "torch-sdpa"}
PAPER_LENGTH = 16384
PAPER_RATIO = {"forward": 59.0, "fwd+bwd": 32.0}  # Rabe & Staats: memory overhead reduced 59x / 32x at n = 16384
DEFAULT_POLICIES = "1024x4096,1024xsqrt,sqrtxsqrt,64x64"
DEFAULT_LENGTHS = {"jax": (1024, 4096, 16384, 65536), "torch": (256, 1024, 4096)}  # powers of 4: isqrt(L) divides L
DEFAULT_QUERY_SWEEP = (64, 128, 256, 512, 1024, 2048)
DEFAULT_KEY_SWEEP = (32, 64, 128, 256, 512, 1024, 2048, 4096)
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
        cache_was = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)  # a cached executable comes without a dump
        try:
            with tempfile.TemporaryDirectory(prefix="attnverify-xla-") as dump:
                compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
                files = glob.glob(os.path.join(dump, "*buffer-assignment.txt"))
                covered = result_shaped_temp_bytes(Path(files[0]).read_text(), keys) if len(files) == 1 else None
        finally:
            jax.config.update("jax_enable_compilation_cache", cache_was)
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
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
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
    target_name: str,
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
    adapter = load(target_name)
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


def fit_exponent(lengths: Sequence[float], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(length); None with fewer than two positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(lengths, values, strict=True) if y is not None and y > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def exponents(rows: Sequence[Row]) -> list[dict]:
    """The fitted exponent in L of each measure, per (target, pass, policy)."""
    out = []
    for key in dict.fromkeys((r.target, r.pass_, r.policy) for r in rows):
        group = sorted((r for r in rows if (r.target, r.pass_, r.policy) == key), key=lambda r: r.length)
        for measure_name in ("temp", "beyond"):
            values = [getattr(r, measure_name) for r in group]
            if all(v is None for v in values):
                continue
            out.append({"target": key[0], "pass": key[1], "policy": key[2], "measure": measure_name,
                        "exponent": fit_exponent([r.length for r in group], values),
                        "lengths": [r.length for r in group]})
    return out


def ratios(dense: Sequence[Row], chunked: Sequence[Row]) -> list[dict]:
    """dense / chunked bytes per pass, policy and measure, at the paper's L = 16384 if both have it, else the
    largest length both have."""
    out = []
    for pass_ in PASSES:
        ref = {r.length: r for r in dense if r.pass_ == pass_}
        for policy in dict.fromkeys(r.policy for r in chunked if r.pass_ == pass_):
            mine = {r.length: r for r in chunked if r.pass_ == pass_ and r.policy == policy}
            common = sorted(set(ref) & set(mine))
            if not common:
                continue
            n = PAPER_LENGTH if PAPER_LENGTH in common else common[-1]
            for measure_name in ("temp", "beyond"):
                a, b = getattr(ref[n], measure_name), getattr(mine[n], measure_name)
                if a is not None and b:
                    out.append({"pass": pass_, "policy": policy, "length": n, "measure": measure_name,
                                "dense": a, "chunked": b, "ratio": a / b, "paper_ratio": PAPER_RATIO[pass_],
                                "paper_length": PAPER_LENGTH})
    return out


# --- report ---------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.3f}"


def _length_table(rows: Sequence[Row], pass_: str, measure_name: str) -> list[str]:
    sel = [r for r in rows if r.pass_ == pass_ and getattr(r, measure_name) is not None]
    if not sel:
        return []
    lengths = sorted({r.length for r in sel})
    lines = [f"| target | policy (q x k) | {' | '.join(str(n) for n in lengths)} | exponent |",
             "| --- | --- |" + " ---: |" * (len(lengths) + 1)]
    for key in dict.fromkeys((r.target, r.policy) for r in sel):
        group = {r.length: r for r in sel if (r.target, r.policy) == key}
        exp = fit_exponent(sorted(group), [getattr(group[n], measure_name) for n in sorted(group)])
        cells = [_mib(getattr(group[n], measure_name)) if n in group else "" for n in lengths]
        lines.append(f"| {key[0]} | {key[1]} | {' | '.join(cells)} | {'—' if exp is None else f'{exp:.2f}'} |")
    return lines


def _sweep_table(rows: Sequence[Row], vary: str) -> list[str]:
    if not rows:
        return []
    has_beyond = any(r.beyond is not None for r in rows)
    head = "| query chunk | key chunk | temp MiB |" + (" beyond MiB |" if has_beyond else "") + " temp / first |"
    lines = [head, "| ---: | ---: | ---: |" + (" ---: |" if has_beyond else "") + " ---: |"]
    for r in rows:
        extra = f" {_mib(r.beyond)} |" if has_beyond else ""
        lines.append(f"| {r.query_chunk} | {r.key_chunk} | {_mib(r.temp)} |{extra} {r.temp / rows[0].temp:.2f} |")
    return lines


def _measure_of(rows: Sequence[Row]) -> str:
    """``beyond`` where every row has it, else ``temp``."""
    return "beyond" if rows and all(r.beyond is not None for r in rows) else "temp"


def chunk_model(rows: Sequence[Row]) -> dict | None:
    """Least squares ``bytes = A + B * key_chunk + C * ceil(L / key_chunk)`` over rows at one query chunk and L.

    A: what does not depend on the key chunk; B: bytes per key of a key chunk (the logits blocks);
    C: bytes per key chunk (summaries or carries kept for every key chunk); each also per query row.
    Fitted to ``beyond`` where every row has it, else to ``temp``.
    """
    if len(rows) < 4:
        return None
    measure_name = _measure_of(rows)
    kc = np.array([r.key_chunk for r in rows], float)
    nk = np.array([math.ceil(r.length / r.key_chunk) for r in rows], float)
    design = np.stack([np.ones_like(kc), kc, nk], axis=1)
    values = np.array([getattr(r, measure_name) for r in rows], float)
    (a, b, c), *_ = np.linalg.lstsq(design, values, rcond=None)
    cq = rows[0].query_chunk
    return {"measure": measure_name, "query_chunk": cq, "length": rows[0].length, "A": a, "B": b, "C": c,
            "A_per_row": a / cq, "B_per_row": b / cq, "C_per_row": c / cq}


def _sweeps(sweep: Sequence[Row], pass_: str) -> tuple[list[Row], list[Row]]:
    """(query-chunk sweep, key-chunk sweep) rows of one pass, each sorted by the chunk it varies."""
    qs = sorted((r for r in sweep if r.pass_ == pass_ and r.policy.startswith("q-sweep")), key=lambda r: r.query_chunk)
    ks = sorted((r for r in sweep if r.pass_ == pass_ and r.policy.startswith("k-sweep")), key=lambda r: r.key_chunk)
    return qs, ks


def _answer(sweep: Sequence[Row], models: dict) -> list[str]:
    """The seed question's answer in measured numbers."""
    lines = []
    for pass_ in PASSES:
        qs, ks = _sweeps(sweep, pass_)
        model = models.get(pass_)
        if len(qs) < 2 or model is None:
            continue
        mq = _measure_of(qs)
        first, last = getattr(qs[0], mq), getattr(qs[-1], mq)
        slope = fit_exponent([r.query_chunk for r in qs], [getattr(r, mq) for r in qs])
        best = ""
        if model["B"] > 0 and model["C"] > 0:
            optimum = math.sqrt(model["C"] * model["length"] / model["B"])
            best = f"; smallest at key_chunk = sqrt(C * L / B) = {optimum:.0f}"
        lines.append(
            f"- **{pass_}**, L = {qs[0].length}. Query chunk {qs[0].query_chunk} -> {qs[-1].query_chunk} "
            f"(x{qs[-1].query_chunk / qs[0].query_chunk:.0f}) at key chunk {qs[0].key_chunk}: `{mq}` "
            f"{_mib(first)} -> {_mib(last)} MiB (x{last / first:.1f}; log-log slope {slope:.2f} in the query chunk). "
            f"Key chunk {ks[0].key_chunk} -> {ks[-1].key_chunk} at query chunk {model['query_chunk']}: "
            f"`{model['measure']}` {_mib(getattr(ks[0], model['measure']))} -> "
            f"{_mib(getattr(ks[-1], model['measure']))} MiB; least squares "
            f"A + B * key_chunk + C * ceil(L / key_chunk) gives A = {_mib(round(model['A']))} MiB "
            f"({model['A_per_row']:.0f} B per query row), B = {model['B_per_row']:.1f} B per query row and key, "
            f"C = {model['C_per_row']:.1f} B per query row and key chunk{best}."
        )
    if lines:
        lines += [
            "",
            "So memory ~ query_chunk x (a + b * key_chunk + c * L / key_chunk), with a, b, c the per-row figures "
            "above: the query chunk multiplies every per-chunk buffer (the query_chunk x key_chunk logits block, "
            "the query_chunk x D accumulators, and one summary or carry per key chunk where c > 0), so memory "
            "is linear in it. The number of query chunks, L / query_chunk, does not appear: query chunks run one "
            "after another and reuse the same buffers. With the query chunk fixed (the paper's listing uses "
            "1024, a constant independent of n) and key_chunk = sqrt(L), both b * key_chunk and c * L / key_chunk "
            "grow like sqrt(L) (c is the listing's sqrt(n) summaries of query_chunk x Dv; a loop that folds each "
            "key chunk into a running max, sum and accumulator has c ~ 0 in the forward), so memory is "
            "O(query_chunk * sqrt(L)) = O(sqrt(L)): the query chunk is a constant factor, which is why the "
            "paper's O(sqrt(n)) omits it. The L-independent part a keeps a fitted exponent in L below 0.5 until "
            "(b + c) * sqrt(L) >> a.",
        ]
    return lines


def write_report(out_dir: Path, meta: dict, rows: Sequence[Row], sweep: Sequence[Row],
                 ratio_rows: Sequence[dict]) -> None:
    """memory.json, memory.md and memory.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {p: m for p in PASSES if (m := chunk_model(_sweeps(sweep, p)[1])) is not None}
    doc = {"schema_version": SCHEMA_VERSION, **meta, "rows": [_row_dict(r) for r in rows],
           "exponents": exponents(rows), "ratios": list(ratio_rows), "sweep": [_row_dict(r) for r in sweep],
           "chunk_model": models}
    (out_dir / "memory.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"# Memory against sequence length: {meta['target']}", "",
          f"B={meta['batch']} H={meta['heads']} D={meta['dim']} {meta['dtype']}, Lq = Lk = L; "
          f"{meta['framework']} on {meta['device']}. Bytes shown in MiB. Measures:", ""]
    md += [f"- `{k}`: {v}" for k, v in meta["measures"].items()]
    md += ["", "Exponent: least-squares slope of log(bytes) against log(L) over the lengths shown.", ""]
    for pass_ in PASSES:
        for measure_name in meta["measures"]:
            table = _length_table(rows, pass_, measure_name)
            if table:
                md += [f"## {pass_}: `{measure_name}` (MiB)", "", *table, ""]
    if ratio_rows:
        md += ["## Dense / chunked", "",
               "| pass | policy | L | measure | dense MiB | chunked MiB | ratio | paper (L = 16384) |",
               "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        md += [f"| {r['pass']} | {r['policy']} | {r['length']} | {r['measure']} | {_mib(r['dense'])} | "
               f"{_mib(r['chunked'])} | {r['ratio']:.1f}x | {r['paper_ratio']:.0f}x |" for r in ratio_rows]
        md.append("")
    if sweep:
        for pass_ in PASSES:
            for name, part, vary in zip(("query chunk", "key chunk"), _sweeps(sweep, pass_),
                                        ("query_chunk", "key_chunk"), strict=True):
                table = _sweep_table(part, vary)
                if table:
                    md += [f"## {pass_}, L = {sweep[0].length}: varying the {name}", "", *table, ""]
        md += ["## How memory depends on the query and key chunk sizes (shared/seed.md)", "",
               *_answer(sweep, models), ""]
    (out_dir / "memory.md").write_text("\n".join(md).rstrip() + "\n")
    _plot(out_dir / "memory.png", rows, sweep, meta)


def _row_dict(r: Row) -> dict:
    d = asdict(r)
    d["pass"] = d.pop("pass_")
    return d


def _plot(path: Path, rows: Sequence[Row], sweep: Sequence[Row], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 if sweep else 1, 2, figsize=(12, 9 if sweep else 4.8), squeeze=False)
    for ax, pass_ in zip(axes[0], PASSES, strict=True):
        for key in dict.fromkeys((r.target, r.policy) for r in rows if r.pass_ == pass_):
            group = sorted((r for r in rows if (r.target, r.policy, r.pass_) == (*key, pass_)), key=lambda r: r.length)
            (line,) = ax.loglog([r.length for r in group], [r.temp for r in group], "o-", label=f"{key[0]} {key[1]}")
            if any(r.beyond is not None for r in group):
                ax.loglog([r.length for r in group], [r.beyond for r in group], "x--", color=line.get_color(),
                          label=f"{key[0]} {key[1]} (beyond)")
        ax.set(title=f"{pass_}: temporary memory", xlabel="sequence length L", ylabel="bytes")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    if sweep:
        for ax, prefix, vary in zip(axes[1], ("q-sweep", "k-sweep"), ("query_chunk", "key_chunk"), strict=True):
            for pass_ in PASSES:
                group = sorted((r for r in sweep if r.pass_ == pass_ and r.policy.startswith(prefix)),
                               key=lambda r: getattr(r, vary))
                if group:
                    xs = [getattr(r, vary) for r in group]
                    (line,) = ax.loglog(xs, [r.temp for r in group], "o-", label=f"{pass_} temp")
                    if all(r.beyond is not None for r in group):
                        ax.loglog(xs, [r.beyond for r in group], "x--", color=line.get_color(), label=f"{pass_} beyond")
            fixed = "key chunk" if vary == "query_chunk" else "query chunk"
            ax.set(title=f"L = {sweep[0].length}, {fixed} fixed", xlabel=vary.replace("_", " "), ylabel="bytes")
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{meta['target']}: B={meta['batch']} H={meta['heads']} D={meta['dim']} {meta['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``memory`` subcommand."""
    p = subparsers.add_parser("memory", help="temporary memory against sequence length per chunk policy")
    p.add_argument("--target", required=True, help="bundled name or package.module:function (jax or torch)")
    p.add_argument("--lengths", type=_ints, help="comma list (default: jax 1024..16384, torch 1024..4096)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma list of QxK, Q and K an integer or sqrt")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(spec.DTYPES), default="fp32")
    p.add_argument("--reference", default="auto",
                   help="dense target for the ratio (default jax-dpa / torch-sdpa by framework; 'none' to skip)")
    p.add_argument("--sweep-length", type=int,
                   help="L of the chunk-size sweeps (default 16384 if measured, else the largest length)")
    p.add_argument("--query-chunks", type=_ints, default=list(DEFAULT_QUERY_SWEEP),
                   help="query chunks of the sweep at key chunk isqrt(L)")
    p.add_argument("--key-chunks", type=_ints, default=list(DEFAULT_KEY_SWEEP),
                   help="key chunks of the sweep at query chunk 1024")
    p.add_argument("--out", default="reports/memory", help="directory for memory.json, memory.md, memory.png")
    return p


def run(args: argparse.Namespace) -> int:
    """Measure, write the three files into ``--out`` and print the markdown report."""
    t0 = time.perf_counter()
    adapter = load(args.target)
    framework = adapter.info.framework
    if framework not in MEASURES:
        raise ValueError(f"memory: target {args.target} is {framework}; only jax and torch targets are measured")
    lengths = sorted(set(args.lengths or DEFAULT_LENGTHS[framework]))
    policies = parse_policies(args.policies)
    shape = {"heads": args.heads, "dim": args.dim, "dtype": args.dtype, "batch": args.batch}
    rows = measure(args.target, lengths, policies, **shape)
    reference = DENSE[framework] if args.reference == "auto" else args.reference
    ratio_rows: list[dict] = []
    if reference != "none" and reference != adapter.info.name:
        dense = measure(reference, lengths, [], **shape)
        ratio_rows = ratios(dense, rows) if "chunks" in adapter.info.features else []
        rows = rows + dense
    sweep: list[Row] = []
    if "chunks" in adapter.info.features:
        n = args.sweep_length or (PAPER_LENGTH if PAPER_LENGTH in lengths else lengths[-1])
        root = str(math.isqrt(n))
        for prefix, sizes, make in (("q-sweep", args.query_chunks, lambda c: Policy(str(c), root)),
                                    ("k-sweep", args.key_chunks, lambda c: Policy("1024", str(c)))):
            for r in measure(args.target, [n], [make(c) for c in sizes if c <= n], **shape):
                sweep.append(Row(**{**asdict(r), "policy": f"{prefix} {r.policy}"}))
    meta = {"target": adapter.info.name, "reference": None if reference == "none" else reference,
            "framework": framework, "device": adapter.info.device, **shape, "lengths": lengths,
            "policies": [p.name for p in policies], "measures": MEASURES[framework],
            "seconds": round(time.perf_counter() - t0, 1)}
    write_report(Path(args.out), meta, rows, sweep, ratio_rows)
    print((Path(args.out) / "memory.md").read_text())
    print(f"wrote {args.out}/memory.json, memory.md, memory.png in {time.perf_counter() - t0:.1f} s")
    return 0
