"""Training the decoder (`stages/decoder.py`) on (image, z_i, caption).

Training reads images from the CLIP's data set and z_i + caption tokens from the embedding cache
(record i carries the index of its image). Evaluation decodes the TRUE z_i of held-out images (the
prior is not involved) and scores the decodings with the metrics `eval.metrics` names:

- `judge`: the shapes judge reads the pixels against the images' captions (shapes data only).
- `fd_clip`: the Frechet distance between CLIP image features of the decodings and of the real
  held-out images at the decoder's size (`evaluation/frechet.py`).
- `clip_score`: 100 x max(cos, 0) of the decodings' CLIP image features with their captions' CLIP
  text features (`evaluation/features.py`).

The CLIP metrics read the features of `eval.clip_workdir`, or of the stage's own CLIP
(`clip_workdir`) when it is empty. Its params are loaded at the first evaluation, and the real
images' features and the captions' of each split are computed once per run, not at every
evaluation (they do not change while the decoder trains).

Karlo mode (fine-tuning an imported Karlo decoder, `configs/karlo.py:decoder`): the batches carry
what Karlo's decoder is conditioned on, from the cache: the unnormalised z_i and z_t (unit
embedding times its stored norm: the cache must be format 2 with norms), the text hidden states
(float32) and the tokenizer's attention mask (derived from the tokens) in place of the tokens. The
empty caption's encodings (what the dropped captions become) are computed once, here, with the CLIP
of `clip_workdir`, which must have its image tower (the cache's z_i come from it). Evaluation
decodes with Karlo's sampler (guided with the empty caption, as sampling does).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from unclip_jax import paths
from unclip_jax.data import embed
from unclip_jax.data import embedding_cache
from unclip_jax.data import input_pipeline
from unclip_jax.data import tfds_builders
from unclip_jax.evaluation import features as features_lib
from unclip_jax.evaluation import frechet
from unclip_jax.evaluation import shapes_judge
from unclip_jax.models.layers import text_mask
from unclip_jax.stages import load
from unclip_jax.stages.decoder import DecoderStage
from unclip_jax.tasks.base import Task
from unclip_jax.train import checkpointing

METRICS = ("judge", "fd_clip", "clip_score")  # What `eval.metrics` may name.
CLIP_METRICS = ("fd_clip", "clip_score")


def eval_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`config.eval.metrics` ("judge" in configs written before the field existed), checked."""
    names = config.eval.get("metrics", ("judge",))
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"config.eval.metrics={names!r}: unknown metric(s) {unknown}; the decoder "
                         f"evaluates {METRICS} (judge: shapes captions only; fd_clip and clip_score: any data)")
    return names


KARLO_FIELDS = ("z_t", "text_hidden", "text_mask")  # The caption's encodings in Karlo mode.


class CachedImageSource:
    """Random-access pairs of (image at `side` px, cached z_i and tokens): record i of the cache.

    With `karlo_eot_token_id` (Karlo mode, a cache with norms): z_i and z_t unnormalised (times
    their norms), `text_hidden` float32 and `text_mask` (the tokenizer's attention mask) too."""

    def __init__(self, cache: embedding_cache.CacheSource, images, side: int,
                 karlo_eot_token_id: int | None = None):
        self.cache, self.images, self.side = cache, images, int(side)
        self.karlo_eot_token_id = karlo_eot_token_id

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.cache[i]
        image, caption = input_pipeline.decode_example(self.images[int(record["index"])], self.side)
        example = {"image": image, "z_i": np.asarray(record["z_i"], np.float32),
                   "tokens": np.asarray(record["tokens"], np.int32), "caption": caption}
        if self.karlo_eot_token_id is not None:
            example.update(z_i=example["z_i"] * np.float32(record["z_i_norm"]),
                           z_t=np.asarray(record["z_t"], np.float32) * np.float32(record["z_t_norm"]),
                           text_hidden=np.asarray(record["text_hidden"], np.float32),
                           text_mask=text_mask(example["tokens"], self.karlo_eot_token_id))
        return example


class DecoderTask(Task):
    """Trains the decoder on (image, z_i, caption); evaluates decoded true z_i (`eval.metrics`).

    `sizes` (clip_dim, text_length, vocab_size, eot_token_id) builds it without a CLIP or cache
    behind it (ahead-of-time compiles, benchmarks); such a task cannot train.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, sizes: Mapping[str, Any] | None = None):
        super().__init__(config, workdir)
        self.metrics = eval_metrics(config)
        self.clip = None
        self.feature_clip_workdir = None  # Without a CLIP behind it (`sizes`) the task cannot evaluate.
        if sizes is None:
            self.clip = embed.cached_clip(config)
            sizes = {"clip_dim": self.clip.embed_dim, "text_length": self.clip.text_length,
                     "vocab_size": self.clip.vocab_size, "eot_token_id": self.clip.eot_token_id}
            self.feature_clip_workdir = self._feature_clip_workdir()
        self.stage = DecoderStage(config, **sizes)
        self.empty_caption = None  # Karlo mode: the empty caption's (z_t [1, D], hidden [1, L, W], mask [1, L]).
        if self.stage.karlo:
            self.empty_caption = self._karlo_empty_caption()
        self._feature_clip: features_lib.ClipFeatures | None = None
        self._references: dict[str, dict[str, Any]] = {}  # split -> real images' statistics, caption features
        self._skipped: set[str] = set()
        self._examples: dict[str, tuple] = {}  # split -> the held-out examples (`_eval_examples`)

    def _karlo_empty_caption(self):
        """The empty caption's encodings through the CLIP (zeros of their shapes without one)."""
        if self.clip is None:
            d, length = self.stage.clip_dim, self.stage.text_length
            return (np.zeros((1, d), np.float32),
                    np.zeros((1, length, self.stage.model.clip_text_width), np.float32),
                    np.ones((1, length), bool))
        embedding_cache.require_norms(self.clip.metadata, self.clip.cache_dir, "train",
                                      "fine-tuning the imported Karlo decoder (it takes unnormalised z_i and z_t)")
        return embed.encode_captions(load.load_stage(self.clip.clip_workdir), [""])

    def loss_fn(self, params, batch, rng, step):
        del step
        return self.stage.loss(params, batch, rng, empty_caption=self.empty_caption)

    def _feature_clip_workdir(self) -> str | None:
        """The CLIP workdir the CLIP metrics use, checked now (not at the first evaluation)."""
        if not any(m in CLIP_METRICS for m in self.metrics) or not self.config.eval.splits:
            return None
        if int(self.config.eval.num_examples) < 2:
            raise ValueError(f"config.eval.num_examples={self.config.eval.num_examples}: fd_clip and "
                             "clip_score need at least 2 examples per split (a covariance)")
        given = self.config.eval.get("clip_workdir", "")
        workdir = given or self.config.get("clip_workdir", "")
        if not workdir:
            raise ValueError(f"config.eval.metrics={self.metrics!r} needs a CLIP: set config.eval.clip_workdir "
                             "or config.clip_workdir")
        workdir = paths.resolve(workdir)
        stored = checkpointing.load_config(workdir)
        field = "eval.clip_workdir" if given else "clip_workdir"
        if stored is None or stored.get("stage") != "clip":
            what = "holds no trained or imported stage" if stored is None else f"holds a {stored.get('stage')!r} stage"
            raise ValueError(f"config.{field}={workdir} {what}: the CLIP metrics {CLIP_METRICS} need a CLIP "
                             "workdir (trained, or imported with convert_clip.py)")
        return workdir

    def describe(self) -> dict[str, Any]:
        depends = {"clip_workdir": self.config.clip_workdir} if self.config.get("clip_workdir") else {}
        return {"sizes": dict(self.stage.sizes), "depends_on": depends}

    def source(self, split: str) -> CachedImageSource:
        cache = embedding_cache.CacheSource(self.clip.cache_dir, split)
        if self.stage.karlo:
            embedding_cache.require_norms(cache.metadata, self.clip.cache_dir, split,
                                          "the imported Karlo decoder (unnormalised z_i and z_t)")
        return CachedImageSource(cache, input_pipeline.make_source(self.clip.clip_config.data, split),
                                 self.stage.side, self.stage.eot_token_id if self.stage.karlo else None)

    # ------------------------------------------------------------------ data
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, s, d, length = int(batch_size), self.stage.side, self.stage.clip_dim, self.stage.text_length
        spec = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
                "z_i": jax.ShapeDtypeStruct((b, d), jnp.float32)}
        if not self.stage.karlo:
            return dict(spec, tokens=jax.ShapeDtypeStruct((b, length), jnp.int32))
        return dict(spec, z_t=jax.ShapeDtypeStruct((b, d), jnp.float32),
                    text_hidden=jax.ShapeDtypeStruct((b, length, self.stage.model.clip_text_width), jnp.float32),
                    text_mask=jax.ShapeDtypeStruct((b, length), jnp.bool_))

    def map_example(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: example[k] for k in ("image", "z_i", *(KARLO_FIELDS if self.stage.karlo else ("tokens",)))}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        data = self.config.data
        return input_pipeline.make_pipeline(
            self.source("train"), self.map_example, local_batch_size=local_batch_size,
            shuffle_seed=data.shuffle_seed, process_index=process_index, process_count=process_count,
            num_threads=data.num_threads)

    # ------------------------------------------------------------------ evaluation
    def decode(self, params, mesh: Mesh, z_i: np.ndarray, tokens, rng: jax.Array,
               guidance_scale: float | None = None) -> np.ndarray:
        """Decodes unit z_i [N, D] (with caption tokens [N, L]) to uint8 images [N, side, side, 3].

        Karlo mode: unnormalised z_i, and `tokens` is the captions' (z_t, text_hidden, text_mask)."""
        if self.stage.karlo:
            return self.stage.karlo_decode(params, mesh, z_i, tokens, self.empty_caption, rng,
                                           batch_size=self.config.eval.batch_size, guidance_scale=guidance_scale)
        return self.stage.decode(params, mesh, z_i, tokens, rng, batch_size=self.config.eval.batch_size,
                                 guidance_scale=guidance_scale)

    def _eval_examples(self, split: str):
        """(z_i, tokens, captions, real images) of `split`'s first `eval.num_examples` examples,
        read at the first evaluation and kept (they do not change while the decoder trains).
        Karlo mode: the tokens' place holds the captions' (z_t, text_hidden, text_mask)."""
        if split not in self._examples:
            source = self.source(split)
            items = [source[i] for i in range(min(len(source), int(self.config.eval.num_examples)))]
            stack = lambda name: np.stack([x[name] for x in items])  # noqa: E731
            text = tuple(stack(k) for k in KARLO_FIELDS) if self.stage.karlo else stack("tokens")
            self._examples[split] = (stack("z_i"), text, [x["caption"] for x in items], stack("image"))
        return self._examples[split]

    def evaluate(self, params, mesh: Mesh) -> dict[str, float]:
        """`eval.metrics` of images decoded from the true z_i of `eval.splits` examples (a split
        the data or the embedding cache lacks is skipped, with a note)."""
        results = {}
        for split in self.config.eval.splits:
            try:
                z_i, tokens, captions, real = self._eval_examples(split)
            except (embedding_cache.CacheNotFoundError, tfds_builders.MissingSplitError) as e:
                if split not in self._skipped:
                    logging.warning("decoder evaluation: no %r split, skipped (%s)", split, e)
                    self._skipped.add(split)
                continue
            images = self.decode(params, mesh, z_i, tokens, jax.random.key(int(self.config.eval.seed)))
            if "judge" in self.metrics:
                scores = shapes_judge.judge_batch(images, captions)
                results.update({f"eval/{split}/judge_{k}": float(v) for k, v in scores.items()})
            if any(m in CLIP_METRICS for m in self.metrics):
                scores = self.clip_metrics(split, images, captions, real, mesh)
                results.update({f"eval/{split}/{k}": v for k, v in scores.items() if k in self.metrics})
        return results

    def feature_clip(self, mesh: Mesh) -> features_lib.ClipFeatures:
        """The CLIP of the CLIP metrics (EMA params on `mesh`), loaded once per task."""
        if self._feature_clip is None:
            if self.clip is not None and self.feature_clip_workdir == self.clip.clip_workdir:
                logging.info("decoder evaluation: CLIP features of the CLIP the decoder is conditioned on "
                             "(%s): fine to follow a run; set config.eval.clip_workdir to another CLIP "
                             "to compare models (docs/evaluation.md)", self.feature_clip_workdir)
            self._feature_clip = features_lib.ClipFeatures(self.feature_clip_workdir, mesh=mesh,
                                                           batch_size=int(self.config.eval.batch_size))
        return self._feature_clip

    def reference(self, split: str, captions, real: np.ndarray, mesh: Mesh) -> dict[str, Any]:
        """The real images' feature statistics and the captions' unit text features of `split`,
        computed at the first evaluation and kept (the held-out examples are the same each time)."""
        if split not in self._references:
            clip = self.feature_clip(mesh)
            stats = frechet.Statistics(clip.identity).update(clip.images(real))
            self._references[split] = {"stats": stats, "texts": clip.texts(list(captions))}
        return self._references[split]

    def clip_metrics(self, split: str, images: np.ndarray, captions, real: np.ndarray,
                     mesh: Mesh) -> dict[str, float]:
        """{"fd_clip", "clip_score"} of decodings [N, side, side, 3] against the real images [N, ...]
        and their captions (both at least 2 images: a covariance needs them)."""
        reference = self.reference(split, captions, real, mesh)
        clip = self.feature_clip(mesh)
        decoded = clip.images(images)
        stats = frechet.Statistics(clip.identity).update(decoded)
        return {"fd_clip": frechet.distance(stats, reference["stats"]),
                "clip_score": float(np.mean(features_lib.clip_score(decoded, reference["texts"])))}

    def sample_images(self, params, mesh: Mesh) -> dict[str, np.ndarray]:
        if not self.config.eval.splits:
            return {}
        z_i, tokens, _, real = self._eval_examples(self.config.eval.splits[0])
        n = min(16, len(z_i))
        tokens = tuple(x[:n] for x in tokens) if self.stage.karlo else tokens[:n]
        decoded = self.decode(params, mesh, z_i[:n], tokens, jax.random.key(1))
        return {"decoded_vs_real": np.concatenate([decoded, real[:n]])}
