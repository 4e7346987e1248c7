"""Image-caption pairs from WebDataset-style tar shards (the format img2dataset writes).

A shard is an uncompressed tar whose members are grouped into samples by key: the member path up to
the first dot of its file name (`00001234.jpg`, `00001234.txt`, `00001234.json` are one sample with
key `00001234`). A sample needs one image (`.jpg`, `.jpeg`, `.png` or `.webp`) and a caption
(`.txt`, UTF-8); other members (`.json`, ...) are ignored.

`WebDatasetSource` indexes the shards once (tar headers only, using the stdlib `tarfile`) and then
reads any sample by offset: a random-access source for grain and the embedding cache, like the
TFDS sources (`source[i]` -> `{"image": encoded bytes, "caption": str, "key": str}`).

Unusable samples are skipped, counted and logged, never fatal:
- at indexing: an image without a caption (`missing_caption`), a caption without an image
  (`missing_image`), a member cut off by the end of the file (`truncated_member`), a shard that
  stops being a readable tar part-way (`corrupt_shard`: the samples before the damage are kept);
  with `verify_images=True` also images that do not decode (`corrupt_image`);
- when read: an image that does not decode or an empty or non-UTF-8 caption raises `ValueError`
  from `pipeline.decode_example` / `source[i]`, which the embedding cache records as an invalid
  example (and counts) instead of failing.

Several hosts: the pipelines slice a source by example (`process_index::process_count`); with
`process_index`/`process_count` given here, a source holds only this host's shards
(`shards[process_index::process_count]`), for streams that should not share shards.
"""
from __future__ import annotations

import collections
import concurrent.futures
import glob
import logging
import os
import re
import tarfile
import threading
from typing import Any, Sequence

import numpy as np

from unclip_jax.data import images as image_lib
from unclip_jax.data.checks import checked_int

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
SKIP_REASONS = ("missing_caption", "missing_image", "truncated_member", "corrupt_shard",
                "corrupt_image")
_MAX_LOGGED_SKIPS = 20
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


# ---------------------------------------------------------------------------------------------
# Shard patterns.
# ---------------------------------------------------------------------------------------------
def _expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b` -> a00b a01b a02b; `{x,y}` -> x y (nested and repeated groups too)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        start, stop = numeric.groups()
        width = len(start) if start.startswith("0") and len(start) > 1 else 0
        lo, hi = int(start), int(stop)
        if hi < lo:
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        choices = [str(n).zfill(width) for n in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    return [p for choice in choices for p in _expand_braces(head + choice + tail)]


def _split_top_level(pattern: str) -> list[str]:
    """Splits on commas outside braces: `a.tar,b/{0..3}.tar` -> [`a.tar`, `b/{0..3}.tar`]."""
    parts, depth, current = [], 0, []
    for ch in pattern:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard paths named by `shards`, in order, without repeats.

    `shards`: a pattern or a list of them; a pattern is a path with optional brace ranges
    (`data/{00000..00099}.tar`, zero-padded like the start), brace lists (`{a,b}`) and glob wildcards
    (`data/*.tar`, sorted); several patterns may be joined by commas. Local files only. A glob that
    matches nothing or a named file that does not exist is an error naming it.
    """
    patterns = _split_top_level(shards) if isinstance(shards, str) else [str(s) for s in shards]
    if not patterns:
        raise ValueError(f"no shards: the shard pattern {shards!r} is empty")
    paths, missing = [], []
    for pattern in patterns:
        for expanded in _expand_braces(os.path.expanduser(pattern)):
            if glob.has_magic(expanded):
                found = sorted(glob.glob(expanded))
                if not found:
                    missing.append(f"{expanded} (matches no file)")
                paths.extend(found)
            elif os.path.isfile(expanded):
                paths.append(expanded)
            else:
                missing.append(expanded)
    if missing:
        shown = missing[:10] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10 else [])
        raise FileNotFoundError(f"shard pattern {shards!r}: {len(missing)} shard(s) not found: "
                                + ", ".join(shown))
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


# ---------------------------------------------------------------------------------------------
# Indexing one shard.
# ---------------------------------------------------------------------------------------------
def split_key(name: str) -> tuple[str, str]:
    """WebDataset's member naming: `dir/0001.seg.jpg` -> (`dir/0001`, `seg.jpg`), extension lowercased."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def _index_shard(path: str) -> dict[str, Any]:
    """Scans one shard's tar headers: its samples (key, image and caption offsets) and skips."""
    samples: dict[str, dict[str, Any]] = {}
    skipped: list[tuple[str, str, str]] = []  # (key or member, reason, detail)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise ValueError(f"shard {path} is gzip-compressed: random access needs uncompressed tar "
                             "shards (img2dataset's default); decompress it with gunzip")
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError) as error:
                    skipped.append((os.path.basename(path), "corrupt_shard",
                                    f"unreadable after {len(samples)} samples: "
                                    f"{type(error).__name__}: {error}"))
                    break
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                kind = ("image" if ext in IMAGE_EXTENSIONS else
                        "caption" if ext == CAPTION_EXTENSION else None)
                if kind is None:
                    continue
                if info.offset_data + info.size > file_size:
                    skipped.append((info.name, "truncated_member",
                                    f"needs {info.offset_data + info.size} bytes, the file has "
                                    f"{file_size}"))
                    continue
                sample = samples.setdefault(key, {})
                sample.setdefault(kind, (info.offset_data, info.size))
    except tarfile.ReadError as error:  # Not a tar at all (the first header is bad).
        skipped.append((os.path.basename(path), "corrupt_shard", f"not a tar file: {error}"))
    keys, offsets = [], []
    for key, sample in samples.items():
        if "image" not in sample:
            skipped.append((key, "missing_image", "a caption with no image"))
        elif "caption" not in sample:
            skipped.append((key, "missing_caption", "an image with no .txt caption"))
        else:
            keys.append(key)
            offsets.append(sample["image"] + sample["caption"])
    return {"keys": keys, "offsets": np.asarray(offsets, np.int64).reshape(-1, 4),
            "skipped": skipped}


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: could only read {len(data)} of {size} bytes at offset {offset}")
    return data


# Indexes already built in this process, by shard path and file identity (size, mtime): every
# make_source call for the same shards reuses them.
_INDEX_CACHE: dict[tuple, dict[str, Any]] = {}
_INDEX_LOCK = threading.Lock()


def _cached_index(path: str, verify_images: bool) -> dict[str, Any]:
    stat = os.stat(path)
    cache_key = (path, stat.st_size, stat.st_mtime_ns, verify_images)
    with _INDEX_LOCK:
        if cache_key in _INDEX_CACHE:
            return _INDEX_CACHE[cache_key]
    index = _index_shard(path)
    if verify_images:
        keep = []
        for row, key in enumerate(index["keys"]):
            offset, size = index["offsets"][row, :2]
            try:
                image_lib.decode_image(_read(path, int(offset), int(size)))
            except ValueError as error:
                index["skipped"].append((key, "corrupt_image", str(error)))
                continue
            keep.append(row)
        index = {"keys": [index["keys"][r] for r in keep], "offsets": index["offsets"][keep],
                 "skipped": index["skipped"]}
    with _INDEX_LOCK:
        _INDEX_CACHE[cache_key] = index
    return index


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------
def write_shard(path: str, samples, *, image_extension: str = "jpg") -> int:
    """Writes `samples` as one uncompressed tar shard (`<key>.<image_extension>` + `<key>.txt`).

    samples: iterable of (key str, image, caption str | None); image is encoded bytes, or a uint8
    [H, W, 3] array encoded as JPEG (quality 95) or PNG by `image_extension`; a None caption writes
    no `.txt`. Written to `path + ".tmp"` and renamed. Returns the number of samples written.
    """
    import io
    import time

    from PIL import Image

    ext = image_extension.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"image_extension={image_extension!r}: expected one of {IMAGE_EXTENSIONS}")
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(data))

    count = 0
    tmp = path + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, caption in samples:
            if not isinstance(image, (bytes, bytearray)):
                buffer = io.BytesIO()
                Image.fromarray(np.asarray(image, np.uint8)).save(
                    buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
                image = buffer.getvalue()
            add(tar, f"{key}.{ext}", bytes(image))
            if caption is not None:
                add(tar, f"{key}.{CAPTION_EXTENSION}", caption.encode("utf-8"))
            count += 1
    os.replace(tmp, path)
    return count


# ---------------------------------------------------------------------------------------------
# The source.
# ---------------------------------------------------------------------------------------------
class WebDatasetSource:
    """Random access to the (image, caption) samples of tar shards, in shard then member order.

    Args:
      shards: a shard pattern or list (see `expand_shards`).
      verify_images: decode every image while indexing and skip the corrupt ones (slower; without
        it a corrupt image is found, and skipped by the embedding cache, when it is read).
      process_index, process_count: keep only shards `process_index::process_count` (default: all).
      num_threads: threads indexing shards.

    `source[i]` -> `{"image": encoded bytes, "caption": str (whitespace collapsed), "key": str}`;
    raises `ValueError` for an empty or non-UTF-8 caption. `skipped` counts the samples left out
    by reason (see the module docstring), `skipped_samples` lists them as (shard, key, reason,
    detail).
    """

    def __init__(self, shards: str | Sequence[str], *, verify_images: bool = False,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 8):
        process_count = checked_int("process_count", process_count, 1)
        process_index = checked_int("process_index", process_index, 0)
        if process_index >= process_count:
            raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
        self.pattern = shards if isinstance(shards, str) else ",".join(map(str, shards))
        self.shards = expand_shards(shards)[process_index::process_count]
        if not self.shards:
            raise ValueError(f"shard pattern {self.pattern!r} names fewer shards than processes "
                             f"({process_count}): process {process_index} has none")
        with concurrent.futures.ThreadPoolExecutor(max(1, min(int(num_threads), len(self.shards)))) as pool:
            indexes = list(pool.map(lambda p: _cached_index(p, bool(verify_images)), self.shards))
        self._keys: list[str] = []
        shard_ids, offsets = [], []
        self.skipped_samples: list[tuple[str, str, str, str]] = []
        for shard_id, (path, index) in enumerate(zip(self.shards, indexes)):
            self._keys.extend(index["keys"])
            shard_ids.append(np.full(len(index["keys"]), shard_id, np.int32))
            offsets.append(index["offsets"])
            self.skipped_samples.extend((path, key, reason, detail)
                                        for key, reason, detail in index["skipped"])
        self._shard_ids = np.concatenate(shard_ids)
        self._offsets = np.concatenate(offsets)
        self.skipped = collections.Counter(reason for _, _, reason, _ in self.skipped_samples)
        self._log()

    def _log(self) -> None:
        for path, key, reason, detail in self.skipped_samples[:_MAX_LOGGED_SKIPS]:
            log.warning("webdataset: skipping %s in %s (%s): %s", key, os.path.basename(path),
                        reason, detail)
        if len(self.skipped_samples) > _MAX_LOGGED_SKIPS:
            log.warning("webdataset: ... and %d more skipped samples",
                        len(self.skipped_samples) - _MAX_LOGGED_SKIPS)
        log.info("webdataset %s: %d shards, %d samples, skipped %s", self.pattern,
                 len(self.shards), len(self), dict(sorted(self.skipped.items())))

    @property
    def num_skipped(self) -> int:
        """Samples left out while indexing (all reasons)."""
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i) -> dict[str, Any]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} webdataset samples")
        path = self.shards[int(self._shard_ids[i])]
        image_offset, image_size, caption_offset, caption_size = (int(x) for x in self._offsets[i])
        key = self._keys[i]
        image = _read(path, image_offset, image_size)
        raw = _read(path, caption_offset, caption_size)
        try:
            caption = " ".join(raw.decode("utf-8").split())
        except UnicodeDecodeError as error:
            raise ValueError(f"caption of {key} in {path} is not UTF-8: {error}") from error
        if not caption:
            raise ValueError(f"caption of {key} in {path} is empty")
        return {"image": image, "caption": caption, "key": key}

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.pattern!r}, {len(self.shards)} shards, {len(self)} samples)"
