"""Runs a trained CLIP over its data once and caches the results (see `data/embedding_cache.py`).

    summaries = build_clip_cache("runs/shapes_clip", "runs/shapes_clip/cache")
    source = embedding_cache.CacheSource("runs/shapes_clip/cache", "train")

`embed.py` at the repository root is the command-line entry. Not a trainable stage.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import parallel, paths
from unclip_jax.data import embedding_cache
from unclip_jax.data import input_pipeline
from unclip_jax.data import tfds_builders
from unclip_jax.models.clip import l2_normalize
from unclip_jax.stages import load
from unclip_jax.stages.clip import ClipStage
from unclip_jax.train import checkpointing

DEFAULT_SPLITS = ("train", "validation", "heldout")
KARLO_CLIP_HINT = ("for an imported Karlo, import the full CLIP it was trained with: convert_karlo.py "
                   "--clip_dir <local copy of openai/clip-vit-large-patch14>")


class NoImageTowerError(ValueError):
    """The CLIP is a text encoder alone (e.g. Karlo's text_encoder/) where image embeddings are needed."""


def require_image_tower(clip_workdir: str, clip_config, why: str) -> None:
    """Raises NoImageTowerError unless the CLIP of `clip_workdir` (its stored config) has an image
    tower; `why` says what needs it."""
    if int(clip_config.model.get("vision_depth", 1)) <= 0:
        raise NoImageTowerError(
            f"{clip_workdir} holds a CLIP text encoder alone (no image tower), but {why} needs image "
            f"embeddings z_i: import a CLIP with both towers ({KARLO_CLIP_HINT})")


class PreprocessedSource:
    """A random-access source whose examples come out decoded and preprocessed by `fn`.

    `source[i]` -> `{"image": uint8 [S, S, 3], "caption": str}` with `(image, caption) =
    fn(raw_source[i])`; an unreadable example raises `ValueError` when it is read.
    """

    def __init__(self, source, fn):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i) -> dict[str, Any]:
        image, caption = self.fn(self.source[i])
        return {"image": image, "caption": caption}

    def __repr__(self) -> str:
        return f"PreprocessedSource({self.source!r})"


def _encoding_mesh_and_params(trained: load.Loaded):
    """Each process encodes its own chunks alone, so with several hosts the params are gathered
    and replicated over this host's devices (no collective runs while encoding)."""
    if jax.process_count() == 1:
        return trained.mesh, trained.params
    from jax.experimental import multihost_utils

    host_params = multihost_utils.process_allgather(trained.params, tiled=True)
    mesh = parallel.make_mesh((-1, 1, 1), jax.local_devices())
    return mesh, parallel.replicate(host_params, mesh)


def make_encode_fn(trained: load.Loaded, *, text_hidden_dtype: str = "float16"):
    """The cache's `encode_fn` for a trained CLIP; returns `(encode_fn, mesh)`.

    `encode_fn(images uint8 [B, H, W, 3], captions list[str])` -> numpy dict: `z_i`, `z_t`
    float32 [B, D] (unit norm), `z_i_norm`, `z_t_norm` float32 [B] (the norms of the projections
    as they are: z times its norm is `encode_image` / `encode_text(normalize=False)`),
    `text_hidden` [B, L, W] (`text_hidden_dtype`; the text tower's final LayerNormed states) and
    `tokens` int32 [B, L]. Images are normalised exactly as in
    training (`ClipStage.normalize`: the CLIP's own mean and std). B must be a multiple of the
    mesh's data-parallel size.
    """
    task = trained.stage
    if not isinstance(task, ClipStage):
        raise ValueError(f"expected a trained CLIP, got stage {trained.config.stage!r}")
    model, tokenizer = task.model, task.tokenizer
    mesh, params = _encoding_mesh_and_params(trained)
    rules = trained.rules
    hidden_dtype = jnp.dtype(text_hidden_dtype)

    def encode(params, images, tokens):
        variables = {"params": params}
        z_i = model.apply(variables, task.normalize(images), normalize=False, method=model.encode_image)
        z_t, hidden = model.apply(variables, tokens, return_hidden=True, normalize=False,
                                  method=model.encode_text)
        norms = [jnp.sqrt(jnp.sum(jnp.square(z), -1)) for z in (z_i, z_t)]
        return l2_normalize(z_i), l2_normalize(z_t), *norms, hidden.astype(hidden_dtype)

    encode = jax.jit(encode, out_shardings=NamedSharding(mesh, P()))
    batch_sharding = parallel.batch_sharding(mesh)

    def encode_fn(images: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
        tokens = tokenizer(list(captions))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            z_i, z_t, z_i_norm, z_t_norm, hidden = encode(
                params, jax.device_put(np.asarray(images, np.uint8), batch_sharding),
                jax.device_put(tokens, batch_sharding))
        return {"z_i": np.asarray(z_i), "z_t": np.asarray(z_t), "z_i_norm": np.asarray(z_i_norm),
                "z_t_norm": np.asarray(z_t_norm), "text_hidden": np.asarray(hidden), "tokens": tokens}

    return encode_fn, mesh


def encode_captions(trained: load.Loaded, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What an imported Karlo stage takes of captions, through a loaded CLIP: (z_t [N, D], the
    projection as it is; hidden states float32 [N, L, W], after the final LayerNorm; the
    tokenizer's attention mask bool [N, L], True up to and including the end-of-text token).
    The same encodings `pipeline.UnCLIPPipeline` gives Karlo stages at sampling."""
    stage = trained.stage
    with jax.set_mesh(trained.mesh), nn.logical_axis_rules(trained.rules):
        return stage.encode_captions(trained.params, trained.mesh, stage.tokenizer(list(captions)),
                                     normalize=False)


def describe_source(data, split: str, source) -> str:
    """A short, stable description of a data source (stored in the cache metadata)."""
    if data.source == "procedural":
        return repr(source)
    if data.source == "webdataset":
        return f"webdataset:{source.pattern}[{split}] ({len(source)} examples)"
    return f"tfds:{data.tfds_name}[{split}] ({len(source)} examples)"


def build_clip_cache(clip_workdir: str, cache_dir: str, splits: Sequence[str] = DEFAULT_SPLITS,
                     num_examples: int | None = None, batch_size: int = 256, *,
                     chunk_size: int = embedding_cache.DEFAULT_CHUNK_SIZE,
                     text_hidden_dtype: str = "float16", step: int | None = None,
                     progress: bool = False) -> dict[str, embedding_cache.BuildSummary]:
    """Loads the CLIP trained in `clip_workdir` (EMA params) and caches every split of its data.

    Args:
      clip_workdir: a CLIP `train.py` workdir.
      cache_dir: where the cache goes (`<cache_dir>/<split>/`); resumes a partial cache there.
      splits: splits of the CLIP config's data source; splits the source lacks are skipped.
      num_examples: at most this many examples per split (default: all).
      batch_size: encoder batch (rounded up to a multiple of the data-parallel size).
      chunk_size, text_hidden_dtype: see `embedding_cache.build_cache`.
      step: the CLIP checkpoint step (default: the latest).
      progress: show progress bars.

    Returns:
      {split: BuildSummary} of this process's work, for the splits that exist.
    """
    clip_workdir = paths.resolve(clip_workdir)
    cache_dir = paths.resolve(cache_dir)
    stored = checkpointing.load_config(clip_workdir) if os.path.isdir(clip_workdir) else None
    if stored is not None and stored.get("stage") != "clip":
        raise ValueError(f"{clip_workdir} trained stage {stored.get('stage')!r}, not 'clip': "
                         "pass a CLIP workdir as clip_workdir")
    if stored is not None:
        require_image_tower(clip_workdir, stored, "the embedding cache")
    trained = load.load_stage(clip_workdir, step=step)
    encode_fn, mesh = make_encode_fn(trained, text_hidden_dtype=text_hidden_dtype)
    dp = parallel.data_parallel_size(mesh)
    if batch_size % dp:
        rounded = -(-int(batch_size) // dp) * dp
        logging.info("batch_size %d rounded up to %d (a multiple of %d devices)", batch_size,
                     rounded, dp)
        batch_size = rounded
    config, model = trained.config, trained.stage.model
    summaries = {}
    for split in splits:
        try:
            source = input_pipeline.make_source(config.data, split)
        except tfds_builders.MissingSplitError as e:
            logging.warning("Skipping split %r: %s", split, e)
            continue
        n = len(source) if num_examples is None else min(int(num_examples), len(source))
        metadata: dict[str, Any] = {
            "clip_workdir": clip_workdir, "clip_step": trained.step, "clip_params": trained.which,
            "embed_dim": int(model.embed_dim), "context_length": int(model.context_length),
            "text_width": int(model.text_width), "image_size": int(config.model.image_size),
            "tokenizer_dir": trained.stage.tokenizer.path,
            "source": describe_source(config.data, split, source),
        }
        # Decoded, resized and cropped as the CLIP task does (an imported CLIP's own preprocessing).
        summaries[split] = embedding_cache.build_cache(
            PreprocessedSource(source, trained.stage.decode), encode_fn, cache_dir, split, num_examples=n,
            chunk_size=chunk_size, batch_size=batch_size, metadata=metadata,
            process_index=jax.process_index(), process_count=jax.process_count(),
            image_size=int(config.model.image_size),
            text_hidden_dtype=text_hidden_dtype, norms=True, num_threads=int(config.data.num_threads),
            progress=progress and jax.process_index() == 0)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("build_clip_cache")  # Every chunk is written.
    return summaries


@dataclasses.dataclass
class CachedClip:
    """What a stage trained on the embedding cache needs from its frozen CLIP (no params)."""

    clip_workdir: str
    clip_config: Any
    clip_sizes: dict
    cache_dir: str
    metadata: dict

    @property
    def embed_dim(self) -> int:
        return int(self.metadata["embed_dim"])

    @property
    def text_length(self) -> int:
        return int(self.metadata["context_length"])

    @property
    def text_width(self) -> int:
        return int(self.metadata["text_width"])

    @property
    def vocab_size(self) -> int:
        return int(self.clip_sizes["vocab_size"])

    @property
    def eot_token_id(self) -> int:
        return int(self.clip_sizes["eot_token_id"])


def cached_clip(config) -> CachedClip:
    """Reads `config.clip_workdir` (its config and recorded sizes) and the metadata of
    `config.cache_dir` ("" = <clip_workdir>/cache).

    Clear errors: a workdir with no trained CLIP, or a missing cache (naming the command to build it).
    """
    clip_workdir = paths.resolve(config.clip_workdir)
    clip_config = checkpointing.load_config(clip_workdir)
    if clip_config is None:
        raise FileNotFoundError(
            f"config.clip_workdir={clip_workdir} holds no trained CLIP (no config.json): train one "
            "with python train.py --config configs/shapes.py:clip --workdir <dir>")
    require_image_tower(clip_workdir, clip_config, f"training the {config.stage} on its embedding cache")
    cache_dir = (paths.resolve(config.cache_dir) if config.cache_dir
                 else os.path.join(clip_workdir, "cache"))
    return CachedClip(clip_workdir, clip_config, load.read_record(clip_workdir)["sizes"], cache_dir,
                      embedding_cache.read_metadata(cache_dir, "train"))
