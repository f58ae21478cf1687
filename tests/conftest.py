"""Fixtures shared by test files."""
import pytest

import common

_real_synthetic_set = common.synthetic_set
_SYNTHETIC = {}


def _cached_synthetic_set(split, seed=0, n=None):
    """common.synthetic_set is deterministic: each split is generated once for the whole test run."""
    if (split, seed, n) not in _SYNTHETIC:
        _SYNTHETIC[split, seed, n] = _real_synthetic_set(split, seed, n)
    return _SYNTHETIC[split, seed, n]


@pytest.fixture
def cached_synthetic(monkeypatch):
    """In-process runs on --dataset synthetic share one generated copy of each split (opt-in: tests of
    synthetic_set itself must call the real one)."""
    monkeypatch.setattr(common, "synthetic_set", _cached_synthetic_set)
