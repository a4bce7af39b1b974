"""The public API: `import csc` is cheap, and the functions a user calls are its attributes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import csc

HEAVY = ("torch", "numpy", "zarr", "tensorstore")


def test_import_csc_loads_no_heavy_package() -> None:
    code = f"import sys, csc; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(csc.PUBLIC_API))
def test_each_public_name_is_its_owner_s_object(name: str) -> None:
    import importlib

    owner = importlib.import_module(csc.PUBLIC_API[name])
    assert getattr(csc, name) is getattr(owner, name)
    assert name in csc.__all__ and name in dir(csc)


def test_run_functions_stay_functions_once_their_modules_are_imported() -> None:
    """The run modules are nouns (csc.training, ...), so importing them never hides the
    functions `csc.train`, `csc.predict`, `csc.process`, `csc.evaluate`."""
    code = (
        "import csc.training, csc.prediction, csc.processing, csc.evaluation, inspect\n"
        "from csc import train, predict, process, evaluate\n"
        "print(all(inspect.isfunction(f) for f in (train, predict, process, evaluate)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        _ = csc.trian  # type: ignore[attr-defined]  # the misspelling is the point
