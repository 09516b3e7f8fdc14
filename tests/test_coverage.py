"""Coverage is pinned: the menus campaigns draw from have the committed distribution.

A speed-up of campaigns (shape buckets, fewer programs, narrower menus for compiled targets) must
not change what they test. Each pinned setting (``tests/coverage_pins.py``) is sampled afresh with
another seed and compared with its committed sample by ``verify.coverage.differences``; the seeded
narrowings below are what such a speed-up could do, and each must be caught.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.coverage_pins import PINNED, expected, options_for
from verify import coverage
from verify.stats import Stats
from verify.strategies import assembly, options, sizes
from verify.strategies.menus import ints, one_of

pytest.importorskip("torch")
pytest.importorskip("jax")

EXAMPLES, SEED = 1000, 1  # the fresh sample: another seed than the committed one


@pytest.mark.parametrize("target", PINNED)
def test_the_menus_draw_the_committed_distribution(target: str) -> None:
    got = coverage.sample(options_for(target), EXAMPLES, SEED)
    diffs = coverage.differences(expected(target), got)
    assert not diffs, (f"what a default campaign on {target} draws has changed:\n  " + "\n  ".join(diffs)
                       + "\nif deliberate: .venv/bin/python scripts/coverage_expectation.py, and review the JSON diff")


def _narrowed(target: str) -> list[str]:
    return coverage.differences(expected(target), coverage.sample(options_for(target), EXAMPLES, SEED))


def test_fewer_shape_buckets_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sizes, "COMPACT_SHAPES", sizes.COMPACT_SHAPES[:5])
    assert any(d.startswith(("Lq", "Lk", "Dk")) for d in _narrowed("chunked-jax"))


def test_bucketed_window_sides_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "_side", lambda pick, lk: pick(one_of((None, 0))))
    assert any(d.startswith("window_") for d in _narrowed("chunked-jax"))


def test_fewer_softcaps_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options, "SOFTCAPS", (50.0, 1.0))
    assert any(d.startswith("softcap") for d in _narrowed("chunked-jax"))


def test_a_shifted_size_mix_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def mostly_small(pick):
        n = pick(ints(0, 99))
        return "small" if n < 90 else "large" if n < 98 else "decode"

    monkeypatch.setattr(assembly, "pick_size", mostly_small)
    assert any(d.startswith(("Lq", "Lk")) for d in _narrowed("chunked-torch"))


def test_chunk_menus_without_non_divisors_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def dividing(menu):
        return lambda n: tuple(c for c in menu(n) if c is None or c >= n or n % c == 0)

    monkeypatch.setattr(assembly, "chunk_menu", dividing(sizes.chunk_menu))
    monkeypatch.setattr(assembly, "large_chunk_menu", dividing(sizes.large_chunk_menu))
    assert any(d.startswith(("query_chunk", "key_chunk")) for d in _narrowed("chunked-torch"))


def test_one_layout_fewer_is_caught() -> None:
    opts = options_for("chunked-torch")
    opts["layouts"] = tuple(x for x in opts["layouts"] if x != "transposed")
    diffs = coverage.differences(expected("chunked-torch"), coverage.sample(opts, EXAMPLES, SEED))
    assert any(d.startswith("layout") for d in diffs)


def _stats(examples: int, **counters: dict[str, int]) -> Stats:
    return Stats(examples, 0, 0, {k: Counter(v) for k, v in counters.items()})


def test_differences_says_what_moved_and_by_how_much() -> None:
    a = _stats(1000, key_chunk={"default": 500, "1": 250, "non-divisor": 250})
    b = _stats(1000, key_chunk={"default": 700, "1": 250, "non-divisor": 50})
    (line,) = coverage.differences(a, b)
    assert line.startswith("key_chunk: 'non-divisor' 25.0% (250/1000) expected, 5.0% (50/1000) got")
    assert "df 2" in line and "p = " in line
    assert coverage.differences(a, a) == []


def test_rare_keys_are_pooled_and_features_tested_one_by_one() -> None:
    # 'huge' appears 3 times: pooled with 'big' (the chi-square needs expected counts of 5 and more)
    a = _stats(400, Lk={"small": 300, "big": 97, "huge": 3}, features={"mask": 100, "bias": 40})
    b = _stats(400, Lk={"small": 298, "big": 100, "huge": 2}, features={"mask": 100, "bias": 4})
    (line,) = coverage.differences(a, b)
    assert line.startswith("features[bias]: 'bias' 10.0% (40/400) expected, 1.0% (4/400) got")


def test_differences_checks_its_level_and_sample_size() -> None:
    with pytest.raises(ValueError, match="alpha"):
        coverage.differences(Stats(), Stats(), alpha=0)
    with pytest.raises(ValueError, match="examples"):
        coverage.sample(options_for("chunked-torch"), 0)
