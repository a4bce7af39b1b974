"""Files csc writes and walks: atomic writes, zarr groups staged under a temporary name and
swapped in, the marker that says csc wrote a group (what --overwrite may replace), the input
stores csc never writes into, folder listings, and a thread map for I/O-bound requests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from csc.storage.arrays import open_group
from csc.storage.errors import StorageError
from csc.storage.urls import STORE_SUFFIXES, fs_path, is_s3

MAX_THREADS = 32  # concurrent requests of one `thread_map`


# --- What csc wrote (what --overwrite may replace) -----------------------------------------

# The key csc puts in the .zattrs of every group it writes as a whole (a predicted or processed
# crop): {"csc": {"command": "predict", "version": "0.1.0"}}. --overwrite replaces a group only
# if it carries this key for the same command, so it never deletes data csc did not write.
CSC_MARKER = "csc"


def mark_csc_output(group: str | os.PathLike[str], command: str) -> None:
    """Mark the local zarr group `group` as written by `csc {command}` (in its .zattrs)."""
    from csc import __version__

    attrs_path = os.path.join(group, ".zattrs")
    attrs = _read_attrs(attrs_path) or {}
    attrs[CSC_MARKER] = {"command": command, "version": __version__}
    write_text_atomic(attrs_path, json.dumps(attrs, indent=2))


def csc_output_command(group: str | os.PathLike[str]) -> str | None:
    """The csc command that wrote the local group `group` (its marker), or None if not csc."""
    attrs = _read_attrs(os.path.join(group, ".zattrs"))
    marker = attrs.get(CSC_MARKER) if attrs else None
    command = marker.get("command") if isinstance(marker, dict) else None
    return command if isinstance(command, str) else None


def is_csc_output(group: str | os.PathLike[str], command: str) -> bool:
    """Whether `group` is a real folder (not a link) that `csc {command}` wrote."""
    return not os.path.islink(group) and csc_output_command(group) == command


def check_replaceable(path: str | os.PathLike[str], command: str, *, overwrite: bool) -> None:
    """Refuse to replace the existing `path` unless `overwrite` is given and `csc {command}`
    wrote it; anything else (ground truth, raw, a user's files) is never replaced."""
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if is_csc_output(path, command):
        return
    found = csc_output_command(path)
    what = f"was written by csc {found}" if found else "has no csc marker in its .zattrs"
    raise FileExistsError(
        f"{path} {what}, so csc {command} --overwrite will not replace it (it replaces only "
        f"its own output): choose another --output, or move {path} away yourself (output of "
        "csc before markers has none either)"
    )


def check_targets(targets: Sequence[Path], command: str, *, overwrite: bool) -> None:
    """Every existing target may be replaced: `overwrite` is given and `csc {command}` wrote
    it (its marker); one error names them all otherwise."""
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; pass --overwrite to replace them"
        )
    for target in existing:
        check_replaceable(target, command, overwrite=overwrite)


@contextmanager
def staged_group(
    path: Path, *, command: str, overwrite: bool = False, standalone: bool = False
) -> Iterator[Any]:
    """A zarr group written under a temporary name next to `path`, marked as `csc {command}`'s
    output and swapped in for `path` when the block ends without error; removed on error, so
    a crash never leaves a half-written group under the real name. What was at `path` is
    replaced only if `overwrite` is given and `csc {command}` wrote it. `standalone`: `path`
    is a zarr root of its own (a submission), not a group of the store around it."""
    clean_stale(path)
    partial = _beside(path, "partial", os.getpid())
    try:
        if standalone:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield open_group(str(partial), mode="w")
        else:
            yield open_group(str(path.parent), mode="a").require_group(partial.name)
        mark_csc_output(partial, command)
        swap_in(partial, path, command=command, overwrite=overwrite)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # still there only if something failed


def swap_in(partial: Path, path: Path, *, command: str, overwrite: bool) -> None:
    """Rename the complete group `partial` to `path`. An existing `path` (csc's own, checked
    again now) is first moved aside and removed once the new group is in place; if the swap
    fails, it is put back."""
    if not (path.exists() or path.is_symlink()):
        partial.rename(path)
        return
    check_replaceable(path, command, overwrite=overwrite)
    aside = _beside(path, "replaced", os.getpid())
    path.rename(aside)
    try:
        partial.rename(path)
    except BaseException:
        aside.rename(path)
        raise
    shutil.rmtree(aside)


def clean_stale(path: Path) -> None:
    """Tidy what runs killed while writing `path` left beside it (their process is gone): a
    .partial-PID group is csc's own half-written output and is removed; a .replaced-PID group
    is csc output moved aside during a swap: put back if `path` is missing, else removed."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(partial|replaced)-(\d+)")
    for entry in sorted(path.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if found is None or entry.is_symlink() or _running(int(found.group(2))):
            continue
        if found.group(1) == "partial":
            shutil.rmtree(entry, ignore_errors=True)
        elif csc_output_command(entry) is not None:
            if path.exists() or path.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.rename(path)


def _beside(path: Path, what: str, pid: int) -> Path:
    return path.parent / f".{path.name}.{what}-{pid}"


def _running(pid: int) -> bool:
    """Whether another process with this id runs on this machine (it may be writing)."""
    if pid == os.getpid():
        return False  # this process: anything of ours there is left from an earlier failure
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _read_attrs(path: str) -> dict[str, Any] | None:
    """A .zattrs file's JSON object, or None if it is missing or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as file:
            attrs = json.load(file)
    except (OSError, ValueError):
        return None
    return attrs if isinstance(attrs, dict) else None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to a temporary file in `path`'s folder and rename it over `path`, so
    readers see the old or the new file, never half of one; the temporary file is removed on
    any failure. A failed write raises StorageError naming `path`."""
    folder, name = os.path.split(os.fspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    except OSError as error:
        raise StorageError(f"cannot write {path}: {error.strerror}; check the folder") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0o600; be an ordinary file
        os.replace(temporary, path)
    except BaseException as error:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise StorageError(f"cannot write {path}: {error.strerror or error}") from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- Input stores (never written into) -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputStores:
    """The local zarr/n5 stores a config reads, which csc never writes into: the raw and
    ground-truth roots of its datasplit CSV, and every store its search_path can name."""

    roots: dict[str, str]  # absolute store root -> where it comes from
    patterns: tuple[tuple[re.Pattern[str], str], ...]  # store roots of search_path

    @classmethod
    def of(cls, stores: Iterable[tuple[str, str]], *, search_path: str | None) -> InputStores:
        """From (store root, where it comes from) pairs and a search path (None: on S3);
        stores on S3 are left out, csc writes only local folders."""
        roots: dict[str, str] = {}
        for root, why in stores:
            for form in _path_forms(root) if not is_s3(root) else ():
                roots.setdefault(form, why)
        patterns: tuple[tuple[re.Pattern[str], str], ...] = ()
        if search_path is not None and not is_s3(search_path):
            why = f"a store of search_path {search_path}"
            patterns = tuple((p, why) for p in _store_patterns(search_path))
        return cls(roots, patterns)

    def find(self, path: Path) -> tuple[str, str] | None:
        """The input store `path` lies inside (or is) and where it comes from, or None."""
        for form in _path_forms(path):
            for folder in (form, *map(str, Path(form).parents)):
                if folder in self.roots:
                    return folder, self.roots[folder]
                for pattern, why in self.patterns:
                    if pattern.fullmatch(folder):
                        return folder, why
        return None

    def check_outside(self, targets: Sequence[Path]) -> None:
        """Refuse targets inside an input store, whether or not --overwrite is given."""
        for target in targets:
            found = self.find(target)
            if found is not None:
                raise ValueError(
                    f"{target} lies inside {found[0]}, {found[1]}: csc never writes into its "
                    "input data; choose an --output outside it"
                )


def _path_forms(path: str | os.PathLike[str]) -> list[str]:
    """`path` absolute, as given and with links resolved (either may be how it is named)."""
    return list(dict.fromkeys([os.path.abspath(path), os.path.realpath(path)]))


def _store_patterns(search_path: str) -> list[re.Pattern[str]]:
    """Patterns of the store roots search_path names: its components up to the first that
    ends in .zarr or .n5 (a .zarr may also be the .n5 the crawl falls back to), {fields} as
    names (one field used twice must match the same name twice); none without such a part."""
    parts = os.path.abspath(search_path).split("/")
    end = next((i for i, part in enumerate(parts) if part.endswith(STORE_SUFFIXES)), None)
    if end is None:
        return []
    first = min(end + 1, next((i for i, part in enumerate(parts) if "{" in part), end + 1))
    base, rest = "/".join(parts[:first]) or "/", "/".join(parts[first : end + 1])
    return [
        _template_pattern(os.path.join(form, rest) if rest else form) for form in _path_forms(base)
    ]


def _template_pattern(template: str) -> re.Pattern[str]:
    pattern, seen = "", set()
    for literal, field in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if field:
            pattern += f"(?P={field})" if field in seen else f"(?P<{field}>[^/]+)"
            seen.add(field)
    if pattern.endswith(r"\.zarr"):
        pattern = pattern.removesuffix(r"\.zarr") + r"\.(?:zarr|n5)"
    return re.compile(pattern)


# --- Walks and thread maps -----------------------------------------------------------------


def names_in(fs: Any, url: str) -> list[str]:
    """The names directly under the folder `url` through the fsspec filesystem `fs` (none
    when it does not exist)."""
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(fs_path(url), detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def folder_names(fs: Any, url: str) -> list[str]:
    """The names of the folders (S3 prefixes) directly in the folder `url`; FileNotFoundError
    when it does not exist."""
    entries = fs.ls(fs_path(url), detail=True)
    return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]


def is_folder(fs: Any, url: str) -> bool:
    return bool(fs.isdir(fs_path(url)))


def group_names(fs: Any, url: str) -> set[str]:
    """The zarr groups (folders with a .zattrs) directly in the folder `url`; none when it is
    no folder."""
    if not is_folder(fs, url):
        return set()
    return {name for name in names_in(fs, url) if fs.exists(f"{fs_path(url)}/{name}/.zattrs")}


def thread_map(function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`function` over `items` in up to MAX_THREADS threads (I/O-bound requests)."""
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(MAX_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, in nested dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def check_json_path(
    path: str | Path,
    *,
    overwrite: bool,
    is_ours: Callable[[Any], bool],
    option: str = "--json",
    kind: str = "an evaluation report",
) -> Path:
    """Refuse, before the work, a path a JSON file cannot or must not be written to: a folder,
    or an existing file unless `overwrite` is given and it is `kind` csc wrote (`is_ours` of
    its parsed JSON)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give the JSON file's path")
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if not (path.is_file() and not path.is_symlink() and _is_ours(path, is_ours)):
        raise FileExistsError(
            f"{path} is not {kind} csc wrote, so --overwrite will not replace it: "
            f"choose another {option} path, or move the file away yourself"
        )
    return path


def _is_ours(path: Path, is_ours: Callable[[Any], bool]) -> bool:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return is_ours(value)
