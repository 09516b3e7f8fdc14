"""Shared fixtures for attnverify's own tests."""

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator: every test sees the same inputs on every run."""
    return np.random.default_rng(20240607)
