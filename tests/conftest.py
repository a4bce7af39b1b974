"""Shared fixtures: config files and tiny synthetic CellMap data, all written into tmp dirs."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from csc.synth import SynthSpec, write_synthetic

# Small enough to write in well under a second, big enough for a 3-level pyramid.
TINY_SPEC = SynthSpec(
    num_datasets=2,
    num_crops=2,
    shape=(16, 32, 32),
    crop_shape=(8, 16, 16),
    chunks=(8, 16, 16),
    missing_class_prob=0.3,
)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config file (dedented text) and return its path."""

    def write(text: str, name: str = "config.py") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic datasets, written once per test session; tests must not modify them."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, TINY_SPEC)
    return out
