"""Data flows one way: each csc module imports only from the layers before it (or its own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "csc"
# config/storage -> datasplit -> data -> models, losses, metrics, optim -> runtime, tracking,
# distributed -> checkpoints -> training, prediction -> cli and the public API
# (`csc/__init__`). `synth` writes data and sits beside the datasplit; `runtime` holds what
# training and prediction share (device, precision, building and unwrapping the model).
# `storage` is a package (csc.storage.*) that imports no other csc module: config may read it,
# never the other way round. `fetching` (csc fetch-data: crop selection and the plan) reads only
# storage and manifests. `registries` (names and where they live; no csc import) is below all,
# with `manifests` (the challenge's shipped CSVs and their readers). `utils` is the challenge
# toolkit's names over csc's commands (the compatibility boundary), below cli. `labelling`
# (probabilities to ids, for csc process) sits beside `scoring`, whose labelling it mirrors.
# `scaffold` (csc init) reads the shipped example configs, which are user files (entry points).
LAYERS = [
    {"registries", "manifests", "scaffold"},
    {"config", "storage"},
    {"synth", "datasplit", "fetching"},
    {"data"},
    {"models", "losses", "metrics", "optim", "scoring", "alignment", "labelling"},
    {"runtime", "tracking", "board", "distributed", "reproducibility"},
    {"checkpoints"},
    {
        "training",
        "training_log",
        "prediction",
        "evaluation",
        "processing",
        "launch",
        "utils",
        "packing",
        "submission_check",
        "submissions",
        "visualize",
    },
    {"cli", "__main__", "__init__", "example_configs"},
]
INFERENCE = ("prediction", "processing", "evaluation")  # siblings of training, never its users


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if module in names:
            return index
    raise AssertionError(f"csc.{module} is in no layer; add it to LAYERS in {__file__}")


def csc_imports(path: Path) -> set[str]:
    """Top-level csc submodules that a file imports (csc.x.y counts as x; ``from csc import
    x`` too when x is a module), at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "csc" and node.level == 0:
            names = [f"csc.{alias.name}" for alias in node.names if is_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("csc.")}
    return found


def is_module(name: str) -> bool:
    """Whether csc.`name` is a module or package (not a name such as ``__version__``)."""
    return (SRC / f"{name}.py").is_file() or (SRC / name / "__init__.py").is_file()


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


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_does_not_import_training(module: str) -> None:
    """What prediction shares with training comes from csc.runtime, csc.optim or
    csc.checkpoints, not from the training loop."""
    assert "training" not in csc_imports(SRC / f"{module}.py")


@pytest.mark.parametrize("path", sorted((SRC / "models").rglob("*.py")), ids=lambda p: p.name)
def test_models_know_architectures_not_files(path: Path) -> None:
    """csc.models imports neither data, storage nor checkpoints (its `load_latest` and
    `load_best_val` are looked up in csc.checkpoints by name, on first use)."""
    assert not csc_imports(path) & {"data", "storage", "checkpoints"}
