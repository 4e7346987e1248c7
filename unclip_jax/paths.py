"""Paths a user gives (workdirs, data and cache directories): local or on an object store."""
from __future__ import annotations

import os

from etils import epath


def resolve(path: str | os.PathLike) -> str:
    """`path` made absolute: a local path expanded (`~`) and made absolute against the current
    directory; a URL (`gs://bucket/run`, `s3://...`) kept as it is (orbax and TFDS read and write
    those through `etils.epath`)."""
    path = os.fspath(path)
    if "://" in path:
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def makedirs(path: str | os.PathLike) -> epath.Path:
    """Creates `path` (and its parents) if missing; returns it as an `epath.Path`."""
    p = epath.Path(resolve(path))
    p.mkdir(parents=True, exist_ok=True)
    return p
