"""Data flows one way: each csc module imports only from the layers before it (or its own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "csc"
# config/storage -> datasplit -> data -> models, losses, metrics -> checkpoints, tracking
# -> training, prediction -> cli and the public API (`csc/__init__`). `synth` writes data and
# sits beside the datasplit. `storage` is a package (csc.storage.*) that imports no other csc
# module: config may read it, never the other way round. `registries` (names and where they
# live; no csc import) is below all.
LAYERS = [
    {"registries"},
    {"config", "storage"},
    {"synth", "datasplit"},
    {"data"},
    {"models", "losses", "metrics"},
    {"checkpoints", "tracking", "distributed"},
    {"training", "prediction", "evaluation", "processing", "launch"},
    {"cli", "__main__", "__init__"},
]


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if module in names:
            return index
    raise AssertionError(f"csc.{module} is in no layer; add it to LAYERS in {__file__}")


def csc_imports(path: Path) -> set[str]:
    """Top-level csc submodules that a file imports (csc.x.y counts as x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("csc.")}
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: p.name)
def test_module_imports_only_earlier_layers(path: Path) -> None:
    relative = path.relative_to(SRC)
    module = relative.parts[0].removesuffix(".py")
    for imported in csc_imports(path):
        assert layer_of(imported) <= layer_of(module), f"csc.{module} imports csc.{imported}"


STORAGE = SRC / "storage"
OUTSIDE_STORAGE = sorted(p for p in SRC.rglob("*.py") if STORAGE not in p.parents)
STORAGE_LIBRARIES = {"zarr", "tensorstore", "fsspec", "s3fs", "numcodecs"}


@pytest.mark.parametrize("path", OUTSIDE_STORAGE, ids=lambda p: str(p.relative_to(SRC)))
def test_only_storage_names_the_s3_scheme(path: Path) -> None:
    """No string constant outside csc.storage holds "s3://": docstrings and f-string parts
    count too (comments are not constants), so URL schemes have one owner."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert "s3://" not in node.value, f"{path.name}:{node.lineno} names s3://"


@pytest.mark.parametrize("path", OUTSIDE_STORAGE, ids=lambda p: str(p.relative_to(SRC)))
def test_only_storage_opens_zarr_and_tensorstore(path: Path) -> None:
    """No module outside csc.storage imports zarr, tensorstore, fsspec, s3fs or numcodecs, at
    module level or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in STORAGE_LIBRARIES, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted(STORAGE.rglob("*.py")), ids=lambda p: p.name)
def test_storage_imports_no_other_csc_module(path: Path) -> None:
    assert csc_imports(path) <= {"storage"}, f"csc.storage.{path.stem} imports {csc_imports(path)}"
