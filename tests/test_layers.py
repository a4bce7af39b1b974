"""Data flows one way: each csc module imports only from the layers before it (or its own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "csc"
# config/storage -> datasplit -> data -> models, losses, metrics -> checkpoints, tracking
# -> training, prediction -> cli and the public API (`csc/__init__`). `synth` writes data and
# sits beside the datasplit. `registries` (names and where they live; no csc import) is below all.
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
