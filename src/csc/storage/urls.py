"""Locations: local paths and s3:// URLs, and where a zarr or n5 store's root ends in one."""

from __future__ import annotations

import os

S3_SCHEME = "s3://"
# Components that end a zarr or n5 store's root in a path; what follows is the path inside it.
STORE_SUFFIXES = (".zarr", ".n5")


def is_s3(path: str) -> bool:
    return path.startswith(S3_SCHEME)


def is_url(path: str) -> bool:
    """Whether `path` names its scheme (s3://, http://, ...), so it is no local path."""
    return "://" in path


def fs_path(url: str) -> str:
    """The path an fsspec filesystem takes for `url`: an S3 URL without its scheme."""
    return url.removeprefix(S3_SCHEME)


def s3_url(path: str) -> str:
    """`path` as an S3 URL: fsspec's paths from an S3 listing lack the scheme."""
    return path if is_s3(path) else S3_SCHEME + path


def bucket_url(bucket: str, path: str) -> str:
    """`path` inside `bucket` as an S3 URL; an S3 URL is kept as it is."""
    return path if is_s3(path) else f"{S3_SCHEME}{bucket}/{path.lstrip('/')}"


def absolute(path: str | os.PathLike[str]) -> str:
    """A location as csc names it: an S3 URL as given, a local path made absolute; no
    trailing '/'."""
    location = os.fspath(path).rstrip("/")
    return location if is_s3(location) else os.path.abspath(location)


def split_store_path(path: str) -> tuple[str, str]:
    """Split '/a/b/x.zarr/recon-1/em' into the store root '/a/b/x.zarr' and 'recon-1/em'."""
    parts = path.rstrip("/").split("/")
    for index, part in enumerate(parts):
        if part.endswith(STORE_SUFFIXES):
            return "/".join(parts[: index + 1]), "/".join(parts[index + 1 :])
    raise ValueError(f"{path!r} has no component ending in .zarr or .n5 to mark the store root")
