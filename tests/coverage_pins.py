"""The campaign settings whose coverage is pinned, and the committed samples of what they draw.

``tests/test_coverage.py`` compares a fresh sample of each with ``tests/data/coverage/<target>.json``;
``scripts/coverage_expectation.py`` rewrites those files after a deliberate change of the menus
(review the diff of the JSON: it is the change in what campaigns test).
"""

from __future__ import annotations

import json
from pathlib import Path

from verify import coverage, fuzz
from verify.stats import Stats
from verify.targets import TargetSpec

# one pin per kind of campaign: torch (every layout, no shape buckets), JAX (shape buckets,
# contiguous), a kernel with declared tiles and a dk=dv constraint
PINNED = ("chunked-torch", "chunked-jax", "torch-sdpa-flash")
DATA = Path(__file__).parent / "data" / "coverage"
EXPECTED_EXAMPLES, EXPECTED_SEED = 2000, 0


def options_for(target: str, dtype: str = "fp32") -> dict:
    """The arguments of ``strategies.cases`` a default campaign on ``target`` uses (gradients on)."""
    return fuzz.campaign_options(TargetSpec(target).load().info, fuzz.Settings(), dtype, grad=True)


def expected(target: str) -> Stats:
    """The committed sample of ``target``'s default campaign menus."""
    return Stats.from_json(json.loads((DATA / f"{target}.json").read_text()))


def write_expected(target: str) -> Path:
    """Draw and write the committed sample of ``target`` (``EXPECTED_EXAMPLES`` cases, ``EXPECTED_SEED``)."""
    stats = coverage.sample(options_for(target), EXPECTED_EXAMPLES, EXPECTED_SEED)
    path = DATA / f"{target}.json"
    path.write_text(json.dumps(stats.to_json(), indent=1) + "\n")
    return path
