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
from unclip_jax.data import input_pipeline
from unclip_jax.diffusion import pixels, samplers
from unclip_jax.evaluation import shapes_judge
from unclip_jax.models import unet as unet_lib
from unclip_jax.data import embed
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
        image, caption = input_pipeline.decode_example(self.images[int(record["index"])], self.side)
        return {"image": image, "z_i": np.asarray(record["z_i"], np.float32),
                "tokens": np.asarray(record["tokens"], np.int32), "caption": caption}


GUIDANCE_DROPS = ("all", "z_i")  # What the unconditional half of guidance drops.


class DecoderTask(Task):
    """Trains the decoder on (image, z_i, caption); evaluates decoded true z_i with the judge."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        super().__init__(config, workdir)
        self.clip = embed.cached_clip(config)
        self._build(clip_dim=self.clip.embed_dim, text_length=self.clip.text_length,
                    vocab_size=self.clip.tokenizer.vocab_size,
                    eot_token_id=self.clip.tokenizer.eot_token_id)

    @classmethod
    def from_dims(cls, config: ml_collections.ConfigDict, workdir: str, *, clip_dim: int,
                  text_length: int, vocab_size: int, eot_token_id: int) -> "DecoderTask":
        """A task with given CLIP sizes and no CLIP or cache behind it (benchmarks; it cannot train)."""
        task = cls.__new__(cls)
        Task.__init__(task, config, workdir)
        task.clip = None
        task._build(clip_dim=clip_dim, text_length=text_length, vocab_size=vocab_size,
                    eot_token_id=eot_token_id)
        return task

    def _build(self, *, clip_dim: int, text_length: int, vocab_size: int, eot_token_id: int):
        config = self.config
        self.clip_dim, self.text_length, self.eot_token_id = clip_dim, text_length, eot_token_id
        self.side = int(config.model.image_size)
        self.model = unet_lib.unet_from_config(
            config.model, clip_dim=clip_dim, text_length=text_length,
            text_vocab_size=-(-vocab_size // 128) * 128,
            learned_variance=bool(config.diffusion.learned_variance))
        self.schedule, self.sample_schedule = diff_lib.schedules(config.diffusion)
        self._samplers = {}

    def source(self, split: str) -> CachedImageSource:
        return CachedImageSource(embedding_cache.CacheSource(self.clip.cache_dir, split),
                                 input_pipeline.make_source(self.clip.clip_config.data, split), self.side)

    def _conditioning(self, batch: Mapping[str, jax.Array], drop_z_i=None, drop_text=None):
        """The UNet's conditioning kwargs: z_i, and the caption unless the text pathway is off."""
        cond = {"z_i": batch["z_i"], "drop_z_i": drop_z_i}
        if self.model.uses_text:
            tokens = batch["tokens"]
            cond.update(text_tokens=tokens, text_mask=prior_task.text_mask(tokens, self.eot_token_id),
                        drop_text=drop_text)
        return cond

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        b, s, no = 1, self.side, jnp.zeros((1,), bool)
        batch = {"z_i": jnp.zeros((b, self.clip_dim)), "tokens": jnp.zeros((b, self.text_length), jnp.int32)}
        return self.model.init(rng, jnp.zeros((b, s, s, 3)), jnp.zeros((b,), jnp.int32),
                               **self._conditioning(batch, no, no))["params"]

    def loss_fn(self, params, batch, rng, step):
        diff = self.config.diffusion
        noise_rng, z_rng, text_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = pixels.to_model_range(batch["image"])
        x_t, t, noise = diff_lib.noised(self.schedule, x0, noise_rng)
        b = x0.shape[0]
        out = self.model.apply(
            {"params": params}, x_t, t,
            **self._conditioning(batch, jax.random.bernoulli(z_rng, diff.z_i_drop_prob, (b,)),
                                 jax.random.bernoulli(text_rng, diff.text_drop_prob, (b,))),
            train=bool(self.config.model.dropout), rngs={"dropout": dropout_rng})
        return diff_lib.diffusion_loss(diff, self.schedule, out, x0, x_t, t, noise)

    # ------------------------------------------------------------------ data
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, s = int(batch_size), self.side
        return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
                "z_i": jax.ShapeDtypeStruct((b, self.clip_dim), jnp.float32),
                "tokens": jax.ShapeDtypeStruct((b, self.text_length), jnp.int32)}

    def map_example(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: example[k] for k in ("image", "z_i", "tokens")}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        data = self.config.data
        return input_pipeline.make_pipeline(
            self.source("train"), self.map_example, local_batch_size=local_batch_size,
            shuffle_seed=data.shuffle_seed, process_index=process_index, process_count=process_count,
            num_threads=data.num_threads)

    # ------------------------------------------------------------------ sampling
    def sample_fn(self, mesh: Mesh, guidance_scale: float):
        """Jitted `(params, z_i [B, D], tokens [B, L], rng) -> images in [-1, 1]` with guidance."""
        key = (mesh, float(guidance_scale))
        if key not in self._samplers:
            body = self.sample_body(guidance_scale=guidance_scale)
            self._samplers[key] = jax.jit(body, out_shardings=NamedSharding(mesh, jax.P()))
        return self._samplers[key]

    def _schedule_for(self, steps) -> Any:
        return self.sample_schedule if steps is None else self.schedule.respace(steps)

    def guided_model_fn(self, params, z_i: jax.Array, tokens: jax.Array, guidance_scale: float, *,
                        drop_text: bool = False):
        """The model function `(x_t, t) -> output` the samplers call: guided when the scale is not 1.

        The conditional half sees z_i [B, D] and the caption tokens [B, L] (or the caption's learned
        null with `drop_text`, as for an image without a caption); the unconditional half sees
        neither (`diffusion.guidance_drops="all"`, the paper's) or only the caption (`"z_i"`: the
        guidance then pushes along z_i alone, with the caption held in both halves).
        """
        drops = self.config.diffusion.get("guidance_drops", "all")
        if drops not in GUIDANCE_DROPS:
            raise ValueError(f"diffusion.guidance_drops={drops!r}: expected one of {GUIDANCE_DROPS}")
        batch = {"z_i": z_i, "tokens": tokens}
        b = z_i.shape[0]
        text_off = jnp.full((b,), bool(drop_text))
        uncond_text_off = text_off if drops == "z_i" else jnp.ones((b,), bool)

        def model_fn(x, t):
            return self.model.apply({"params": params}, x, t,
                                    **self._conditioning(batch, None, text_off if drop_text else None))

        if guidance_scale == 1:
            return model_fn

        def cond_uncond(x, t):
            two = {k: jnp.concatenate([v, v]) for k, v in batch.items()}
            drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
            return self.model.apply({"params": params}, x, t,
                                    **self._conditioning(two, drop,
                                                         jnp.concatenate([text_off, uncond_text_off])))

        return samplers.guided(cond_uncond, guidance_scale,
                               learned_variance=bool(self.config.diffusion.learned_variance))

    def sample_body(self, *, guidance_scale: float, sampler: str | None = None, steps=None,
                    eta: float | None = None, drop_text: bool = False):
        """The un-jitted sampler `(params, z_i [B, D], tokens [B, L], rng, x_T=None) -> x_0`.

        x_0: float32 [B, side, side, 3] in [-1, 1]. `sampler`, `steps` (a respacing spec) and
        `eta` (DDIM only) default to the config's; `x_T` [B, side, side, 3] replaces the drawn noise;
        `drop_text` conditions on z_i alone (see `guided_model_fn`).
        """
        diff = self.config.diffusion
        name = sampler or diff.sampler
        schedule = self._schedule_for(steps)
        extra = {"eta": float(diff.get("eta", 0.0) if eta is None else eta)} if name == "ddim" else {}

        def sample(params, z_i, tokens, rng, x_T=None):
            model_fn = self.guided_model_fn(params, z_i, tokens, guidance_scale, drop_text=drop_text)
            b = z_i.shape[0]
            return diff_lib.sample_images(diff, schedule, model_fn, (b, self.side, self.side, 3), rng,
                                          sampler=name, x_T=x_T, **extra)

        return sample

    def invert_body(self, *, guidance_scale: float = 1.0, steps=None, num_fixed_point_iters: int = 0,
                    drop_text: bool = False):
        """Un-jitted DDIM inversion `(params, x_0 [B, side, side, 3] in [-1, 1], z_i, tokens) -> x_T`.

        Inverts with the same (guided) model and step schedule that DDIM sampling with these
        settings uses, so DDIM at eta = 0 from the returned x_T reconstructs x_0 (exactly as
        `num_fixed_point_iters` grows; see `samplers.ddim_invert`).
        """
        diff = self.config.diffusion
        schedule = self._schedule_for(steps)

        def invert(params, x0, z_i, tokens):
            model_fn = self.guided_model_fn(params, z_i, tokens, guidance_scale, drop_text=drop_text)
            return samplers.ddim_invert(model_fn, schedule, x0, param=diff.param, clip_x0=1.0,
                                        learned_variance=bool(diff.learned_variance),
                                        num_fixed_point_iters=num_fixed_point_iters)

        return invert

    def decode(self, params, mesh: Mesh, z_i: np.ndarray, tokens: np.ndarray, rng: jax.Array,
               guidance_scale: float | None = None) -> np.ndarray:
        """Decodes unit z_i [N, D] (with caption tokens [N, L]) to uint8 images [N, side, side, 3]."""
        scale = self.config.diffusion.guidance_scale if guidance_scale is None else guidance_scale
        fn = self.sample_fn(mesh, scale)
        images = parallel.map_batches(lambda i, z, tok: fn(params, z, tok, jax.random.fold_in(rng, i)),
                                      [z_i, tokens], mesh, self.config.eval.batch_size)
        return np.asarray(pixels.to_uint8(images))

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
