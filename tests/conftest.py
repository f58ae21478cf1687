"""Fixtures shared by test files; the two test commands: `python -m pytest -q` (the default run: formulas,
recipes, wiring, one-line errors) and `python -m pytest -q --full` (also the tests marked slow: learning
checks, multi-process worlds, SLURM; what .ci/run runs)."""
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


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the tests marked slow (what .ci/run runs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
