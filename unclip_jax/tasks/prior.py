"""Training the diffusion prior (`stages/prior.py`) on the CLIP embedding cache.

Evaluation samples z_i for held-out captions and reports their cosine to the true image embedding
and top-1 retrieval of the true image among distractors, next to two baselines (z_t itself, and
the training image embedding nearest to z_t).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from unclip_jax.data import embed
from unclip_jax.data import embedding_cache
from unclip_jax.data import input_pipeline
from unclip_jax.evaluation import retrieval as retrieval_lib
from unclip_jax.stages.prior import PriorStage
from unclip_jax.tasks.base import Task

CACHE_FIELDS = ("z_i", "z_t", "text_hidden", "tokens")


class PriorTask(Task):
    """Trains the diffusion prior; evaluates sampled z_i against the true image embeddings.

    `sizes` (embed_dim, text_length, text_width, eot_token_id) builds it without a CLIP or cache
    behind it (ahead-of-time compiles, benchmarks); such a task cannot train.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, sizes: Mapping[str, Any] | None = None):
        super().__init__(config, workdir)
        self.cache_dir = None
        if sizes is None:
            clip = embed.cached_clip(config)
            self.cache_dir = clip.cache_dir
            sizes = {"embed_dim": clip.embed_dim, "text_length": clip.text_length,
                     "text_width": clip.text_width, "eot_token_id": clip.eot_token_id}
        self.stage = PriorStage(config, **sizes)

    def describe(self) -> dict[str, Any]:
        depends = {"clip_workdir": self.config.clip_workdir} if self.config.get("clip_workdir") else {}
        return {"sizes": dict(self.stage.sizes), "depends_on": depends}

    # ------------------------------------------------------------------ data
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, d, length = int(batch_size), self.stage.embed_dim, self.stage.text_length
        return {"z_i": jax.ShapeDtypeStruct((b, d), jnp.float32),
                "z_t": jax.ShapeDtypeStruct((b, d), jnp.float32),
                # The cache stores the text hidden states in float16 (half the disk and host memory).
                "text_hidden": jax.ShapeDtypeStruct((b, length, self.stage.text_width), jnp.float16),
                "tokens": jax.ShapeDtypeStruct((b, length), jnp.int32)}

    def map_record(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: np.asarray(record[k]) for k in CACHE_FIELDS}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        return input_pipeline.make_pipeline(
            embedding_cache.CacheSource(self.cache_dir, "train"), self.map_record,
            local_batch_size=local_batch_size, shuffle_seed=self.config.data.shuffle_seed,
            process_index=process_index, process_count=process_count,
            num_threads=self.config.data.num_threads)

    # ------------------------------------------------------------------ evaluation
    def sample_z_i(self, params, mesh: Mesh, records: Mapping[str, np.ndarray], rng: jax.Array, *,
                   guidance_scale: float | None = None, best_of: int | None = None) -> np.ndarray:
        """Samples unit z_i [N, D] for cached captions (`z_t`, `text_hidden`, `tokens`), batched."""
        return self.stage.sample(params, mesh, records["z_t"], records["text_hidden"], records["tokens"], rng,
                                 batch_size=self.config.eval.batch_size, guidance_scale=guidance_scale,
                                 best_of=best_of)

    def _load_split(self, split: str, num: int) -> dict[str, np.ndarray]:
        source = embedding_cache.CacheSource(self.cache_dir, split)
        records = [source[i] for i in range(min(num, len(source)))]
        out = {k: np.stack([np.asarray(r[k]) for r in records]) for k in CACHE_FIELDS}
        out["caption"] = np.array([str(r["caption"]) for r in records])
        return out

    def evaluate(self, params, mesh: Mesh) -> dict[str, float]:
        """Cosine of sampled z_i with the true image embedding, next to the two baselines.

        Baselines: z_t itself, and the training image embedding nearest to z_t. Retrieval: the
        sampled z_i picks the true image among `num_candidates` images of other captions.
        """
        ev = self.config.eval
        if not hasattr(self, "_eval_data"):  # Read once per run: the cache does not change.
            train = embedding_cache.CacheSource(self.cache_dir, "train")
            n = min(len(train), int(ev.num_train_neighbours))
            self._train_z_i = np.stack([np.asarray(train[i]["z_i"]) for i in range(n)])
            self._eval_data = {}
            for split in ev.splits:
                try:
                    self._eval_data[split] = self._load_split(split, int(ev.num_examples))
                except embedding_cache.CacheNotFoundError:
                    logging.info("No cached %r split: skipping its evaluation.", split)
        train_z_i = self._train_z_i
        results = {}
        for split, data in self._eval_data.items():
            z_i, z_t = data["z_i"], data["z_t"]
            sampled = self.sample_z_i(params, mesh, data, jax.random.key(int(ev.seed)))
            nearest = train_z_i[np.argmax(z_t @ train_z_i.T, axis=1)]
            for name, pred in (("prior", sampled), ("z_t", z_t), ("nearest_train_z_i", nearest)):
                results[f"eval/{split}/cosine_{name}"] = float(np.mean(np.sum(pred * z_i, -1)))
                results[f"eval/{split}/retrieval_top1_{name}"] = self.retrieval(pred, z_i, data["caption"])
        return results

    def retrieval(self, pred: np.ndarray, z_i: np.ndarray, captions: np.ndarray) -> float:
        """Top-1 of each prediction among its true image and distractor images of other captions."""
        captions = np.asarray(captions)
        return retrieval_lib.top1_among_distractors(pred @ z_i.T, np.arange(len(pred)),
                                                int(self.config.eval.num_candidates),
                                                allowed=captions[None, :] != captions[:, None])
