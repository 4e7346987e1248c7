"""Training the decoder (`stages/decoder.py`) on (image, z_i, caption).

Training reads images from the CLIP's data set and z_i + caption tokens from the embedding cache
(record i carries the index of its image). Evaluation decodes the TRUE z_i of validation images
(the prior is not involved) and judges the pixels with the shapes judge against the images'
captions.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unclip_jax.data import embed
from unclip_jax.data import embedding_cache
from unclip_jax.data import input_pipeline
from unclip_jax.evaluation import shapes_judge
from unclip_jax.stages.decoder import DecoderStage
from unclip_jax.tasks.base import Task


class CachedImageSource:
    """Random-access pairs of (image at `side` px, cached z_i and tokens): record i of the cache."""

    def __init__(self, cache: embedding_cache.CacheSource, images, side: int):
        self.cache, self.images, self.side = cache, images, int(side)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.cache[i]
        image, caption = input_pipeline.decode_example(self.images[int(record["index"])], self.side)
        return {"image": image, "z_i": np.asarray(record["z_i"], np.float32),
                "tokens": np.asarray(record["tokens"], np.int32), "caption": caption}


class DecoderTask(Task):
    """Trains the decoder on (image, z_i, caption); evaluates decoded true z_i with the judge.

    `sizes` (clip_dim, text_length, vocab_size, eot_token_id) builds it without a CLIP or cache
    behind it (ahead-of-time compiles, benchmarks); such a task cannot train.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, sizes: Mapping[str, Any] | None = None):
        super().__init__(config, workdir)
        self.clip = None
        if sizes is None:
            self.clip = embed.cached_clip(config)
            sizes = {"clip_dim": self.clip.embed_dim, "text_length": self.clip.text_length,
                     "vocab_size": self.clip.vocab_size, "eot_token_id": self.clip.eot_token_id}
        self.stage = DecoderStage(config, **sizes)

    def describe(self) -> dict[str, Any]:
        depends = {"clip_workdir": self.config.clip_workdir} if self.config.get("clip_workdir") else {}
        return {"sizes": dict(self.stage.sizes), "depends_on": depends}

    def source(self, split: str) -> CachedImageSource:
        return CachedImageSource(embedding_cache.CacheSource(self.clip.cache_dir, split),
                                 input_pipeline.make_source(self.clip.clip_config.data, split), self.stage.side)

    # ------------------------------------------------------------------ data
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, s = int(batch_size), self.stage.side
        return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
                "z_i": jax.ShapeDtypeStruct((b, self.stage.clip_dim), jnp.float32),
                "tokens": jax.ShapeDtypeStruct((b, self.stage.text_length), jnp.int32)}

    def map_example(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: example[k] for k in ("image", "z_i", "tokens")}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        data = self.config.data
        return input_pipeline.make_pipeline(
            self.source("train"), self.map_example, local_batch_size=local_batch_size,
            shuffle_seed=data.shuffle_seed, process_index=process_index, process_count=process_count,
            num_threads=data.num_threads)

    # ------------------------------------------------------------------ evaluation
    def decode(self, params, mesh: Mesh, z_i: np.ndarray, tokens: np.ndarray, rng: jax.Array,
               guidance_scale: float | None = None) -> np.ndarray:
        """Decodes unit z_i [N, D] (with caption tokens [N, L]) to uint8 images [N, side, side, 3]."""
        return self.stage.decode(params, mesh, z_i, tokens, rng, batch_size=self.config.eval.batch_size,
                                 guidance_scale=guidance_scale)

    def _eval_examples(self, split: str):
        source = self.source(split)
        items = [source[i] for i in range(min(len(source), int(self.config.eval.num_examples)))]
        return (np.stack([x["z_i"] for x in items]), np.stack([x["tokens"] for x in items]),
                [x["caption"] for x in items], np.stack([x["image"] for x in items]))

    def evaluate(self, params, mesh: Mesh) -> dict[str, float]:
        """The shapes judge on images decoded from the true z_i of `eval.splits` examples."""
        results = {}
        for split in self.config.eval.splits:
            z_i, tokens, captions, _ = self._eval_examples(split)
            images = self.decode(params, mesh, z_i, tokens, jax.random.key(int(self.config.eval.seed)))
            scores = shapes_judge.judge_batch(images, captions)
            results.update({f"eval/{split}/judge_{k}": float(v) for k, v in scores.items()})
        return results

    def sample_images(self, params, mesh: Mesh) -> dict[str, np.ndarray]:
        if not self.config.eval.splits:
            return {}
        z_i, tokens, _, real = self._eval_examples(self.config.eval.splits[0])
        n = min(16, len(z_i))
        decoded = self.decode(params, mesh, z_i[:n], tokens[:n], jax.random.key(1))
        return {"decoded_vs_real": np.concatenate([decoded, real[:n]])}
