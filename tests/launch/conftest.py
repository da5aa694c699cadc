"""Fixtures of the launch tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BASELINE = Path(__file__).resolve().parents[2] / "launch" / "baseline.py"


@pytest.fixture(scope="module")
def baseline():
    """``launch/baseline.py`` imported as a module (its functions called in-process)."""
    spec = importlib.util.spec_from_file_location("baseline_script", BASELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
