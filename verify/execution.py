"""Running a target on a case: what it returned, or how it failed, pass by pass.

An executor runs the forward pass (``adapter.forward``) and the gradient pass (``adapter.vjp``) of
one case under a time limit and reports ``Calls``: arrays, or a ``CallFailure`` per pass
(``raised``, ``timeout``, ``crash`` of the process running it, ``declined`` when the target raised
``Unsupported``). A pass named ``forward#2`` / ``grad#2`` runs the same pass again, for the
determinism check (``Calls.again``). Nothing a target does -- raising, hanging, returning garbage
-- escapes as an exception of the harness.

``InProcess`` runs in this process, each call on one reused daemon thread with a timeout: cheap, but
a hung call leaves its thread behind and a segfault of the target ends the process. Checks only see
``Calls``, so every executor is interchangeable.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np

from verify.case import Case
from verify.targets.base import Adapter, TargetInfo, Unsupported
from verify.targets.loader import TargetSpec

PASSES = ("forward", "grad")
REPEAT = "#2"  # suffix of a pass run a second time


def base_pass(name: str) -> str:
    """``forward`` for ``forward`` and ``forward#2``."""
    return name.removesuffix(REPEAT)


def call_pass(adapter: Adapter, case: Case, name: str) -> object:
    """Run one pass of ``case``: an ``Output`` for forward, a gradient dict for grad."""
    return adapter.forward(case) if base_pass(name) == "forward" else adapter.vjp(case)


@dataclass
class CallFailure:
    """How one pass failed: ``kind`` raised / timeout / crash / declined, one line of message, where."""

    kind: str
    message: str
    where: str = ""  # the target's innermost frame (file:line), when known

    def describe(self) -> str:
        return self.message + (f" (at {self.where})" if self.where and self.where not in self.message else "")


@dataclass
class Calls:
    """What the target gave for one case: the output, the gradients, the failures, and the time taken."""

    out: np.ndarray | None = None
    lse: np.ndarray | None = None
    grads: dict[str, np.ndarray] | None = None
    failures: dict[str, CallFailure] = field(default_factory=dict)  # by pass (forward, grad)
    seconds: float = 0.0
    again: dict[str, np.ndarray] = field(default_factory=dict)  # the repeated passes' arrays: out, lse, dq, ...

    def record(self, name: str, value: object) -> None:
        """Keep what pass ``name`` returned (a repeated pass's arrays go to ``again``)."""
        if name.endswith(REPEAT):
            arrays = {"out": value.out, "lse": value.lse} if base_pass(name) == "forward" else value
            self.again.update({k: v for k, v in arrays.items() if v is not None})
        elif name == "forward":
            self.out, self.lse = value
        else:
            self.grads = value

    @property
    def declined(self) -> str | None:
        """Why the target declined the case (``Unsupported``), if it did in any pass."""
        reasons = [f.message for f in self.failures.values() if f.kind == "declined"]
        return reasons[0] if reasons else None


def failure_of(exc: BaseException) -> CallFailure:
    """A ``CallFailure`` for an exception raised by a target (``declined`` for ``Unsupported``)."""
    if isinstance(exc, Unsupported):
        return CallFailure("declined", str(exc))
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    text = " ".join(str(exc).split())
    return CallFailure("raised", f"{type(exc).__name__}: {text[:300]}", where)


class TargetTimeout(Exception):
    """A target call ran past its time limit."""


class CallThread:
    """One long-lived daemon thread that runs target calls with a time limit.

    Reusing the thread matters: a fresh thread per call makes OpenMP (torch, BLAS) set up a new
    thread team each time, which cost 2-5 ms per small call here. A call past its limit leaves
    its thread behind (it cannot be killed in-process) and the next call gets a new one.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, fn: Callable[[], object], timeout: float) -> object:
        """``fn()``; raises what it raised, or ``TargetTimeout`` past ``timeout`` s."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnverify-call")
        future = self._pool.submit(fn)
        try:
            return future.result(timeout)
        except FutureTimeout:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise TargetTimeout(f"call ran past {timeout:g} s") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def run_passes(adapter: Adapter, case: Case, passes: tuple[str, ...],
               call: Callable[[Callable[[], object]], object]) -> Calls:
    """Run ``passes`` of ``case`` through ``call`` (which applies the time limit), stopping at a failure."""
    calls = Calls()
    t0 = time.perf_counter()
    for name in passes:
        try:
            value = call(lambda name=name: call_pass(adapter, case, name))
        except TargetTimeout as exc:
            calls.failures.setdefault(base_pass(name), CallFailure("timeout", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a target's exception is a result, not a harness error
            calls.failures.setdefault(base_pass(name), failure_of(exc))
        else:
            calls.record(name, value)
            continue
        break  # a pass that failed makes the next one meaningless (a crash is reported once per case)
    calls.seconds = time.perf_counter() - t0
    return calls


class InProcess:
    """Runs the target in this process (``--in-process``): no isolation, no start-up cost."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self._call = CallThread()

    @property
    def info(self) -> TargetInfo:
        return self.adapter.info

    @property
    def target(self) -> TargetSpec | None:
        """How to load the target again (None for an adapter built from a function in this process)."""
        return self.adapter.target

    def run(self, case: Case, passes: tuple[str, ...], timeout: float) -> Calls:
        """The target's results for ``passes`` of ``case``, each call limited to ``timeout`` seconds."""
        return run_passes(self.adapter, case, passes, lambda fn: self._call(fn, timeout))

    def close(self) -> None:
        """Let the call thread go."""
        self._call.close()
