"""The unCLIP diffusion prior: caption -> CLIP image embedding, trained on the CLIP embedding cache.

Training (paper §2.2, App. C): embeddings are unit CLIP vectors multiplied by `embedding_scale`
(default sqrt(D): unit variance per dimension, the role of the paper's 17.2 for its 1024-d ViT-H);
x_t = q_sample(scale * z_i, t, noise) on a cosine schedule of 1000 steps; the model predicts the
clean scaled z_i with an MSE loss; the text conditioning (caption tokens and z_t) is replaced by
learned null embeddings 10% of the time for classifier-free guidance.

Sampling: strided steps (64), DDPM ancestral with the fixed small (posterior) variance by default
(the paper uses Analytic-DPM; Karlo uses the same fixed small variance), optional guidance, and the
paper's best-of-2: two z_i per caption, keeping the one with the higher dot product with z_t.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding

from unclip_jax import parallel
from unclip_jax.data import embedding_cache
from unclip_jax.data import input_pipeline
from unclip_jax.diffusion import gaussian, samplers
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import prior as prior_lib
from unclip_jax.data import embed
from unclip_jax.tasks.base import Task

CACHE_FIELDS = ("z_i", "z_t", "text_hidden", "tokens")


def text_mask(tokens: jax.Array, eot_token_id: int) -> jax.Array:
    """True for the caption's tokens up to and including its first EOT: bool [B, L]."""
    is_eot = tokens == eot_token_id
    seen_before = jnp.cumsum(is_eot, axis=-1) - is_eot
    return seen_before == 0


def best_of_k(z_i: jax.Array, z_t: jax.Array) -> jax.Array:
    """The paper's best-of-k: per caption, the candidate with the highest dot product with z_t.

    z_i: candidates [B, k, D]; z_t: [B, D]. Returns [B, D].
    """
    scores = jnp.einsum("bkd,bd->bk", z_i, z_t)
    return jnp.take_along_axis(z_i, jnp.argmax(scores, axis=1)[:, None, None], axis=1)[:, 0]


class PriorTask(Task):
    """Trains the diffusion prior; evaluates sampled z_i against the true image embeddings."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        super().__init__(config, workdir)
        clip = embed.cached_clip(config)
        self.cache_dir = clip.cache_dir
        self._build(embed_dim=clip.embed_dim, text_length=clip.text_length, text_width=clip.text_width,
                    eot_token_id=clip.tokenizer.eot_token_id)

    @classmethod
    def from_dims(cls, config: ml_collections.ConfigDict, workdir: str, *, embed_dim: int,
                  text_length: int, text_width: int, eot_token_id: int) -> "PriorTask":
        """A task with given CLIP sizes and no CLIP or cache behind it (benchmarks; it cannot train)."""
        task = cls.__new__(cls)
        Task.__init__(task, config, workdir)
        task.cache_dir = None
        task._build(embed_dim=embed_dim, text_length=text_length, text_width=text_width,
                    eot_token_id=eot_token_id)
        return task

    def _build(self, *, embed_dim: int, text_length: int, text_width: int, eot_token_id: int):
        config, diff = self.config, self.config.diffusion
        self.embed_dim, self.text_length, self.text_width = embed_dim, text_length, text_width
        self.eot_token_id = eot_token_id
        self.scale = float(diff.embedding_scale) if diff.embedding_scale else math.sqrt(embed_dim)
        self.model = prior_lib.prior_from_config(config.model, embed_dim=embed_dim,
                                                 text_width=text_width, text_length=text_length)
        self.schedule = Schedule.named(diff.schedule, int(diff.num_timesteps))
        self.sample_schedule = self.schedule.respace(diff.sample_steps)
        self._samplers = {}

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        b, d, length, w = 1, self.embed_dim, self.text_length, self.text_width
        return self.model.init(rng, jnp.zeros((b, d)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, d)),
                               jnp.zeros((b, length, w)), jnp.ones((b, length), bool))["params"]

    def loss_fn(self, params, batch, rng, step):
        z_i = batch["z_i"] * self.scale
        z_t = batch["z_t"] * self.scale
        b = z_i.shape[0]
        t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        t = jax.random.randint(t_rng, (b,), 0, self.schedule.num_steps)
        noise = jax.random.normal(noise_rng, z_i.shape, jnp.float32)
        x_t = gaussian.q_sample(self.schedule, z_i, t, noise)
        drop = jax.random.bernoulli(drop_rng, self.config.diffusion.text_drop_prob, (b,))
        pred = self.model.apply({"params": params}, x_t, t, z_t, batch["text_hidden"].astype(jnp.float32),
                                text_mask(batch["tokens"], self.eot_token_id), drop)
        loss = jnp.mean(jnp.square(pred - z_i))
        cos = jnp.sum(pred * z_i, -1) / (jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(z_i, axis=-1) + 1e-6)
        return loss, {"cosine_to_target": cos.mean()}

    # ------------------------------------------------------------------ data
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, d, length = int(batch_size), self.embed_dim, self.text_length
        return {"z_i": jax.ShapeDtypeStruct((b, d), jnp.float32),
                "z_t": jax.ShapeDtypeStruct((b, d), jnp.float32),
                # The cache stores the text hidden states in float16 (half the disk and host memory).
                "text_hidden": jax.ShapeDtypeStruct((b, length, self.text_width), jnp.float16),
                "tokens": jax.ShapeDtypeStruct((b, length), jnp.int32)}

    def map_record(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: np.asarray(record[k]) for k in CACHE_FIELDS}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        return input_pipeline.make_pipeline(
            embedding_cache.CacheSource(self.cache_dir, "train"), self.map_record,
            local_batch_size=local_batch_size, shuffle_seed=self.config.data.shuffle_seed,
            process_index=process_index, process_count=process_count,
            num_threads=self.config.data.num_threads)

    # ------------------------------------------------------------------ sampling
    def sample_fn(self, mesh: Mesh, *, guidance_scale: float, best_of: int, sampler: str):
        """A jitted `(params, z_t, text_hidden, tokens, rng) -> z_i` (unit vectors [B, D])."""
        key = (mesh, float(guidance_scale), int(best_of), sampler)
        if key not in self._samplers:
            body = self.sample_body(guidance_scale=guidance_scale, best_of=best_of, sampler=sampler)
            self._samplers[key] = jax.jit(body, out_shardings=NamedSharding(mesh, jax.P()))
        return self._samplers[key]

    def sample_body(self, *, guidance_scale: float, best_of: int, sampler: str, steps=None):
        """The un-jitted sampler `(params, z_t [B, D], text_hidden [B, L, W], tokens [B, L], rng) -> z_i`.

        z_i: unit vectors [B, D], the best of `best_of` candidates per caption. `steps` (a
        respacing spec of the training schedule) defaults to the config's `sample_steps`.
        """
        eot = self.eot_token_id
        schedule = self.sample_schedule if steps is None else self.schedule.respace(steps)

        def sample(params, z_t, text_hidden, tokens, rng):
            b = z_t.shape[0]
            rep = lambda x: jnp.repeat(x, best_of, axis=0)  # noqa: E731  [B*k, ...], k per caption.
            z_t_s, hidden, mask = rep(z_t * self.scale), rep(text_hidden.astype(jnp.float32)), rep(text_mask(tokens, eot))
            n = b * best_of
            apply = lambda method, *args: self.model.apply({"params": params}, *args, method=method)  # noqa: E731
            # The caption's positions are encoded once (a KV cache): each step runs 3 positions.
            if guidance_scale == 1:
                prefix = apply(self.model.encode_prefix, z_t_s, hidden, mask)

                def model_fn(x, t):
                    return apply(self.model.denoise, prefix, x, t)
            else:
                two = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
                drop = jnp.concatenate([jnp.zeros((n,), bool), jnp.ones((n,), bool)])
                prefix = apply(self.model.encode_prefix, two(z_t_s), two(hidden), two(mask), drop)
                model_fn = samplers.guided(lambda x, t: apply(self.model.denoise, prefix, x, t),
                                           guidance_scale)
            x0 = samplers.sample(sampler, model_fn, schedule, (n, self.embed_dim), rng,
                                 param="x0", clip_x0=None)
            z = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
            return best_of_k(z.reshape(b, best_of, -1), z_t)

        return sample

    def sample_z_i(self, params, mesh: Mesh, records: Mapping[str, np.ndarray], rng: jax.Array, *,
                   guidance_scale: float | None = None, best_of: int | None = None) -> np.ndarray:
        """Samples unit z_i [N, D] for cached captions (`z_t`, `text_hidden`, `tokens`), batched."""
        diff = self.config.diffusion
        fn = self.sample_fn(mesh, guidance_scale=diff.guidance_scale if guidance_scale is None else guidance_scale,
                            best_of=diff.best_of if best_of is None else best_of, sampler=diff.sampler)
        arrays = [records[k] for k in ("z_t", "text_hidden", "tokens")]
        return parallel.map_batches(lambda i, *chunk: fn(params, *chunk, jax.random.fold_in(rng, i)),
                                    arrays, mesh, self.config.eval.batch_size)

    # ------------------------------------------------------------------ evaluation
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
        train = embedding_cache.CacheSource(self.cache_dir, "train")
        train_z_i = np.stack([np.asarray(train[i]["z_i"]) for i in range(min(len(train), int(ev.num_train_neighbours)))])
        results = {}
        for split in ev.splits:
            try:
                data = self._load_split(split, int(ev.num_examples))
            except embedding_cache.CacheNotFoundError:
                logging.info("No cached %r split: skipping its evaluation.", split)
                continue
            z_i, z_t = data["z_i"], data["z_t"]
            sampled = self.sample_z_i(params, mesh, data, jax.random.key(int(ev.seed)))
            nearest = train_z_i[np.argmax(z_t @ train_z_i.T, axis=1)]
            for name, pred in (("prior", sampled), ("z_t", z_t), ("nearest_train_z_i", nearest)):
                results[f"eval/{split}/cosine_{name}"] = float(np.mean(np.sum(pred * z_i, -1)))
                results[f"eval/{split}/retrieval_top1_{name}"] = self.retrieval(pred, z_i, data["caption"])
        return results

    def retrieval(self, pred: np.ndarray, z_i: np.ndarray, captions: np.ndarray) -> float:
        """Top-1 of each prediction among its true image and distractor images of other captions."""
        k = int(self.config.eval.num_candidates)
        rng = np.random.default_rng(0)
        scores = pred @ z_i.T
        correct = 0
        for n in range(len(pred)):
            others = np.flatnonzero(captions != captions[n])
            if len(others) == 0:
                correct += 1
                continue
            picks = rng.choice(others, size=min(k - 1, len(others)), replace=False)
            correct += scores[n, n] > scores[n, picks].max()
        return float(correct / len(pred))
