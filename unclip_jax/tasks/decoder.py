"""The unCLIP decoder: a GLIDE-style UNet generating images from CLIP image embeddings z_i.

Training reads images from the CLIP's data set and z_i + caption tokens from the embedding cache
(record i carries the index of its image). Conditioning (paper §2.1): z_i projected into the
timestep embedding and into 4 extra context tokens next to the decoder's own caption transformer;
z_i is replaced by a learned null 10% of the time and the caption 50% of the time (config fields)
for classifier-free guidance. Learned variance with the hybrid loss, as the paper, or fixed variance
(`diffusion.learned_variance=False`).

Evaluation decodes the TRUE z_i of validation images (the prior is not involved) and judges the
pixels with the shapes judge against the images' captions.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from unclip_jax import parallel
from unclip_jax.data import embedding_cache
from unclip_jax.data import pipeline as pipeline_lib
from unclip_jax.evaluation import shapes_judge
from unclip_jax.models import unet as unet_lib
from unclip_jax.tasks import embed
from unclip_jax.tasks import image_diffusion as diff_lib
from unclip_jax.tasks import prior as prior_task
from unclip_jax.tasks.base import Task


class CachedImageSource:
    """Random-access pairs of (image at `side` px, cached z_i and tokens): record i of the cache."""

    def __init__(self, cache: embedding_cache.CacheSource, images, side: int):
        self.cache, self.images, self.side = cache, images, int(side)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.cache[i]
        image, caption = pipeline_lib.decode_example(self.images[int(record["index"])], self.side)
        return {"image": image, "z_i": np.asarray(record["z_i"], np.float32),
                "tokens": np.asarray(record["tokens"], np.int32), "caption": caption}


class DecoderTask(Task):
    """Trains the decoder on (image, z_i, caption); evaluates decoded true z_i with the judge."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        super().__init__(config, workdir)
        self.clip = embed.cached_clip(config)
        self.side = int(config.model.image_size)
        self.model = unet_lib.unet_from_config(
            config.model, clip_dim=self.clip.embed_dim, text_length=self.clip.text_length,
            text_vocab_size=-(-self.clip.tokenizer.vocab_size // 128) * 128,
            learned_variance=bool(config.diffusion.learned_variance))
        self.schedule, self.sample_schedule = diff_lib.schedules(config.diffusion)
        self._samplers = {}

    def source(self, split: str) -> CachedImageSource:
        return CachedImageSource(embedding_cache.CacheSource(self.clip.cache_dir, split),
                                 pipeline_lib.make_source(self.clip.clip_config.data, split), self.side)

    def _conditioning(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        tokens = batch["tokens"]
        return {"z_i": batch["z_i"], "text_tokens": tokens,
                "text_mask": prior_task.text_mask(tokens, self.clip.tokenizer.eot_token_id)}

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        b, s, length = 1, self.side, self.clip.text_length
        no = jnp.zeros((b,), bool)
        return self.model.init(rng, jnp.zeros((b, s, s, 3)), jnp.zeros((b,), jnp.int32),
                               z_i=jnp.zeros((b, self.clip.embed_dim)),
                               text_tokens=jnp.zeros((b, length), jnp.int32),
                               text_mask=jnp.ones((b, length), bool), drop_z_i=no, drop_text=no)["params"]

    def loss_fn(self, params, batch, rng, step):
        diff = self.config.diffusion
        noise_rng, z_rng, text_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = diff_lib.to_model_range(batch["image"])
        x_t, t, noise = diff_lib.noised(self.schedule, x0, noise_rng)
        b = x0.shape[0]
        out = self.model.apply(
            {"params": params}, x_t, t, **self._conditioning(batch),
            drop_z_i=jax.random.bernoulli(z_rng, diff.z_i_drop_prob, (b,)),
            drop_text=jax.random.bernoulli(text_rng, diff.text_drop_prob, (b,)),
            train=bool(self.config.model.dropout), rngs={"dropout": dropout_rng})
        return diff_lib.diffusion_loss(diff, self.schedule, out, x0, x_t, t, noise)

    # ------------------------------------------------------------------ data
    def map_example(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: example[k] for k in ("image", "z_i", "tokens")}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        data = self.config.data
        return pipeline_lib.make_pipeline(
            self.source("train"), self.map_example, local_batch_size=local_batch_size,
            shuffle_seed=data.shuffle_seed, process_index=process_index, process_count=process_count,
            num_threads=data.num_threads)

    # ------------------------------------------------------------------ sampling
    def sample_fn(self, mesh: Mesh, guidance_scale: float):
        """Jitted `(params, z_i [B, D], tokens [B, L], rng) -> images in [-1, 1]` with guidance."""
        key = (mesh, float(guidance_scale))
        if key not in self._samplers:
            def sample(params, z_i, tokens, rng):
                cond = self._conditioning({"z_i": z_i, "tokens": tokens})
                b = z_i.shape[0]

                def model_fn(x, t):
                    return self.model.apply({"params": params}, x, t, **cond)

                def cond_uncond(x, t):
                    two = {k: jnp.concatenate([v, v]) for k, v in cond.items()}
                    drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
                    return self.model.apply({"params": params}, x, t, **two, drop_z_i=drop, drop_text=drop)

                return diff_lib.sample_images(self.config.diffusion, self.sample_schedule, model_fn,
                                              (b, self.side, self.side, 3), rng, guided_fn=cond_uncond,
                                              guidance_scale=guidance_scale)

            self._samplers[key] = jax.jit(sample, out_shardings=NamedSharding(mesh, jax.P()))
        return self._samplers[key]

    def decode(self, params, mesh: Mesh, z_i: np.ndarray, tokens: np.ndarray, rng: jax.Array,
               guidance_scale: float | None = None) -> np.ndarray:
        """Decodes unit z_i [N, D] (with caption tokens [N, L]) to uint8 images [N, side, side, 3]."""
        scale = self.config.diffusion.guidance_scale if guidance_scale is None else guidance_scale
        fn = self.sample_fn(mesh, scale)
        images = parallel.map_batches(lambda i, z, tok: fn(params, z, tok, jax.random.fold_in(rng, i)),
                                      [z_i, tokens], mesh, self.config.eval.batch_size)
        return diff_lib.to_uint8(images)

    # ------------------------------------------------------------------ evaluation
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


TASK = DecoderTask
