"""Shared fixtures: config files and tiny synthetic CellMap data, all written into tmp dirs."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csc.synth import SynthSpec, write_synthetic
from tests.s3server import moto_server, upload_tree

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


# --- A real S3 API server on 127.0.0.1 (moto's server mode) -------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the local S3 server is marked `s3`: one rule, not a mark per test."""
    for item in items:
        if "s3_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The local S3 server for the whole session; yields its endpoint URL."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point S3 clients at the local server, with no credentials set (anonymous access)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture(scope="session")
def s3_synth(s3_server: str, tiny_synth: Path) -> str:
    """The tiny synthetic data in a public bucket and a private one; returns the bucket stem."""
    upload_tree(s3_server, tiny_synth, "synth-public", public=True)
    upload_tree(s3_server, tiny_synth, "synth-private", public=False)
    return "synth"
