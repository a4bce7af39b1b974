"""`csc init`: the commented 2D and 3D example configs, shipped inside the package (an installed
wheel has no examples/ folder), written into a folder.

``src/csc/example_configs/`` holds byte-for-byte copies of the repository's ``examples/``
(tests/test_board.py holds them equal). They are written as ``examples/train_2D.py`` and
``examples/train_3D.py`` below the folder, the layout they are written for: their relative
paths (``../data``, ``../checkpoints``, ...) then point into the folder, as in the repository,
so every command of the README and the docs works there as it is.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE_NAMES = ("train_2D.py", "train_3D.py")
EXAMPLES_FOLDER = "examples"  # below the folder csc init writes into


def example_text(name: str) -> str:
    """The shipped example config `name` (one of EXAMPLE_NAMES)."""
    if name not in EXAMPLE_NAMES:
        raise ValueError(f"unknown example {name!r}; available: {', '.join(EXAMPLE_NAMES)}")
    return (resources.files("csc") / "example_configs" / name).read_text(encoding="utf-8")


def write_examples(folder: str | Path = ".", *, overwrite: bool = False) -> list[Path]:
    """Write the example configs into ``folder/examples/``; the paths written. An example
    that is already there is a `FileExistsError` (nothing written) unless `overwrite`."""
    target = Path(folder) / EXAMPLES_FOLDER
    paths = [target / name for name in EXAMPLE_NAMES]
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        verb = "exists" if len(existing) == 1 else "exist"
        raise FileExistsError(
            f"{', '.join(existing)} already {verb}; pass --overwrite to replace "
            f"{'it' if len(existing) == 1 else 'them'} (or run csc init in another folder)"
        )
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        path.write_text(example_text(path.name), encoding="utf-8")
    return paths
