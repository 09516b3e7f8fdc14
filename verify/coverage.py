"""What a strategy covers, and whether two samples of it came from the same distribution.

A change meant to make campaigns faster (shape buckets, traced arguments, one program per shape)
must not change *what* they test. ``sample`` draws independent cases from the menus a campaign's
strategy draws from (no Hypothesis, no target call) and counts them in ``stats.Stats``; ``differences``
compares two such counts counter by counter with a chi-square test of homogeneity and names every
counter whose distribution moved. ``tests/test_coverage.py`` holds the strategies to committed
samples this way (``scripts/coverage_expectation.py`` writes them).

Counters where each example adds one key (lengths, head dims, chunk kinds, mask kinds, families,
layouts) are tested as one K x 2 table; ``features``, where an example adds several, as one 2 x 2
table (with / without) per feature. Keys whose expected count is below 5 are pooled so the test's
chi-square approximation holds. The level ``alpha`` is for the whole comparison (Bonferroni over
its tables): with the default 1e-3 two samples of one distribution differ once in a thousand seeds;
a seeded sample is reproducible, so a committed comparison either always passes or always fails.
"""

from __future__ import annotations

from collections import Counter

import mpmath

from verify.stats import Stats
from verify.strategies import sample_cases

MULTI_VALUED = frozenset({"features"})  # counters an example adds several keys to
MIN_EXPECTED = 5.0  # below this expected count a key is pooled with the other rare ones
DEFAULT_ALPHA = 1e-3


def sample(options: dict, examples: int, seed: int = 0) -> Stats:
    """The statistics of ``examples`` independent cases from the menus of ``strategies.cases(**options)``.

    Independent draws (``strategies.sample_cases``), not a Hypothesis run: a run's draws are
    correlated, so two seeds of the same strategy differ far beyond what a chi-square test allows.
    """
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    stats = Stats()
    for case in sample_cases(seed, examples, **options):
        stats.add(case, ())
    return stats


def _chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square with ``df`` degrees of freedom."""
    return float(mpmath.gammainc(df / 2, x / 2, mpmath.inf, regularized=True))


def _tables(expected: Stats, got: Stats) -> list[tuple[str, list[str], list[int], list[int]]]:
    """(name, keys, expected counts, got counts) of every table the comparison tests."""
    tables = []
    for what in sorted(set(expected.counts) | set(got.counts)):
        a, b = expected.counts.get(what, Counter()), got.counts.get(what, Counter())
        keys = sorted(set(a) | set(b))
        if what in MULTI_VALUED:
            for key in keys:
                tables.append((f"{what}[{key}]", [key, f"no {key}"], [a[key], expected.examples - a[key]],
                               [b[key], got.examples - b[key]]))
        else:
            tables.append((what, keys, [a[k] for k in keys], [b[k] for k in keys]))
    return tables


def _homogeneity(keys: list[str], a: list[int], b: list[int]) -> tuple[float, int] | None:
    """(chi-square, degrees of freedom) of a K x 2 table, rare keys pooled; None if nothing to test."""
    na, nb = sum(a), sum(b)
    if na == 0 or nb == 0:
        return None
    total = na + nb
    kept, rare = [], [0, 0]
    for x, y in zip(a, b, strict=True):
        if min(na, nb) * (x + y) / total < MIN_EXPECTED:
            rare[0], rare[1] = rare[0] + x, rare[1] + y
        else:
            kept.append((x, y))
    if sum(rare):
        kept.append(tuple(rare))
    if len(kept) < 2:
        return None
    chi2 = 0.0
    for x, y in kept:
        for observed, n in ((x, na), (y, nb)):
            e = n * (x + y) / total
            chi2 += (observed - e) ** 2 / e
    return chi2, len(kept) - 1


def differences(expected: Stats, got: Stats, alpha: float = DEFAULT_ALPHA) -> list[str]:
    """One line per counter whose distribution in ``got`` differs from ``expected`` at level ``alpha``.

    Each line says which key moved most (shares in both samples), the chi-square, its degrees of
    freedom, the p-value and the p-value each table had to reach. Empty: no difference found.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    tested = []
    for name, keys, a, b in _tables(expected, got):
        result = _homogeneity(keys, a, b)
        if result is not None:
            tested.append((name, keys, a, b, result))
    level = alpha / max(1, len(tested))
    out = []
    for name, keys, a, b, (chi2, df) in tested:
        p = _chi2_sf(chi2, df)
        if p >= level:
            continue
        na, nb = sum(a), sum(b)
        k, x, y = max(zip(keys, a, b, strict=True), key=lambda t: abs(t[1] / na - t[2] / nb))
        out.append(f"{name}: {k!r} {100 * x / na:.1f}% ({x}/{na}) expected, {100 * y / nb:.1f}% ({y}/{nb}) got; "
                   f"chi-square {chi2:.1f}, df {df}, p = {p:.2g} (each of the {len(tested)} tables must "
                   f"reach p >= {level:.2g})")
    return out
