"""Helpers for the fault suite: what was on disk before a fault, and proof it is still there."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256 of its bytes); folders are implied."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    """Each file of `before` still exists under `root` with the same bytes (new files may
    have been added beside them)."""
    after = snapshot(root)
    missing = sorted(set(before) - set(after))
    changed = sorted(name for name in before if name in after and after[name] != before[name])
    assert not missing and not changed, f"lost: {missing}; changed: {changed}"
