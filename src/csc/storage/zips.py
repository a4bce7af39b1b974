"""Zip files csc writes (a challenge submission) and reads in place: written atomically, with
csc's marker in the zip's comment (never a member), member names relative to the folder."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Collection
from contextlib import suppress
from pathlib import Path

from csc.storage.errors import StorageError

ZIP_MARKER = "written by csc"  # the start of the comment of every zip csc writes


def zip_folder(folder: Path, target: Path, *, command: str, leave_out: Collection[str] = ()) -> int:
    """Zip the files under `folder` (ZIP_DEFLATED, names relative to it, sorted; links
    followed) into `target`, atomically, marked as `csc {command}`'s in its comment; members
    named in `leave_out` are not stored. Returns the zip's size in bytes."""
    from csc import __version__

    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in _files(folder):
                if name not in leave_out:
                    archive.write(folder / name, name)
            archive.comment = f"{ZIP_MARKER} {command} {__version__}".encode()
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException as error:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise StorageError(f"cannot write {target}: {error.strerror or error}") from None
        raise
    return target.stat().st_size


def _files(folder: Path) -> list[str]:
    """The files under `folder`, as '/'-separated paths relative to it, sorted."""
    names: list[str] = []
    for top, _folders, files in os.walk(folder, followlinks=True):
        relative = Path(top).relative_to(folder)
        names.extend((relative / name).as_posix() for name in files)
    return sorted(names)


def zip_command(path: str | os.PathLike[str]) -> str | None:
    """The csc command that wrote the zip at `path` (its comment), or None if not csc's."""
    try:
        with zipfile.ZipFile(path) as archive:
            comment = archive.comment.decode("utf-8", errors="replace")
    except (OSError, zipfile.BadZipFile):
        return None
    if not comment.startswith(f"{ZIP_MARKER} "):
        return None
    return comment.removeprefix(f"{ZIP_MARKER} ").split(" ")[0] or None


def check_zip_replaceable(path: Path, command: str, *, overwrite: bool) -> None:
    """Refuse to replace an existing zip unless `overwrite` is given and `csc {command}`
    wrote it (its comment says so); a link or anyone else's zip is never replaced."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.is_symlink() or zip_command(path) != command:
        raise FileExistsError(
            f"{path} was not written by csc {command}, so --overwrite will not replace it: "
            "choose another output path, or move it away yourself"
        )
