"""Running a sweep: resumable cells, local worker processes or a Dask cluster, and the assembled report.

- **Resumable**: each finished cell is written to ``OUT/cells/<id>.json`` (atomically), ``id`` a hash
  of the schema version, the target spec, the settings that change figures and the cell's key. A
  rerun loads those and computes only the missing cells; ``fresh=True`` recomputes everything.
  Changing the target's *code* does not change ids: use ``fresh`` or another ``out`` to re-measure.
- **Workers**: work is sent in groups (cells sharing dtype, L, family, mask kind, softcap and window),
  so each group computes its exact reference once per seed for all chunk settings. ``workers=N`` (default 2) runs
  groups in N spawned processes (spawn, not fork: JAX and threaded BLAS do not survive fork) with
  one BLAS/OpenMP thread each; ``workers=1`` runs in this process; ``scheduler=ADDRESS`` submits the
  same function to a Dask distributed cluster (a user target's module must be importable there).
  Workers load the target from its ``TargetSpec`` once per process and return cells; only this
  process writes files. Figures are deterministic per cell, so every path gives the same cells.
- **Deterministic output**: ``report.json`` holds no timings (they change from run to run); the
  run's seconds go to ``timings.json`` beside it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

from verify.accuracy.figures import Task, adapter, run_group
from verify.accuracy.plan import SCHEMA_VERSION, Settings, cell_id, context, plan
from verify.isolation import child_threads
from verify.targets import TargetInfo, TargetSpec

PROGRESS_EVERY = 10.0


def target_info(target: TargetSpec) -> TargetInfo:
    """The target's declarations (loaded where the groups run, so this process needs no framework)."""
    return adapter(target).info


class _Runner:
    """Where groups run: this process (``workers == 1``), spawned local processes, or a Dask cluster."""

    def __init__(self, target: TargetSpec, workers: int, scheduler: str | None) -> None:
        self.target = target
        self.pool: ProcessPoolExecutor | None = None
        self.client = None
        self.where = f"{workers} local processes" if workers > 1 else "in-process"
        if scheduler:
            from distributed import Client

            self.where = f"dask {scheduler}"
            try:
                self.client = Client(scheduler)
            except OSError as exc:
                raise ValueError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from exc
            self._info = self.client.submit(target_info, target, pure=False)
        elif workers > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            with child_threads(1):  # each submit spawns a worker while none is idle: all load the target at once
                self._info = [self.pool.submit(target_info, target) for _ in range(workers)][0]

    def info(self) -> TargetInfo:
        return target_info(self.target) if self.pool is None and self.client is None else self._info.result()

    def results(self, tasks: list[Task]) -> Iterator[list[dict]]:
        """Each group's cells, in the order they finish."""
        if self.client is not None:
            from distributed import as_completed as dask_completed

            futures = [self.client.submit(run_group, t, pure=False) for t in tasks]
            try:
                for fut in dask_completed(futures):
                    yield fut.result()
            finally:
                self.client.cancel(futures)
        elif self.pool is not None:
            for fut in as_completed([self.pool.submit(run_group, t) for t in tasks]):
                yield fut.result()
        else:
            for task in tasks:
                yield run_group(task)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            self.client.close()


def compact(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=False, separators=(",", ":"))


def write_text(path: Path, text: str) -> None:
    """Write atomically, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_cell(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def progress_printer(name: str, enabled: bool = True) -> Callable[[int, int], None]:
    """A callback ``(done, total)`` printing a line to stderr at most every ``PROGRESS_EVERY`` seconds."""
    start = time.monotonic()
    last = [start]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if enabled and (now - last[0] >= PROGRESS_EVERY or done == total):
            last[0] = now
            print(f"  ... report {name}: {done}/{total} cells, {now - start:.0f} s", file=sys.stderr, flush=True)

    return show


def sweep(target: TargetSpec, sett: Settings, out: Path, *, workers: int = 2, scheduler: str | None = None,
          fresh: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run (or resume) a sweep into ``out/cells`` and return the assembled report (not yet written)."""
    sett.validate()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    runner = _Runner(target, workers, scheduler)
    try:
        info = runner.info()
        cells, skipped = plan(info, sett)
        if not cells:
            raise ValueError(f"nothing to run: {target.name} declares none of dtypes {list(sett.dtypes)}")
        ctx = context(target, sett)
        cell_dir = out / "cells"
        cell_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict] = {}
        for cell in cells:
            cid = cell_id(ctx, cell)
            old = None if fresh else _load_cell(cell_dir / f"{cid}.json")
            if old is not None and old.get("id") == cid:
                results[cid] = old
        reused = len(results)
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for cell in cells:
            if cell_id(ctx, cell) not in results:
                groups[(cell["dtype"], cell["length"], cell["family"], cell["mask"], cell["softcap"],
                        str(cell["window"]))].append(cell)
        tasks = sorted((Task(target, ctx, sett, tuple(g)) for g in groups.values()),
                       key=lambda t: -t.cells[0]["length"] ** 2 * len(t.cells))
        for done in runner.results(tasks):
            for cell in done:
                write_text(cell_dir / f"{cell['id']}.json", compact(cell) + "\n")
                results[cell["id"]] = cell
            if progress:
                progress(len(results), len(cells))
        where = runner.where
    finally:
        runner.close()
    wall = time.perf_counter() - t0
    ordered = [results[cell_id(ctx, c)] for c in cells]
    computed = len(cells) - reused
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "attnverify-accuracy-report",
        "target": {"name": info.name, "framework": info.framework, "device": info.device,
                   "dtypes": list(info.dtypes), "features": sorted(info.features),
                   "unexercised": info.unexercised(), "masked_rows": info.masked_rows,
                   "contract": asdict(info.contract), "description": info.description, "notes": info.notes,
                   "load": target.to_meta()},
        "settings": {**asdict(sett), "skipped": skipped,
                     "units": "max_allow: |got - exact| / allowance (a fuzz finding above 1); max_norm: "
                              "|got - exact| / (u·A), u the dtype's unit roundoff, A the absolute-value scale"},
        "run": {"computed": computed, "reused": reused, "seconds": wall,
                "cells_per_second": computed / wall if computed and wall > 0 else None, "workers": where},
        "naive64_vs_mp": _naive_sample(ordered),
        "cells": ordered,
    }


def _naive_sample(cells: list[dict]) -> dict:
    """The float64 naive reference's worst error against mp, in units of A, over every mp seed."""
    worst: dict[str, float] = {}
    count = 0
    for cell in cells:
        for s in cell["seeds"]:
            if s.get("naive64_vs_mp") is not None:
                count += 1
                for name, x in s["naive64_vs_mp"].items():
                    worst[name] = max(worst.get(name, 0.0), x)
    return {"cases": count, "max_error_in_A": worst,
            "note": "max |naive64 - mp| / A per output over the seeds where mp was the reference"}


def report_json(report: dict) -> str:
    """report.json's text: no timings; the header indented, then one line per cell (diffs line by cell)."""
    head = {k: v for k, v in report.items() if k not in ("cells", "run")}
    head["run"] = {k: v for k, v in report["run"].items() if k not in ("seconds", "cells_per_second", "computed",
                                                                         "reused")}
    text = json.dumps(head, indent=1, sort_keys=True, allow_nan=False)
    cells = ",\n".join(compact({k: v for k, v in c.items() if k != "seconds"}) for c in report["cells"])
    return f'{text[:-2]},\n "cells": [\n{cells}\n ]\n}}\n'


def timings_json(report: dict) -> str:
    """timings.json: the run's seconds and each cell's, the one output file meant to change between runs."""
    run = {k: report["run"][k] for k in ("seconds", "cells_per_second", "computed", "reused", "workers")}
    cells = {c["id"]: c.get("seconds") for c in report["cells"]}
    return json.dumps({"run": run, "cells": cells}, indent=1, sort_keys=True) + "\n"
