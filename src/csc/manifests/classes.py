"""The challenge's classes table: each class's id and the atomic ids it is made of.

``manifests/classes.csv`` (shipped with csc, as the challenge toolkit ships it) has one row per
class, ``name,id,"included ids"``; a composite class lists the atomic classes it includes (mito
= mito_mem, mito_lum, mito_ribo), an atomic one nothing. Two classes exclude each other when
they share no id (the class's own and those it includes): mito and nuc never overlap, while nuc
and er share the nuclear envelope. Training uses this for `use_mutual_exclusion`.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

CLASSES_TABLE = Path(str(resources.files("csc") / "manifests" / "classes.csv"))


@functools.cache
def class_ids(table: Path = CLASSES_TABLE) -> dict[str, frozenset[int]]:
    """Per class name, its own id and the ids of the classes it includes."""
    with open(table, newline="") as file:
        rows = [row for row in csv.reader(file) if row]
    ids: dict[str, frozenset[int]] = {}
    for name, own, *included in rows:
        parts = ",".join(included).split(",")
        ids[name] = frozenset([int(own), *(int(p) for p in parts if p.strip())])
    return ids


def exclusions(classes: Sequence[str], table: Path = CLASSES_TABLE) -> tuple[tuple[int, ...], ...]:
    """Per class of `classes`, the indices (into `classes`) of the classes that exclude it:
    no shared id. A class the table does not list excludes nothing and is excluded by nothing."""
    ids = class_ids(table)
    return tuple(
        tuple(
            j
            for j, other in enumerate(classes)
            if j != i and name in ids and other in ids and not ids[name] & ids[other]
        )
        for i, name in enumerate(classes)
    )


def unlisted(classes: Sequence[str], table: Path = CLASSES_TABLE) -> list[str]:
    """The names of `classes` that the table does not list."""
    ids = class_ids(table)
    return [name for name in classes if name not in ids]
