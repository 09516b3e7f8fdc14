"""Hypothesis strategies that generate attention cases (``verify.case.Case``) at the numerical edges.

Small, named, composable pieces (each module one idea): ``shapes`` and ``chunk_sizes``
(``shapes.py``), ``values`` of a named family (``values.py``), ``masks`` of a named kind
(``masks.py``), and ``cases``, which ties them together for a target's declared features
(``cases.py``); ``example_case`` and ``make_case`` build the same cases without Hypothesis.

Every choice a case makes is a ``Menu`` (``menus.py``): Hypothesis draws it, so shrinking walks
it toward the simplest option; bulk numbers come from ``np.random.default_rng`` with a drawn
seed, so shrinking never works on thousands of floats. Strategies read as their calls in reprs
and falsifying examples (``cases(dtypes=('fp32',), ...)``) and check their arguments eagerly.
"""

from verify.strategies.cases import SCALES, cases, example_case, make_case
from verify.strategies.masks import MASK_KINDS, MASK_NEEDS, Masking, masks
from verify.strategies.shapes import COMPACT_SHAPES, HEAD_DIMS, LENGTHS, chunk_menu, chunk_sizes, length_menu, shapes
from verify.strategies.values import FAMILIES, Values, families, values

__all__ = [
    "COMPACT_SHAPES",
    "FAMILIES",
    "HEAD_DIMS",
    "LENGTHS",
    "MASK_KINDS",
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
    "shapes",
    "values",
]
