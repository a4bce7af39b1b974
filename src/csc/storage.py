"""Storage: OME-NGFF 0.4 and CellMap metadata for zarr v2 stores, and local/S3 locations.

Coordinates follow OME-NGFF: axes are (z, y, x) in nanometers, and a level's ``translation`` is
the world position of the centre of its voxel 0, so voxel ``i`` is centred at
``translation + i * scale``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

AXES = ("z", "y", "x")
COMPRESSORS = ("zstd", "blosc-lz4", "gzip", "none")


def level_transforms(
    scale: Sequence[float], translation: Sequence[float], num_levels: int
) -> list[tuple[list[float], list[float]]]:
    """(scale, translation) in nm for levels s0.. of a pyramid downsampled 2x per level.

    A 2x average moves the centre of voxel 0 half an s0 voxel per level step:
    ``t_n = t_0 + (2**n - 1) * s_0 / 2``.
    """
    levels = []
    for n in range(num_levels):
        factor = 2**n
        level_scale = [float(s * factor) for s in scale]
        level_translation = [
            float(t + (factor - 1) * s / 2) for s, t in zip(scale, translation, strict=True)
        ]
        levels.append((level_scale, level_translation))
    return levels


def multiscales_attrs(
    name: str, levels: Sequence[tuple[Sequence[float], Sequence[float]]]
) -> dict[str, Any]:
    """The OME-NGFF 0.4 ``multiscales`` attribute for a group holding arrays s0, s1, ..."""
    datasets = [
        {
            "path": f"s{n}",
            "coordinateTransformations": [
                {"type": "scale", "scale": list(scale)},
                {"type": "translation", "translation": list(translation)},
            ],
        }
        for n, (scale, translation) in enumerate(levels)
    ]
    axes = [{"name": axis, "type": "space", "unit": "nanometer"} for axis in AXES]
    return {"multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets}]}


def annotation_attrs(class_name: str, num_absent: int) -> dict[str, Any]:
    """CellMap's per-array annotation attributes for a 0/1 semantic label array."""
    return {
        "cellmap": {
            "annotation": {
                "class_name": class_name,
                "annotation_type": {
                    "type": "semantic_segmentation",
                    "encoding": {"absent": 0, "present": 1},
                },
                "complement_counts": {"absent": int(num_absent)},
            }
        }
    }


def make_compressor(name: str) -> Any:
    """A numcodecs codec by csc's name for it; Zstd level 6 is what public CellMap raw uses."""
    import numcodecs

    codecs = {
        "zstd": lambda: numcodecs.Zstd(level=6),
        "blosc-lz4": lambda: numcodecs.Blosc(
            cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE
        ),
        "gzip": lambda: numcodecs.GZip(level=5),
        "none": lambda: None,
    }
    if name not in codecs:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(COMPRESSORS)}")
    return codecs[name]()


def write_array(
    group: Any,
    name: str,
    data: Any,
    *,
    chunks: Sequence[int],
    compressor: str,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write `data` as zarr format 2 array `name` in `group`, chunk keys nested like CellMap's."""
    codec = make_compressor(compressor)
    array = group.create_array(
        name,
        shape=data.shape,
        chunks=tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True)),
        dtype=data.dtype,
        compressors=codec if codec is not None else None,
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    array[...] = data
    if attrs:
        array.attrs.update(attrs)


# --- Local and S3 locations ---------------------------------------------------------------

# Components that end a zarr or n5 store's root in a path; what follows is the path inside it.
STORE_SUFFIXES = (".zarr", ".n5")
# Bounded retries and timeouts: a dead endpoint must fail within seconds, not minutes.
S3_CLIENT_CONFIG = {
    "connect_timeout": 3,
    "read_timeout": 20,
    "retries": {"max_attempts": 3, "mode": "standard"},
}


class StorageError(Exception):
    """A location cannot be read; the message names it and says what to check."""


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the given one, else $AWS_ENDPOINT_URL, else AWS's default (None)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def has_aws_credentials() -> bool:
    """Whether the standard AWS variables name credentials (otherwise S3 reads are anonymous)."""
    keys = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
    return bool(keys or os.environ.get("AWS_PROFILE"))


def s3_filesystem(*, endpoint_url: str | None = None, anon: bool | None = None) -> Any:
    """An s3fs filesystem: anonymous unless AWS credentials are set, endpoint from the env."""
    import s3fs

    fs = s3fs.S3FileSystem(
        anon=not has_aws_credentials() if anon is None else anon,
        endpoint_url=s3_endpoint(endpoint_url),
        config_kwargs=S3_CLIENT_CONFIG,
        skip_instance_cache=True,  # the environment (credentials, endpoint) may have changed
    )
    fs.retries = 2  # s3fs's own retry loop, on top of botocore's bounded one
    return fs


def filesystem_for(path: str, *, endpoint_url: str | None = None) -> Any:
    """The fsspec filesystem that reads `path`: S3 for s3:// URLs, else the local disk."""
    if is_s3(path):
        return s3_filesystem(endpoint_url=endpoint_url)
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def split_store_path(path: str) -> tuple[str, str]:
    """Split '/a/b/x.zarr/recon-1/em' into the store root '/a/b/x.zarr' and 'recon-1/em'."""
    parts = path.rstrip("/").split("/")
    for index, part in enumerate(parts):
        if part.endswith(STORE_SUFFIXES):
            return "/".join(parts[: index + 1]), "/".join(parts[index + 1 :])
    raise ValueError(f"{path!r} has no component ending in .zarr or .n5 to mark the store root")


@contextmanager
def s3_errors(url: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Turn S3 failures under `url` into a one-line `StorageError` (local errors pass through)."""
    if not is_s3(url):
        yield
        return
    from aiohttp import ClientError as HTTPError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (OSError, BotoCoreError, ClientError, HTTPError) as error:
        raise StorageError(describe_s3_error(error, url, endpoint_url)) from None


def describe_s3_error(error: BaseException, url: str, endpoint_url: str | None = None) -> str:
    """One line naming the URL and what to check, for the errors users meet on S3."""
    endpoint = s3_endpoint(endpoint_url) or "the AWS default endpoint"
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in text:
        return f"{url} not found at {endpoint}: check the bucket name (--bucket) and the path"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        variables = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        how = f"the credentials in {variables} or AWS_PROFILE"
        if not has_aws_credentials():
            how = f"whether the bucket allows anonymous reads, or set {variables}"
        return f"access to {url} at {endpoint} was denied: check {how}"
    return (
        f"cannot read {url} from {endpoint} ({text.splitlines()[0]}): check the endpoint "
        "(--endpoint-url or AWS_ENDPOINT_URL) and that it is reachable"
    )


# --- What csc wrote (what --overwrite may replace) -----------------------------------------

# The key csc puts in the .zattrs of every group it writes as a whole (a predicted or processed
# crop): {"csc": {"command": "predict", "version": "0.1.0"}}. --overwrite replaces a group only
# if it carries this key for the same command, so it never deletes data csc did not write.
CSC_MARKER = "csc"


def mark_csc_output(group: str | os.PathLike[str], command: str) -> None:
    """Mark the local zarr group `group` as written by `csc {command}` (in its .zattrs)."""
    import json

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


@contextmanager
def staged_group(path: Path, *, command: str, overwrite: bool = False) -> Iterator[Any]:
    """A zarr group written under a temporary name next to `path`, marked as `csc {command}`'s
    output and swapped in for `path` when the block ends without error; removed on error, so
    a crash never leaves a half-written group under the real name. What was at `path` is
    replaced only if `overwrite` is given and `csc {command}` wrote it."""
    import zarr

    clean_stale(path)
    root = zarr.open_group(str(path.parent), mode="a", zarr_format=2)
    partial = _beside(path, "partial", os.getpid())
    try:
        yield root.require_group(partial.name)
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
    import json

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
    import tempfile

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
