"""Grain input pipelines over random-access sources (TFDS `data_source`s or the procedural shapes).

The stream is global: the whole source shuffled deterministically (a new order every epoch, from
`shuffle_seed`) and cut into global batches; with several data slices (processes feeding different
rows), global batch b is local batches b*count .. b*count+count-1 and slice `index` reads only its
own, so the examples a step sees do not depend on how many processes read them. Examples are
preprocessed on grain threads. `Pipeline` iterates local numpy batches and exposes `get_state/set_state`
so the checkpoint can hold the exact position of the stream: a resumed run sees the same next batch.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import grain
import ml_collections
import numpy as np

from unclip_jax import paths
from unclip_jax.data import images as image_lib
from unclip_jax.data import shapes

# OpenAI CLIP's normalisation constants (also used for the embedded shapes, so that imported
# checkpoints and ours see inputs on the same scale).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


SOURCES = ("tfds", "procedural", "webdataset")


def make_source(data: ml_collections.ConfigDict, split: str):
    """Returns a random-access source of `{"image": uint8 HWC | encoded bytes, "caption": str | bytes}`.

    `data.source`: "tfds" (`data.tfds_name` in `data.data_dir`), "procedural" (shapes rendered on
    the fly) or "webdataset" (tar shards: `data.shards` for train, `data.<split>_shards` for the
    other splits; a split without shards raises `tfds_builders.MissingSplitError`).
    """
    if data.source == "procedural":
        num = data.num_train if split == "train" else data.num_eval
        return shapes.ShapesSource(split=split, side=data.side, num_examples=num, seed=data.seed)
    if data.source == "tfds":
        from unclip_jax.data import tfds_builders

        data_dir = paths.resolve(data.data_dir)
        return tfds_builders.load_source(data.tfds_name, split=split, data_dir=data_dir, data=data)
    if data.source == "webdataset":
        from unclip_jax.data import tfds_builders
        from unclip_jax.data import webdataset

        field = "shards" if split == "train" else f"{split}_shards"
        pattern = data.get(field) or ""
        if not pattern:
            if split == "train":
                raise ValueError("config.data.source='webdataset' needs config.data.shards (e.g. "
                                 "'data/shards/{00000..00099}.tar' or 'data/shards/*.tar')")
            raise tfds_builders.MissingSplitError(
                f"no {split!r} split: config.data.{field} is empty or absent")
        return webdataset.WebDatasetSource(pattern, verify_images=bool(data.get("verify_images", False)))
    raise ValueError(f"config.data.source={data.source!r}: expected one of {SOURCES}")


def decode_example(example: Mapping[str, Any], side: int | None) -> tuple[np.ndarray, str]:
    """Decodes one raw example to (uint8 [side, side, 3] image, caption str)."""
    image = example["image"]
    if isinstance(image, (bytes, np.bytes_)) or (isinstance(image, np.ndarray) and image.dtype == object):
        image = image_lib.decode_image(bytes(image.item() if isinstance(image, np.ndarray) else image))
    image = np.asarray(image, np.uint8)
    if side is not None and image.shape[:2] != (side, side):
        image = image_lib.resize_center_crop(image, side)
    caption = example["caption"]
    if isinstance(caption, np.ndarray):
        caption = caption.item()
    if isinstance(caption, (bytes, np.bytes_)):
        caption = caption.decode("utf-8")
    return image, str(caption)


class Pipeline:
    """An iterator of local (per-process) numpy batches with a checkpointable position."""

    def __init__(self, dataset: grain.IterDataset):
        self._dataset = dataset
        self._iterator = iter(dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._iterator.set_state(dict(state))


def make_pipeline(
    source,
    map_fn: Callable[[Mapping[str, Any]], dict[str, np.ndarray]],
    *,
    local_batch_size: int,
    shuffle_seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    repeat: bool = True,
    with_index: bool = False,
) -> Pipeline:
    """Builds this data slice's training stream: shuffle every epoch, map, batch, take its batches.

    `process_index` / `process_count` are the data slice this process feeds and the number of
    slices (`parallel.data_slice`: processes whose devices hold the same rows read the same
    batches). Only the examples of this slice's batches are read and preprocessed.

    With `with_index`, `map_fn(position, example)` also gets the example's position in the global
    stream (0, 1, 2, ... across epochs): a deterministic seed for per-example randomness (random
    crops, corruptions) that a resumed run, or the same run on more processes, reproduces exactly.
    """
    ds = grain.MapDataset.source(source)
    if len(ds) < process_count * local_batch_size:
        raise ValueError(
            f"data set of {len(ds)} examples is smaller than one global batch "
            f"({process_count} data slices x {local_batch_size})")
    ds = ds.shuffle(seed=shuffle_seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map_with_index(map_fn) if with_index else ds.map(map_fn)
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds[process_index::process_count]
    # Threads read whole batches; a few batches in flight keep them busy.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
    return Pipeline(ds.to_iter_dataset(read))


def eval_batches(
    source,
    map_fn: Callable[[Mapping[str, Any]], dict[str, np.ndarray]],
    *,
    num_examples: int,
    batch_size: int,
    num_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """The first `num_examples` of `source`, in order, in batches (the last may be smaller)."""
    num = min(num_examples, len(source))
    ds = grain.MapDataset.source(source)[:num].map(map_fn).batch(batch_size)
    yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
