"""An on-disk cache of frozen-CLIP outputs, aligned with a data source: record i <-> example i.

The prior and the decoder train on CLIP embeddings; computing them once (`embed.py`) means their
training never runs CLIP. This module is the storage side only (no model code): `build_cache`
takes any `encode_fn`, `CacheSource` reads the records back.

Layout of one split:

    <cache_dir>/<split>/metadata.json           what was encoded, with what (see `build_cache`)
    <cache_dir>/<split>/chunk-00000.array_record  records 0 .. chunk_size-1
    <cache_dir>/<split>/chunk-00000.json        that chunk's index: range, skipped examples
    <cache_dir>/<split>/chunk-00001.array_record  ...

Each record is a `flax.serialization.msgpack_serialize`d dict:

    z_i          float32 [D]     unit-norm CLIP image embedding
    z_t          float32 [D]     unit-norm CLIP text embedding
    text_hidden  float16|float32 [L, W]  final (LayerNormed) hidden states of the text tower
    tokens       int32 [L]       the caption's CLIP tokens
    z_i_norm     float32 []      L2 norm of the unnormalised image projection (format 2, `norms`)
    z_t_norm     float32 []      L2 norm of the unnormalised text projection (format 2, `norms`)
    caption      str
    index        int             the example's index in the source
    valid        bool            False for an example that could not be read or decoded

**Corrupt examples.** An example whose read or decode raises `ValueError`/`OSError` is skipped,
never fatal: its record holds only `index`, `valid=False` and `error`, so record i stays example i.
The chunk index files list them, so a reader learns which examples are missing without reading
the records. `CacheSource` exposes only the valid examples by default (`valid_only=False` gives
every index, with `valid` set and zeros in place of the missing arrays).

**Formats.** Format 2 added the norms (`build_cache(norms=True)`, which `embed.py` uses; the
metadata says `"norms": true`): unit z times its norm is the CLIP's projection as it is, what an
imported Karlo decoder is conditioned on. A format-1 cache (no norms) still reads, for every
stage that takes the unit embeddings; `require_norms` refuses it, with the command to rebuild it.

**Crash safety and resuming.** A chunk and its index are written to `.tmp` names and renamed when
complete (the index first, the chunk last: a chunk file under its final name is complete). A
rebuild skips the complete chunks and writes the rest. A cache is never overwritten: if
`metadata.json` disagrees with a new build (another CLIP step, other sizes), `build_cache` refuses.
One build per cache directory at a time (concurrent builds of the same chunk share its `.tmp`).

**Several hosts.** Process p of P writes chunks p, p + P, p + 2P, ...; together they write all.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import operator
import os
import socket
from typing import Any, Callable, Mapping

import numpy as np
from flax import serialization

from unclip_jax import parallel
from unclip_jax.data import input_pipeline

FORMAT_VERSION = 2  # 2: optional norms (z_i_norm, z_t_norm); format 1 caches read as norms=False.
DEFAULT_CHUNK_SIZE = 1024
METADATA_FILENAME = "metadata.json"
# What a build must say about the encoder: D, L and W of the records.
REQUIRED_METADATA = ("embed_dim", "context_length", "text_width")
TEXT_HIDDEN_DTYPES = ("float16", "float32")
ARRAY_FIELDS = ("z_i", "z_t", "text_hidden", "tokens")
NORM_FIELDS = ("z_i_norm", "z_t_norm")  # With `norms` (format 2).
_RESERVED = ("format_version", "split", "num_examples", "chunk_size", "text_hidden_dtype",
             "norms", "created")
# One record per group: random access reads one record, not a whole group.
_WRITER_OPTIONS = "group_size:1"

EncodeFn = Callable[[np.ndarray, list], Mapping[str, np.ndarray]]


class CacheNotFoundError(FileNotFoundError):
    """No cache (or an incomplete one) where one was expected."""


class CacheMismatchError(ValueError):
    """An existing cache was built differently from what is asked now."""


def _build_hint(cache_dir: str, split: str, clip_workdir: str | None = None) -> str:
    clip = clip_workdir or "<CLIP workdir>"
    return (f"python embed.py --clip_workdir {clip} --cache_dir {cache_dir} --splits {split}")


def chunk_path(split_dir: str, chunk: int) -> str:
    """The array_record file of chunk `chunk`."""
    return os.path.join(split_dir, f"chunk-{chunk:05d}.array_record")


def _index_path(split_dir: str, chunk: int) -> str:
    return os.path.join(split_dir, f"chunk-{chunk:05d}.json")


def _compared(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != "created"}


def _fingerprint(metadata: Mapping[str, Any]) -> str:
    payload = json.dumps(_compared(metadata), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _write_json_atomic(path: str, payload: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Metadata.
# ---------------------------------------------------------------------------------------------
def read_metadata(cache_dir: str, split: str) -> dict[str, Any]:
    """The `metadata.json` of one split; a missing cache raises `CacheNotFoundError`."""
    split_dir = os.path.join(os.fspath(cache_dir), split)
    path = os.path.join(split_dir, METADATA_FILENAME)
    if not os.path.exists(path):
        raise CacheNotFoundError(
            f"no embedding cache for split {split!r} in {split_dir} (no {METADATA_FILENAME}); "
            f"build it with {_build_hint(os.fspath(cache_dir), split)}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def _check_or_write_metadata(split_dir: str, wanted: dict[str, Any]) -> None:
    path = os.path.join(split_dir, METADATA_FILENAME)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        a, b = _compared(stored), _compared(wanted)
        differences = [f"{k}: cached {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
                       for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if differences:
            raise CacheMismatchError(
                f"{split_dir} already holds an embedding cache built differently:\n  "
                + "\n  ".join(differences)
                + "\nPick another cache_dir (the existing cache is left as it is).")
        return
    os.makedirs(split_dir, exist_ok=True)
    created = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": socket.gethostname()}
    _write_json_atomic(path, dict(wanted, created=created))


# ---------------------------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuildSummary:
    """What one process did for one split."""

    split: str
    path: str
    num_examples: int  # Examples in the whole cache (all processes).
    num_chunks: int  # Chunks in the whole cache.
    chunks_written: int = 0  # By this call.
    chunks_skipped: int = 0  # Already complete, by this process's share.
    examples_written: int = 0
    invalid: dict[int, str] = dataclasses.field(default_factory=dict)  # Written by this call.


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _chunk_complete(split_dir: str, chunk: int, fingerprint: str) -> bool:
    if not (os.path.exists(chunk_path(split_dir, chunk))
            and os.path.exists(_index_path(split_dir, chunk))):
        return False
    with open(_index_path(split_dir, chunk)) as f:
        index = json.load(f)
    if index.get("fingerprint") != fingerprint:
        raise CacheMismatchError(
            f"{chunk_path(split_dir, chunk)} belongs to a different build than "
            f"{os.path.join(split_dir, METADATA_FILENAME)}: pick another cache_dir (the existing "
            "cache is left as it is)")
    return True


def _load_example(source, index: int, image_size: int | None):
    """(index, image, caption, None) or (index, None, None, error) for a corrupt example."""
    try:
        image, caption = input_pipeline.decode_example(source[index], image_size)
    except (ValueError, OSError) as e:
        return index, None, None, f"{type(e).__name__}: {e}"
    return index, image, caption, None


def _check_outputs(out: Mapping[str, Any], n: int, metadata: Mapping[str, Any]) -> dict:
    fields = ARRAY_FIELDS + (NORM_FIELDS if metadata.get("norms") else ())
    missing = [k for k in fields if k not in out]
    if missing:
        raise ValueError(f"encode_fn must return {list(fields)}; {missing} missing")
    d, length, width = (int(metadata[k]) for k in REQUIRED_METADATA)
    expected = {"z_i": (n, d), "z_t": (n, d), "text_hidden": (n, length, width),
                "tokens": (n, length), "z_i_norm": (n,), "z_t_norm": (n,)}
    out = {k: np.asarray(out[k]) for k in fields}
    for k in fields:
        shape = expected[k]
        if out[k].shape != shape:
            raise ValueError(
                f"encode_fn returned {k} of shape {out[k].shape}; expected {shape} (batch {n}, "
                f"embed_dim={d}, context_length={length}, text_width={width} from the metadata)")
    return out


def _encode_padded(encode_fn: EncodeFn, images: list, captions: list, batch_size: int,
                   metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Calls encode_fn on exactly `batch_size` examples (repeats the last), returns n rows."""
    n = len(images)
    pad = batch_size - n
    batch = np.stack(images + [images[-1]] * pad)
    out = _check_outputs(encode_fn(batch, list(captions) + [captions[-1]] * pad), batch_size,
                         metadata)
    return {k: v[:n] for k, v in out.items()}


def _write_chunk(source, encode_fn: EncodeFn, split_dir: str, chunk: int, start: int, stop: int,
                 *, batch_size: int, image_size: int | None, text_hidden_dtype: str,
                 metadata: Mapping[str, Any], fingerprint: str, executor, pbar) -> dict[int, str]:
    from array_record.python.array_record_module import ArrayRecordWriter

    records: list[dict[str, Any]] = []
    invalid: dict[int, str] = {}
    pending: list[tuple[int, np.ndarray, str]] = []

    def flush():
        if not pending:
            return
        out = _encode_padded(encode_fn, [p[1] for p in pending], [p[2] for p in pending],
                             batch_size, metadata)
        for row, (index, _, caption) in enumerate(pending):
            records.append({
                "index": index, "valid": True, "caption": caption,
                "z_i": out["z_i"][row].astype(np.float32),
                "z_t": out["z_t"][row].astype(np.float32),
                "text_hidden": out["text_hidden"][row].astype(text_hidden_dtype),
                "tokens": out["tokens"][row].astype(np.int32),
                **{k: np.float32(out[k][row]) for k in NORM_FIELDS if k in out},
            })
        pending.clear()

    # The loads run ahead on the executor's threads while batches are encoded.
    loads = executor.map(lambda i: _load_example(source, i, image_size), range(start, stop))
    for index, image, caption, error in loads:
        if error is not None:
            flush()  # Keeps the records in index order.
            invalid[index] = error
            records.append({"index": index, "valid": False, "error": error})
        else:
            pending.append((index, image, caption))
            if len(pending) == batch_size:
                flush()
        pbar.update(1)
    flush()

    final = chunk_path(split_dir, chunk)
    tmp = final + ".tmp"
    writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(serialization.msgpack_serialize(record))
    finally:
        writer.close()
    _write_json_atomic(_index_path(split_dir, chunk), {
        "chunk": chunk, "start": start, "stop": stop, "fingerprint": fingerprint,
        "invalid": {str(k): v for k, v in invalid.items()}})
    os.replace(tmp, final)  # The commit point: a chunk under its final name is complete.
    return invalid


def build_cache(source, encode_fn: EncodeFn, cache_dir: str, split: str, *,
                num_examples: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                batch_size: int = 256, metadata: Mapping[str, Any],
                process_index: int = 0, process_count: int = 1, image_size: int | None = None,
                text_hidden_dtype: str = "float16", norms: bool = False, num_threads: int = 4,
                progress: bool = False) -> BuildSummary:
    """Encodes the first `num_examples` of `source` into `<cache_dir>/<split>/` (resumable).

    Args:
      source: random access (`len`, `[i]`) of raw examples `{"image", "caption"}` (see
        `input_pipeline.make_source`); images are decoded with `input_pipeline.decode_example`.
      encode_fn: `(images uint8 [B, H, W, 3], captions list[str]) -> {"z_i": [B, D],
        "z_t": [B, D], "text_hidden": [B, L, W], "tokens": int [B, L]}` (numpy). It is always
        called with B = `batch_size` (the last batch of a chunk is padded by repeating), so a
        jitted encoder compiles once.
      cache_dir, split: the cache goes to `<cache_dir>/<split>/`.
      num_examples: how many examples from the start of `source` (default: all).
      chunk_size: examples per chunk file (best a multiple of `batch_size`).
      metadata: JSON-serialisable description of the encoder, stored in metadata.json and compared
        on resume; must hold `embed_dim` (D), `context_length` (L) and `text_width` (W). Put the
        CLIP workdir, its step and a description of the source here.
      process_index, process_count: this process writes chunks `process_index::process_count`.
      image_size: resize (shorter side) and centre-crop images to this side; None keeps them.
      text_hidden_dtype: "float16" (half the disk) or "float32".
      norms: encode_fn also returns `z_i_norm` and `z_t_norm` [B] (the norms of the unnormalised
        projections), stored per record (see the module docstring).
      num_threads: threads reading and decoding examples.
      progress: show a tqdm bar.

    Returns:
      A `BuildSummary` of this process's work.

    Raises:
      CacheMismatchError: the directory holds a cache built with other metadata.
    """
    num_source = len(source)
    num_examples = num_source if num_examples is None else _check_int("num_examples", num_examples, 0)
    if num_examples > num_source:
        raise ValueError(f"num_examples={num_examples} but the source has only {num_source}")
    if num_examples == 0:
        raise ValueError(f"nothing to cache: the source for split {split!r} has no examples")
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    process_count = _check_int("process_count", process_count, 1)
    process_index = _check_int("process_index", process_index, 0)
    if process_index >= process_count:
        raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
    if text_hidden_dtype not in TEXT_HIDDEN_DTYPES:
        raise ValueError(f"text_hidden_dtype={text_hidden_dtype!r}: expected one of "
                         f"{TEXT_HIDDEN_DTYPES}")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"metadata must give {list(REQUIRED_METADATA)}; missing {missing}")
    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved (build_cache sets them)")
    wanted = {"format_version": FORMAT_VERSION, "split": split, "num_examples": num_examples,
              "chunk_size": chunk_size, "text_hidden_dtype": text_hidden_dtype, "norms": bool(norms),
              **metadata}
    try:
        wanted = json.loads(json.dumps(wanted))  # Tuples -> lists, as they read back.
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from e

    cache_dir = os.fspath(cache_dir)
    split_dir = os.path.join(cache_dir, split)
    # Several processes: process 0 writes metadata.json; the others then check theirs against it.
    parallel.process_zero_first(lambda: _check_or_write_metadata(split_dir, wanted),
                                f"embedding cache metadata {split}")
    fingerprint = _fingerprint(wanted)
    num_chunks = math.ceil(num_examples / chunk_size)
    summary = BuildSummary(split=split, path=split_dir, num_examples=num_examples,
                           num_chunks=num_chunks)
    mine = range(process_index, num_chunks, process_count)
    todo = []
    for chunk in mine:
        if _chunk_complete(split_dir, chunk, fingerprint):
            summary.chunks_skipped += 1
        else:
            todo.append(chunk)

    from tqdm import tqdm

    total = sum(min(num_examples, (c + 1) * chunk_size) - c * chunk_size for c in todo)
    with tqdm(total=total, disable=not progress, desc=f"embed {split}", unit="ex",
              dynamic_ncols=True) as pbar, \
            concurrent.futures.ThreadPoolExecutor(max(1, int(num_threads))) as executor:
        for chunk in todo:
            start, stop = chunk * chunk_size, min(num_examples, (chunk + 1) * chunk_size)
            invalid = _write_chunk(
                source, encode_fn, split_dir, chunk, start, stop, batch_size=batch_size,
                image_size=image_size, text_hidden_dtype=text_hidden_dtype, metadata=wanted,
                fingerprint=fingerprint, executor=executor, pbar=pbar)
            summary.chunks_written += 1
            summary.examples_written += stop - start
            summary.invalid.update(invalid)
    return summary


def missing_chunks(cache_dir: str, split: str) -> list[int]:
    """Chunks of a split not (yet) complete; [] for a finished cache."""
    metadata = read_metadata(cache_dir, split)
    split_dir = os.path.join(os.fspath(cache_dir), split)
    fingerprint = _fingerprint(metadata)
    num_chunks = math.ceil(metadata["num_examples"] / metadata["chunk_size"])
    return [c for c in range(num_chunks) if not _chunk_complete(split_dir, c, fingerprint)]


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------
class CacheSource:
    """Random-access source of cached records (usable by `grain.MapDataset.source`).

    `source[i]` is a dict with `z_i` float32 [D], `z_t` float32 [D], `text_hidden` [L, W] (the
    stored dtype, see `metadata["text_hidden_dtype"]`), `tokens` int32 [L], `caption` str,
    `index` int (the example's index in the data source) and `valid` bool; with `norms` (a
    format-2 cache built with them) also `z_i_norm` and `z_t_norm` float32 scalars.

    With `valid_only=True` (default) only the valid examples are exposed: `len` counts them and
    `i` runs over them in source order. With `valid_only=False`, `source[i]` is example i of the
    data source; an invalid one has `valid=False`, zeros and an empty caption.
    """

    def __init__(self, cache_dir: str, split: str, *, valid_only: bool = True):
        self.cache_dir = os.fspath(cache_dir)
        self.split = split
        self.valid_only = bool(valid_only)
        self.metadata = read_metadata(self.cache_dir, split)
        self._dir = os.path.join(self.cache_dir, split)
        missing = missing_chunks(self.cache_dir, split)
        if missing:
            num_chunks = math.ceil(self.metadata["num_examples"] / self.metadata["chunk_size"])
            raise CacheNotFoundError(
                f"the embedding cache in {self._dir} is incomplete: {len(missing)} of {num_chunks} "
                f"chunks missing (first: {missing[:5]}); finish it with (it resumes) "
                f"{_build_hint(self.cache_dir, split, self.metadata.get('clip_workdir'))}")
        self.num_examples = int(self.metadata["num_examples"])
        num_chunks = math.ceil(self.num_examples / int(self.metadata["chunk_size"]))
        self._paths = [chunk_path(self._dir, c) for c in range(num_chunks)]
        self.invalid: dict[int, str] = {}
        for c in range(num_chunks):
            with open(_index_path(self._dir, c)) as f:
                self.invalid.update({int(k): v for k, v in json.load(f)["invalid"].items()})
        self.valid_mask = np.ones(self.num_examples, bool)
        self.valid_mask[list(self.invalid)] = False
        self._valid_indices = np.flatnonzero(self.valid_mask)
        d, length, width = (int(self.metadata[k]) for k in REQUIRED_METADATA)
        hidden_dtype = np.dtype(self.metadata["text_hidden_dtype"])
        self.norms = bool(self.metadata.get("norms", False))  # Format 1: never.
        self._fields = ARRAY_FIELDS + (NORM_FIELDS if self.norms else ())
        self._zeros = {"z_i": np.zeros(d, np.float32), "z_t": np.zeros(d, np.float32),
                       "text_hidden": np.zeros((length, width), hidden_dtype),
                       "tokens": np.zeros(length, np.int32)}
        self._zeros.update({k: np.zeros((), np.float32) for k in self._fields if k in NORM_FIELDS})
        self._records = None
        self._open()

    def _open(self):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._records = ArrayRecordDataSource(self._paths)
        if len(self._records) != self.num_examples:
            raise ValueError(f"the embedding cache in {self._dir} holds {len(self._records)} "
                             f"records but its metadata says {self.num_examples}: it is damaged; "
                             "rebuild it in another cache_dir")

    @property
    def num_invalid(self) -> int:
        """Examples of the data source that could not be read (not exposed when valid_only)."""
        return len(self.invalid)

    def __len__(self) -> int:
        return len(self._valid_indices) if self.valid_only else self.num_examples

    def __getitem__(self, i) -> dict[str, Any]:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for the {self.split!r} embedding cache of "
                             f"{n} examples")
        return self.record(int(self._valid_indices[i]) if self.valid_only else i)

    def record(self, index: int) -> dict[str, Any]:
        """The record of example `index` of the data source (valid or not)."""
        if self._records is None:
            self._open()
        record = serialization.msgpack_restore(self._records[index])
        if not record["valid"]:
            return {**{k: v.copy() for k, v in self._zeros.items()}, "caption": "",
                    "index": int(record["index"]), "valid": False}
        out = {k: np.array(record[k]) for k in self._fields}  # Writable copies.
        out.update(caption=record["caption"], index=int(record["index"]), valid=True)
        return out

    def __getstate__(self):
        # The readers hold a lock and file handles: reopen them after unpickling.
        state = dict(self.__dict__)
        state["_records"] = None
        return state

    def __repr__(self) -> str:
        return (f"CacheSource({self._dir!r}, {len(self)} examples"
                f"{', valid only' if self.valid_only else ''})")


def require_norms(metadata: Mapping[str, Any], cache_dir: str, split: str, why: str) -> None:
    """Raises ValueError (with the command that rebuilds the cache) unless the cache of `split`
    (its `metadata`) stores the norms of the embeddings; `why` says what needs them."""
    if not metadata.get("norms", False):
        raise ValueError(
            f"the embedding cache in {os.path.join(os.fspath(cache_dir), split)} (format "
            f"{metadata.get('format_version', 1)}) stores unit embeddings without their norms, "
            f"which {why} needs: rebuild it into a new directory with "
            f"{_build_hint('<new cache_dir>', split, metadata.get('clip_workdir'))} and set "
            "config.cache_dir to it")


def summarize(cache_dir: str, split: str) -> dict[str, Any]:
    """Counts of a finished split: examples, valid, invalid, chunks; plus its metadata."""
    source = CacheSource(cache_dir, split, valid_only=False)
    return {"split": split, "path": source._dir, "num_examples": source.num_examples,
            "num_valid": int(source.valid_mask.sum()), "num_invalid": source.num_invalid,
            "num_chunks": len(source._paths), "metadata": source.metadata}

