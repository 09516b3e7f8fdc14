"""The private hooks of other libraries that attnverify relies on, all in one place.

Each hook says what it does, why no public API does it, and the versions it was checked on
(hypothesis 6.170.17, jax 0.10.2, torch 2.13.0). When one of those libraries changes, this is
the only module to revisit; ``tests/test_compat.py`` exercises every hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

CHECKED_ON = {"hypothesis": "6.170.17", "jax": "0.10.2", "torch": "2.13.0"}


def seed_test(test: Callable, seed: int) -> None:
    """Seed a ``@given`` test the way ``@hypothesis.seed`` does, minus switching the database off.

    ``@seed`` disables the example database, but a seeded CI campaign should be reproducible
    *and* replay what earlier runs found. ``_hypothesis_internal_use_seed`` is the attribute
    ``@seed`` sets on the inner test.
    """
    test._hypothesis_internal_use_seed = seed


def set_database_key(test: Callable, key: bytes) -> None:
    """Key a ``@given`` test's database entries by ``key`` instead of its qualified name.

    Campaigns run one function object for every target, dtype and set of categories found; the
    key keeps their saved failures apart. It is what ``_hypothesis_internal_add_digest`` adds to
    the database key of the wrapped test (set on ``test.hypothesis.inner_test``).
    """
    test.hypothesis.inner_test._hypothesis_internal_add_digest = key


@contextmanager
def fixed_generation_constants() -> Iterator[None]:
    """Make Hypothesis's generation independent of which local modules happen to be imported.

    Hypothesis mixes literal constants taken from the source of every *local* module in
    ``sys.modules`` into roughly 5 % of its integer and float draws
    (``hypothesis.internal.conjecture.providers._get_local_constants``). attnverify is a local
    (editable) package and so is the user's kernel, so importing ``verify.report`` first, or
    running under pytest, changed a seeded campaign's cases from some example on. Inside this
    context the local pool is empty (the built-in global constants stay), so a seed draws the
    same cases from ``attnverify fuzz``, the pytest plugin and ``verify.fuzz.run``.
    """
    from hypothesis.internal.conjecture import providers

    original = providers._get_local_constants
    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        providers.CONSTANTS_CACHE.cache.clear()


def jit_cache_size(fn: Callable) -> int:
    """How many programs a ``jax.jit``-wrapped function holds compiled (``_cache_size``).

    Each XLA:CPU executable keeps its own memory mappings; counting them lets a long campaign
    drop its caches (or recycle its worker) before the process runs out of mappings.
    """
    return int(fn._cache_size())


def torch_cpu_memory_events(prof: object) -> list[tuple[int, int]]:
    """``(start_ns, bytes)`` of every CPU allocation (+) and free (-) a ``torch.profiler`` run recorded.

    ``profile_memory=True`` records them, but the public ``key_averages()`` only sums them per
    operator; the running peak needs the raw events of ``prof.profiler.kineto_results``.
    """
    events = prof.profiler.kineto_results.events()
    return sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
