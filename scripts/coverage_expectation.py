"""Rewrite the committed coverage samples (``tests/data/coverage/*.json``) from the current menus.

Run from the repository root after a deliberate change of what campaigns draw:
``.venv/bin/python scripts/coverage_expectation.py [TARGET ...]`` (default: every pinned target).
``tests/test_coverage.py`` fails until then; the JSON diff is the change in coverage to review.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.coverage_pins import PINNED, write_expected  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("targets", nargs="*", default=list(PINNED))
    args = ap.parse_args()
    for target in args.targets:
        print(f"wrote {write_expected(target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
