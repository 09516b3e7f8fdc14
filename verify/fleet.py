"""Distributed fuzzing: N campaigns over one target, one shared example database, one merged result.

``run(adapter, sett, workers=N)`` starts N campaigns (``fuzz.run``) in N local processes;
``scheduler=ADDRESS`` runs them on an existing Dask cluster instead, one per Dask worker (N
defaults to the cluster's worker count). Each campaign is a whole campaign under ``sett``: every
dtype, ``max_examples`` and ``budget`` each, so N workers run about N times the examples in the
same wall time.

- **Seeds**: worker 0 runs ``sett.seed`` itself (a one-worker fleet draws what ``fuzz.run`` draws);
  worker ``i`` runs ``worker_seed(seed, i)``, a hash of both, so a seeded fleet is reproducible and
  no two workers draw the same cases. ``seed=None`` leaves every worker random.
- **Database**: every worker opens the same directory (``sett.database``, made absolute) as a
  Hypothesis ``DirectoryBasedExampleDatabase``. Entries are one file each, written by rename, so
  concurrent writers are safe, and a failure one worker saved is replayed first by the others and by
  the next run. Several machines need that directory at the same path on every one of them, on a
  shared filesystem (NFS or similar). Without one, give each machine its own directory and merge
  them afterwards (entries are files named by hashes: copying the trees together merges them), or
  use one of Hypothesis's other backends (``hypothesis.extra.redis.RedisExampleDatabase``; in CI a
  ``GitHubArtifactDatabase`` inside a ``MultiplexedDatabase``), which ``fuzz`` would have to be
  taught to open: ``Settings.database`` is a directory today.
- **Findings**: workers send each finding, with its case files, as it is found; the merge
  (``verify.fleet_merge``) keeps one per ``Finding.key``, the smallest reproducer, and writes only those
  into ``sett.repro_dir`` (a worker's own files stay in a temporary directory on its machine, removed
  when it ends, together with its in-flight case). Duplicates are counted, not kept.
- **Result**: ``Fleet.to_json`` is a campaign JSON, the workers' accounts merged, plus ``fleet``: where
  it ran, finding counts and one row per worker. A worker that failed or died is a row with an
  ``error``, which makes the fleet incomplete. ``json_path`` is rewritten as findings come.
- **Interrupted** (Ctrl-C or SIGTERM of this process): the workers are told to stop (local ones by
  SIGTERM, Dask ones through an event they check after every example), get ``STOP_GRACE`` seconds
  to send what they have (shrunk or not), the JSON is written with ``interrupted: true``, and the
  interrupt is raised again. Local workers ignore Ctrl-C themselves (as do their target processes),
  so a Ctrl-C is never a crash finding; a worker whose parent died stops at its next example.
- **Dask**: the target travels as its ``TargetSpec`` (never a pickled function): its module must be
  importable on the workers, and so must ``verify``. A target run in its own process (the default,
  ``verify.isolation``) needs Dask workers that may start processes:
  ``DASK_DISTRIBUTED__WORKER__DAEMON=False`` (or ``--in-process``). Start workers with one thread
  each (``dask worker ADDRESS --nworkers N --nthreads 1``, ``OMP_NUM_THREADS=1``): each campaign is
  placed on its own Dask worker, and a process runs one campaign at a time.

Local workers are spawned (not forked: JAX and threaded BLAS do not survive fork) with one
BLAS/OpenMP thread each, as accuracy sweeps do (``verify.accuracy.runner``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from verify import fuzz
from verify.findings import Finding
from verify.fleet_merge import Fleet, Row, finding_files, write_atomic
from verify.isolation import child_threads
from verify.targets import Adapter, TargetSpec

SNAPSHOT_EVERY = 2.0  # seconds between a worker's progress reports
POLL = 0.25  # seconds between looks at the workers
STOP_GRACE = 30.0  # seconds stopped workers get to send what they have
LOST_GRACE = 2.0  # seconds a dead worker's last messages get to arrive before it counts as failed
CONNECT_TIMEOUT = 10.0  # seconds to reach a Dask scheduler
_ONE_AT_A_TIME = threading.Lock()  # campaigns patch process-wide state (compat.fixed_generation_constants)


def worker_seed(seed: int | None, index: int) -> int | None:
    """Worker ``index``'s campaign seed: ``seed`` itself for worker 0, a hash of both for the others."""
    if seed is None or index == 0:
        return seed
    return int(hashlib.sha256(f"{seed}/worker/{index}".encode()).hexdigest()[:8], 16)


# -- the worker side ----------------------------------------------------------------------------------------


class _LocalChannel:
    """A local worker's line to the fleet: a multiprocessing queue; the fleet process's death stops it."""

    def __init__(self, q: multiprocessing.Queue) -> None:
        self.queue, self.parent = q, os.getpid()

    def put(self, msg: dict) -> None:
        self.queue.put(msg)

    def stopping(self) -> bool:
        if os.getppid() == self.parent:
            return False
        self.queue.cancel_join_thread()  # nobody reads it any more: exit without flushing
        return True


class _DaskChannel:
    """A Dask worker's line to the fleet: a ``distributed.Queue`` and an ``Event`` the fleet sets to stop it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue = self._event = None  # made where it runs, from the Dask worker's client

    def put(self, msg: dict) -> None:
        if self._queue is None:
            from distributed import Queue

            self._queue = Queue(self.name)
        self._queue.put(msg)

    def stopping(self) -> bool:
        if self._event is None:
            from distributed import Event

            self._event = Event(self.name + "-stop")
        return self._event.is_set()


def work(target: dict, sett: fuzz.Settings, index: int, channel: _LocalChannel | _DaskChannel) -> None:
    """Worker ``index``'s campaign, wherever the fleet runs it; all it learns goes to ``channel``."""
    scratch = Path(tempfile.mkdtemp(prefix=f"attnverify-fleet-{index}-"))
    own = replace(sett, seed=worker_seed(sett.seed, index), repro_dir=scratch)
    latest: list[fuzz.Campaign] = []
    last = [0.0]

    def progress(camp: fuzz.Campaign, dtype: str) -> None:
        latest[:] = [camp]
        now = time.monotonic()
        if now - last[0] >= SNAPSHOT_EVERY:
            last[0] = now
            channel.put({"kind": "progress", "worker": index, "dtype": dtype, "campaign": camp.to_json()})
            if channel.stopping():
                raise fuzz.Interrupted(signal.SIGTERM)

    def finding(f: Finding) -> None:
        channel.put({"kind": "finding", "worker": index, "finding": f.to_json(), "files": finding_files([f])})

    try:
        with _ONE_AT_A_TIME:
            adapter = TargetSpec.from_meta(target).load()
            try:
                camp: fuzz.Campaign | None = fuzz.run(adapter, own, on_finding=finding, on_progress=progress)
            except KeyboardInterrupt:  # told to stop: what it has so far (None before its first example)
                camp = latest[0] if latest else None
        msg = {"kind": "done", "worker": index, "campaign": camp.to_json() if camp else None,
               "files": finding_files(camp.provisional) if camp else {}}
    except Exception as exc:  # noqa: BLE001 - the fleet reports it as this worker's error
        msg = {"kind": "error", "worker": index, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    channel.put(msg)


# -- where the workers run ----------------------------------------------------------------------------------


class _Local:
    """N spawned processes on this machine."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.where = f"{n} local process{'es' if n > 1 else ''}"
        self.ctx = multiprocessing.get_context("spawn")
        self.queue = self.ctx.Queue()
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def start(self, target: dict, sett: fuzz.Settings) -> None:
        channel = _LocalChannel(self.queue)
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None  # inherited
        try:
            with child_threads(1):  # one thread per worker, read at its start
                for i in range(self.n):
                    p = self.ctx.Process(target=work, args=(target, sett, i, channel), name=f"attnverify-fleet-{i}")
                    p.start()
                    self.procs.append(p)
        finally:
            if sigint is not None:
                signal.signal(signal.SIGINT, sigint)

    def drain(self) -> list[dict]:
        try:
            msgs = [self.queue.get(timeout=POLL)]
        except queue.Empty:
            return []
        while True:
            try:
                msgs.append(self.queue.get_nowait())
            except queue.Empty:
                return msgs

    def lost(self) -> dict[int, str]:
        """Workers whose process has ended, with how."""
        out = {}
        for i, p in enumerate(self.procs):
            if p.exitcode is not None:
                how = f"status {p.exitcode}" if p.exitcode >= 0 else f"signal {signal.Signals(-p.exitcode).name}"
                out[i] = f"worker process ended ({how}) before it reported"
        return out

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the campaign stops and writes what it has

    def close(self) -> None:
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.queue.close()


class _Dask:
    """N tasks on an existing Dask cluster, one per Dask worker."""

    def __init__(self, address: str, n: int | None) -> None:
        try:
            from distributed import Client, Event, Queue
        except ImportError as exc:
            raise ValueError("--scheduler needs the distributed package: pip install 'attnverify[report]'") from exc
        try:
            self.client = Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, ValueError) as exc:  # a timeout is an OSError
            raise ValueError(f"cannot reach the Dask scheduler {address}: {exc}") from exc
        self.addresses = sorted(self.client.nthreads())
        self.n = len(self.addresses) if n is None else n
        if not 1 <= self.n <= len(self.addresses):
            self.client.close()
            raise ValueError(f"the Dask cluster at {address} has {len(self.addresses)} worker(s); {self.n} campaigns "
                             f"need as many (one campaign per worker process: dask worker {address} --nworkers N "
                             f"--nthreads 1), or give fewer --workers")
        self.where = f"dask {address}"
        self.name = f"attnverify-fleet-{uuid.uuid4().hex}"
        self.queue = Queue(self.name, client=self.client)
        self.event = Event(self.name + "-stop", client=self.client)
        self.futures: list = []

    def start(self, target: dict, sett: fuzz.Settings) -> None:
        addresses = self.addresses[:self.n]
        if sett.isolate and any(self.client.run(_daemonic, workers=addresses).values()):
            raise ValueError("the Dask workers are daemonic processes and cannot start the target's own process: "
                             "start them with DASK_DISTRIBUTED__WORKER__DAEMON=False, or pass --in-process")
        channel = _DaskChannel(self.name)
        self.futures = [self.client.submit(work, target, sett, i, channel, key=f"{self.name}-{i}", pure=False,
                                           workers=[addr], allow_other_workers=True)
                        for i, addr in enumerate(addresses)]

    def drain(self) -> list[dict]:
        msgs = self.queue.get(batch=True)
        if not msgs:
            time.sleep(POLL)
        return list(msgs)

    def lost(self) -> dict[int, str]:
        return {i: f"Dask task {fut.status}: {fut.exception() if fut.status == 'error' else 'no result'}"
                for i, fut in enumerate(self.futures) if fut.status in ("error", "cancelled", "lost")}

    def stop(self) -> None:
        self.event.set()

    def close(self) -> None:
        self.client.cancel(self.futures)
        self.client.close()


def _daemonic() -> bool:
    return multiprocessing.current_process().daemon


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _sigterm(signum: int, _frame: object) -> None:
    raise fuzz.Interrupted(signum)


def run(adapter: Adapter, sett: fuzz.Settings, *, workers: int | None = None, scheduler: str | None = None,
        on_finding: Callable[[Finding, Finding | None], None] | None = None,
        on_progress: Callable[[Fleet], None] | None = None, json_path: Path | None = None) -> Fleet:
    """Run the fleet (see the module doc) and return it; ``ValueError`` for what cannot start.

    ``workers``: campaigns (default: the CPU count locally, the worker count on Dask).
    ``on_finding(f, replaced)`` runs for each finding kept: the first of its key (``replaced`` None)
    or a smaller reproducer of one. ``on_progress(fleet)`` runs a few times a second.
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if adapter.target is None:
        raise ValueError(f"{adapter.info.name} was built from a function in this process: a fleet loads the "
                         "target again in each worker, so name it (bundled name or package.module:function)")
    sett = replace(sett, database=None if sett.database is None else sett.database.resolve())
    backend = _Dask(scheduler, workers) if scheduler else _Local(workers or os.cpu_count() or 1)
    fleet = Fleet(adapter.info, sett, backend.where, [Row(i, worker_seed(sett.seed, i)) for i in range(backend.n)])

    def save() -> None:
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(json_path, (json.dumps(fleet.to_json(), indent=2) + "\n").encode())

    previous = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        backend.start(adapter.target.to_meta(), sett)
        try:
            _collect(fleet, backend, None, on_finding, on_progress, save)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (fuzz.Interrupted): stop the workers, keep what they send
            fleet.interrupted = True
            backend.stop()
            try:
                _collect(fleet, backend, time.monotonic() + STOP_GRACE, on_finding, on_progress, save)
            except KeyboardInterrupt:
                pass  # a second one: stop waiting
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        backend.close()
        for row in fleet.rows:
            if not row.done:  # still running when the stop's grace ran out
                row.done = row.stopped = True
        fleet.seconds = time.monotonic() - fleet.started
        save()
    return fleet


def _collect(fleet: Fleet, backend: _Local | _Dask, deadline: float | None,
             on_finding: Callable[[Finding, Finding | None], None] | None,
             on_progress: Callable[[Fleet], None] | None, save: Callable[[], None]) -> None:
    """Take the workers' messages until every worker has ended (or ``deadline``)."""
    gone: dict[int, float] = {}
    while not fleet.finished and (deadline is None or time.monotonic() < deadline):
        changed = False
        for msg in backend.drain():
            changed |= fleet.receive(msg, on_finding)
        now = time.monotonic()
        for i, why in backend.lost().items():
            row = fleet.rows[i]
            if not row.done and now - gone.setdefault(i, now) > LOST_GRACE:
                row.done, changed = True, True
                if fleet.interrupted:
                    row.stopped = True
                else:
                    row.error = why
        if changed:
            save()
        if on_progress:
            on_progress(fleet)
