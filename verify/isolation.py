"""Running the target in a worker process, so that its crashes, hangs and leaks are findings, not ours.

``Worker`` is the default executor of campaigns (``verify.execution`` defines the interface): one
child process, started on the first case and reused, loads the target from its ``TargetSpec`` and
runs each case's passes. What the parent sees:

- a pass that raises: ``raised`` (the exception's type, message and innermost frame);
- a child killed by a signal (SIGSEGV, SIGABRT, SIGBUS, SIGILL, the out-of-memory killer's
  SIGKILL) or exiting: ``crash`` naming the signal or status and the pass that was running;
  the next case starts a fresh child;
- a pass still running after its time limit: ``timeout``; the child is killed (no thread or
  process is left behind) and replaced.

Recycling, never reported: after each case the child reports its memory mappings
(``/proc/self/maps``; XLA:CPU keeps some per compiled program, and the kernel's limit
``vm.max_map_count`` is 65530 here); past ``MAX_MAPS`` the parent replaces it before the next case,
so a long campaign on a JAX target that compiles thousands of programs does not die of
"LLVM compilation error: Cannot allocate memory".

The cost: the start (imports and target load, seconds for torch or jax) once per worker, and
per case one pickled round trip of the inputs and results (``benchmarks/bench_isolation.py``).
The worker runs with one BLAS/OpenMP thread (``threads``): it computes while this process computes
the exact values, and on two cores two processes with two spinning OpenMP threads each ran a
campaign five times slower than one process.
The case itself is written to disk by the campaign before every call (``fuzz``), so even a crash
of the whole machine leaves it behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection

from verify.case import Case
from verify.execution import CallFailure, Calls, base_pass, call_pass, failure_of
from verify.targets.base import TargetInfo
from verify.targets.loader import TargetSpec

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
MAX_MAPS = 40000  # memory mappings after which a worker is replaced (vm.max_map_count is 65530 by default)
START_TIMEOUT = 300.0  # seconds a worker may take to import its framework and load the target


@contextmanager
def child_threads(n: int) -> Iterator[None]:
    """Processes started inside get ``n`` BLAS/OpenMP threads (the variables their libraries read at start)."""
    saved = {var: os.environ.get(var) for var in THREAD_VARS}
    os.environ.update(dict.fromkeys(THREAD_VARS, str(n)))
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var)
            else:
                os.environ[var] = value


def _maps() -> int:
    """How many memory mappings this process has (0 where /proc is absent)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _serve(conn: Connection, target: dict) -> None:
    """The worker's loop: load the target, then run (case, passes) requests until told to stop."""
    try:
        adapter = TargetSpec.from_meta(target).load()
    except Exception as exc:  # noqa: BLE001 - the parent turns this into a clear error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        request = conn.recv()
        if request is None:
            return
        case, passes = request
        for name in passes:
            started = time.monotonic()
            conn.send(("start", name, started))  # the clock is the system's: the parent compares it
            try:
                value = call_pass(adapter, case, name)
            except Exception as exc:  # noqa: BLE001 - a target's exception is a result
                conn.send(("failed", name, failure_of(exc)))
                break
            conn.send(("done", name, value, time.monotonic() - started))
        conn.send(("end", _maps()))


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "the target's process stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"the target's process was killed by {name} (signal {-exitcode})"
    return f"the target's process exited with status {exitcode}"


class Worker:
    """Runs a loadable target in a child process (see the module doc); the same interface as ``InProcess``."""

    def __init__(self, target: TargetSpec, info: TargetInfo, threads: int = 1, max_maps: int = MAX_MAPS) -> None:
        self.target, self.info, self.threads, self.max_maps = target, info, threads, max_maps
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.starts = 0  # how many workers were started (the first, then after crashes, timeouts, recycling)
        self.recycled = 0

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self.target.to_meta()), daemon=True,
                                       name=f"attnverify-worker-{self.info.name}")
        with child_threads(self.threads):
            self._proc.start()
        child.close()
        self._conn = parent
        self.starts += 1
        if not parent.poll(START_TIMEOUT):
            self._kill()
            raise RuntimeError(f"the worker for {self.info.name} did not start within {START_TIMEOUT:g} s")
        kind, detail = parent.recv()
        if kind == "error":
            self._kill()
            raise RuntimeError(f"the worker could not load {self.info.name}: {detail}")

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        if self._proc is not None:
            self._proc.join(10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _receive(self, deadline: float) -> tuple | str:
        """The next message, ``"eof"`` when the child died, or ``"late"`` past the deadline."""
        try:
            if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                return "late"
            return self._conn.recv()
        except (EOFError, OSError):
            return "eof"

    def run(self, case: Case, passes: tuple[str, ...], timeout: float) -> Calls:
        """The target's results for ``passes`` of ``case`` from the worker, each pass limited to ``timeout``."""
        self.submit(case, passes)
        return self.collect(timeout)

    def submit(self, case: Case, passes: tuple[str, ...]) -> None:
        """Send a case to the worker (it starts at once: the caller may compute the reference meanwhile)."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._passes, self._sent = passes, time.monotonic()
        try:
            self._conn.send((case, passes))
        except (BrokenPipeError, OSError):
            self._kill()
            self._start()
            self._conn.send((case, passes))

    def collect(self, timeout: float) -> Calls:
        """The results of the case last submitted, each pass limited to ``timeout`` seconds from its start."""
        calls = Calls()
        passes, t0 = self._passes, self._sent
        running, started, busy = None, t0, 0.0
        while True:
            msg = self._receive(started + timeout if running else time.monotonic() + START_TIMEOUT)
            if isinstance(msg, str):  # the child died ("eof") or the pass ran past its limit ("late")
                if msg == "eof":
                    self._proc.join(10)
                exitcode = self._proc.exitcode
                self._kill()
                which = base_pass(running or passes[0])
                if msg == "eof":
                    calls.failures[which] = CallFailure("crash", f"{_death(exitcode)} during the {which} pass")
                else:
                    calls.failures[which] = CallFailure("timeout", f"call ran past {timeout:g} s (worker killed)")
                break
            kind = msg[0]
            if kind == "start":
                running, started = msg[1], msg[2]
            elif kind == "done":
                calls.record(msg[1], msg[2])
                busy += msg[3]
                running = None
            elif kind == "failed":
                calls.failures.setdefault(base_pass(msg[1]), msg[2])
                running = None
            elif kind == "end":
                if msg[1] > self.max_maps:  # replace it before the next case: never a finding
                    self.recycled += 1
                    self.close()
                break
        calls.seconds = busy if not calls.failures else time.monotonic() - t0  # the target's own time
        return calls

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self._kill()
