"""Hypothesis strategies that generate attention cases (``verify.case.Case``) at the numerical edges.

Small, named, composable pieces (each module one idea): ``shapes`` and ``chunk_sizes``
(``sizes.py``), ``values`` of a named family (``value_families.py``), ``masks`` of a named kind
(``mask_kinds.py``), the modern options (``options.py``), and ``cases``, which ties them together
for a target's declared features (``assembly.py``); ``example_case`` and ``make_case`` build the
same cases without Hypothesis.

Every choice a case makes is a ``Menu`` (``menus.py``): Hypothesis draws it, so shrinking walks
it toward the simplest option; bulk numbers come from ``np.random.default_rng`` with a drawn
seed, so shrinking never works on thousands of floats. Strategies read as their calls in reprs
and falsifying examples (``cases(dtypes=('fp32',), ...)``) and check their arguments eagerly.
"""

from verify.strategies.assembly import SCALES, cases, example_case, make_case, sample_cases
from verify.strategies.mask_kinds import MASK_KINDS, MASK_NEEDS, Masking, masks
from verify.strategies.sizes import (
    COMPACT_SHAPES,
    HEAD_DIMS,
    LENGTHS,
    SIZES,
    chunk_menu,
    chunk_sizes,
    length_menu,
    shapes,
)
from verify.strategies.value_families import FAMILIES, Values, families, values

__all__ = [
    "COMPACT_SHAPES",
    "FAMILIES",
    "HEAD_DIMS",
    "LENGTHS",
    "MASK_KINDS",
    "SIZES",
    "MASK_NEEDS",
    "SCALES",
    "Masking",
    "Values",
    "cases",
    "chunk_menu",
    "chunk_sizes",
    "example_case",
    "families",
    "length_menu",
    "make_case",
    "masks",
    "sample_cases",
    "shapes",
    "values",
]
