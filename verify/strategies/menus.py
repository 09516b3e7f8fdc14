"""Choices: one ``Menu`` per decision a case makes, drawn by Hypothesis or sampled by numpy.

A ``Menu`` is an option list (simplest first) or a numeric range (simplest = its low end).
Hypothesis draws it, so shrinking walks every choice toward its simplest value; ``numpy_pick``
samples the same menus from a numpy generator, so ``example_case`` and ``make_case`` build the
same kinds of cases without Hypothesis: one code path for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class Menu:
    """One choice: an option from ``options`` (simplest first), or a number in [lo, hi] (simplest = lo)."""

    options: tuple = ()
    lo: float = 0.0
    hi: float = 0.0
    integer: bool = False

    def strategy(self) -> st.SearchStrategy:
        if self.options:
            return st.sampled_from(self.options)
        if self.integer:
            return st.integers(int(self.lo), int(self.hi))
        return st.floats(self.lo, self.hi)

    def sample(self, rng: np.random.Generator) -> Any:
        if self.options:
            return self.options[int(rng.integers(len(self.options)))]
        if self.integer:
            return int(rng.integers(int(self.lo), int(self.hi), endpoint=True))
        return float(rng.uniform(self.lo, self.hi))


def one_of(options: Iterable) -> Menu:
    """A menu of distinct options, in the given order (the first is the simplest)."""
    return Menu(options=tuple(dict.fromkeys(options)))


def floats(lo: float, hi: float) -> Menu:
    return Menu(lo=lo, hi=hi)


def ints(lo: int, hi: int) -> Menu:
    return Menu(lo=lo, hi=hi, integer=True)


SEED = ints(0, 2**32 - 1)  # the seed of a numpy generator that makes a case's bulk numbers
Pick = Callable[[Menu], Any]


def hypothesis_pick(draw: Callable) -> Pick:
    """A picker that draws every menu with Hypothesis (inside ``st.composite``)."""
    return lambda menu: draw(menu.strategy())


def numpy_pick(rng: np.random.Generator) -> Pick:
    """A picker that samples every menu from ``rng``."""
    return lambda menu: menu.sample(rng)


def composite(name: str, fn: Callable) -> Callable[..., st.SearchStrategy]:
    """``st.composite(fn)`` whose strategies read ``name(arguments)`` in reprs and falsifying examples."""
    fn.__name__ = fn.__qualname__ = name
    return st.composite(fn)


def known(what: str, names: Iterable[str], valid: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ``ValueError`` naming the unknown ones (or an empty list) and the valid ones."""
    names, valid = tuple(names), tuple(valid)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown or empty {what} names {unknown or list(names)}; known: {', '.join(valid)}")
    return names
