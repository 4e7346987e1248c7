"""The unCLIP diffusion prior: caption -> CLIP image embedding z_i (model, loss, samplers).

Training (paper §2.2, App. C): embeddings are unit CLIP vectors multiplied by `embedding_scale`
(default sqrt(D): unit variance per dimension, the role of the paper's 17.2 for its 1024-d ViT-H);
x_t = q_sample(scale * z_i, t, noise) on a cosine schedule of 1000 steps; the model predicts the
clean scaled z_i with an MSE loss; the text conditioning (caption tokens and z_t) is replaced by
learned null embeddings 10% of the time for classifier-free guidance.

Sampling: strided steps (64), DDPM ancestral with the fixed small (posterior) variance by default
(the paper uses Analytic-DPM; Karlo uses the same fixed small variance), optional guidance, and the
paper's best-of-2: two z_i per caption, keeping the one with the higher dot product with z_t.

Karlo mode (`diffusion.sampler = "karlo"`, see `image_diffusion.is_karlo`): the prior samples as
diffusers' `UnCLIPPipeline` samples Kakao Brain's Karlo prior (imported by
`unclip_jax.convert.karlo_prior`; its `model` block has `null_conditioning=False` and
`embedding_stats=True`, both required). `sample_body` then returns
`(params, z_t, text_hidden, text_mask, uncond_z_t, uncond_hidden, uncond_mask, rng, x_T=None,
step_noise=None) -> z_i [B, D]`:
- z_t [B, D]: the CLIP text encoder's projected, UNnormalised `text_embeds`; text_hidden
  [B, L, W]: its `last_hidden_state`; text_mask bool [B, L]: the tokenizer's attention mask. The
  `uncond_*` three are the same for the empty caption "" (batch B, or 1: broadcast), the input of
  guidance's unconditional half (Karlo has no learned nulls).
- guidance uncond + s (cond - uncond) on the predicted x0 (`guidance_scale`; Karlo: 4.0; a scale
  of 1 runs the conditional half alone), `unclip.KARLO_PRIOR` sampling (25 steps by default,
  x0 prediction clipped to 5, fixed small variance): no sqrt(D) scaling of z_t or of the sample.
- the final sample goes through `denormalize_embedding` (x * clip_std + clip_mean, the pipeline's
  `post_process_latents`) and is returned as is: no unit normalisation (the pipeline passes it to
  the decoder unnormalised). best-of-k (scores against z_t) only when best_of > 1 (Karlo: 1).
- x_T [B * best_of, D] and step_noise [steps - 1, B * best_of, D] replace the drawn noise (rng
  may then be None), as `samplers.ddpm_sample`.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.diffusion import gaussian, samplers
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import prior as prior_lib
from unclip_jax.models.layers import text_mask
from unclip_jax.stages import image_diffusion as diff_lib


def best_of_k(z_i: jax.Array, z_t: jax.Array) -> jax.Array:
    """The paper's best-of-k: per caption, the candidate with the highest dot product with z_t.

    z_i: candidates [B, k, D]; z_t: [B, D]. Returns [B, D].
    """
    scores = jnp.einsum("bkd,bd->bk", z_i, z_t)
    return jnp.take_along_axis(z_i, jnp.argmax(scores, axis=1)[:, None, None], axis=1)[:, 0]


class PriorStage:
    """The prior of a stage config (`model`, `diffusion`) over a CLIP of the given sizes.

    Sizes: embed_dim (D), text_length (L, the CLIP's context), text_width (W, its text tower's
    width) and eot_token_id (the tokenizer's end of text, which ends each caption's mask).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, embed_dim: int, text_length: int,
                 text_width: int, eot_token_id: int):
        self.config = config
        self.sizes = {"embed_dim": int(embed_dim), "text_length": int(text_length),
                      "text_width": int(text_width), "eot_token_id": int(eot_token_id)}
        self.embed_dim, self.text_length, self.text_width = int(embed_dim), int(text_length), int(text_width)
        self.eot_token_id = int(eot_token_id)
        diff = config.diffusion
        self.karlo = diff_lib.is_karlo(diff)
        self.model = prior_lib.prior_from_config(config.model, embed_dim=self.embed_dim,
                                                 text_width=self.text_width, text_length=self.text_length)
        if self.karlo:  # See the module docstring: the converter's model options, Karlo's schedule.
            if self.model.null_conditioning or not self.model.embedding_stats:
                raise ValueError("Karlo mode (diffusion.sampler='karlo') needs the Karlo prior's "
                                 "model options null_conditioning=False and embedding_stats=True "
                                 "(convert.karlo_prior.prior_config)")
            karlo = diff_lib.karlo_sampling("prior", diff)
            self.scale = 1.0
            self.schedule = Schedule.named(karlo.noise_schedule, karlo.num_train_timesteps)
            self.sample_schedule = karlo.schedule()
        else:
            self.scale = float(diff.embedding_scale) if diff.embedding_scale else math.sqrt(embed_dim)
            self.schedule = Schedule.named(diff.schedule, int(diff.num_timesteps))
            self.sample_schedule = self.schedule.respace(diff.sample_steps)
        self._jitted = parallel.JitCache()

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        """The model's params (boxed with logical axis names). Runs under eval_shape and jit."""
        b, d, length, w = 1, self.embed_dim, self.text_length, self.text_width
        return self.model.init(rng, jnp.zeros((b, d)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, d)),
                               jnp.zeros((b, length, w)), jnp.ones((b, length), bool))["params"]

    def loss(self, params, batch: Mapping[str, jax.Array], rng: jax.Array):
        """MSE to the clean scaled z_i of a batch of `z_i`, `z_t`, `text_hidden`, `tokens`."""
        if self.karlo:
            raise ValueError("the prior is in Karlo mode (diffusion.sampler='karlo'): sampling "
                             "imported weights only, no training loss")
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

    # ------------------------------------------------------------------ sampling
    def sample_body(self, *, guidance_scale: float, best_of: int, sampler: str, steps=None):
        """The un-jitted sampler `(params, z_t [B, D], text_hidden [B, L, W], tokens [B, L], rng) -> z_i`.

        z_i: unit vectors [B, D], the best of `best_of` candidates per caption. `steps` (a
        respacing spec of the training schedule) defaults to the config's `sample_steps`.
        In Karlo mode: the sampler of the module docstring (`sampler` None or "karlo"; `steps` a
        number of inference steps).
        """
        if self.karlo:
            diff_lib.check_karlo_sampler("prior", sampler)
            return self._karlo_sample_body(guidance_scale=guidance_scale, best_of=best_of, steps=steps)
        eot = self.eot_token_id
        schedule = self.sample_schedule if steps is None else self.schedule.respace(steps)
        model = self.model

        def sample(params, z_t, text_hidden, tokens, rng):
            b = z_t.shape[0]
            rep = lambda x: jnp.repeat(x, best_of, axis=0)  # noqa: E731  [B*k, ...], k per caption.
            z_t_s, hidden, mask = rep(z_t * self.scale), rep(text_hidden.astype(jnp.float32)), rep(text_mask(tokens, eot))
            n = b * best_of
            apply = lambda method, *args: model.apply({"params": params}, *args, method=method)  # noqa: E731
            # The caption's positions are encoded once (a KV cache): each step runs 3 positions.
            if guidance_scale == 1:
                prefix = apply(model.encode_prefix, z_t_s, hidden, mask)

                def model_fn(x, t):
                    return apply(model.denoise, prefix, x, t)
            else:
                two = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
                drop = jnp.concatenate([jnp.zeros((n,), bool), jnp.ones((n,), bool)])
                prefix = apply(model.encode_prefix, two(z_t_s), two(hidden), two(mask), drop)
                model_fn = samplers.guided(lambda x, t: apply(model.denoise, prefix, x, t), guidance_scale)
            x0 = samplers.sample(sampler, model_fn, schedule, (n, self.embed_dim), rng,
                                 param="x0", clip_x0=None)
            z = x0 / jnp.linalg.norm(x0, axis=-1, keepdims=True)
            return best_of_k(z.reshape(b, best_of, -1), z_t)

        return sample

    def _karlo_sample_body(self, *, guidance_scale: float, best_of: int, steps=None):
        """Karlo mode's sampler (see the module docstring)."""
        karlo = diff_lib.karlo_sampling("prior", self.config.diffusion, steps)
        schedule = karlo.schedule()
        model, d = self.model, self.embed_dim

        def sample(params, z_t, text_hidden, text_mask, uncond_z_t, uncond_hidden, uncond_mask, rng,
                   x_T=None, step_noise=None):
            b = z_t.shape[0]
            text = (jnp.asarray(z_t, jnp.float32), jnp.asarray(text_hidden, jnp.float32),
                    jnp.asarray(text_mask, bool))
            uncond = tuple(jnp.broadcast_to(jnp.asarray(u, c.dtype), c.shape)
                           for u, c in zip((uncond_z_t, uncond_hidden, uncond_mask), text))
            rep = lambda x: jnp.repeat(x, best_of, axis=0)  # noqa: E731  [B*k, ...], k per caption.
            apply = lambda method, *args: model.apply({"params": params}, *args, method=method)  # noqa: E731
            if guidance_scale == 1:
                prefix = apply(model.encode_prefix, *map(rep, text))

                def model_fn(x, t):
                    return apply(model.denoise, prefix, x, t)
            else:  # Conditional half first (`samplers.guided`); the empty caption's second.
                prefix = apply(model.encode_prefix,
                               *(jnp.concatenate([rep(c), rep(u)]) for c, u in zip(text, uncond)))
                model_fn = samplers.guided(lambda x, t: apply(model.denoise, prefix, x, t),
                                           guidance_scale)
            x0 = karlo.sample(model_fn, (b * best_of, d), rng, x_T=x_T, step_noise=step_noise,
                              schedule=schedule)
            z_i = apply(model.denormalize_embedding, x0)
            if best_of == 1:
                return z_i
            return best_of_k(z_i.reshape(b, best_of, -1), text[0])

        return sample

    def sample(self, params, mesh: Mesh, z_t: np.ndarray, text_hidden: np.ndarray, tokens: np.ndarray,
               rng: jax.Array, *, batch_size: int = 64, guidance_scale: float | None = None,
               best_of: int | None = None) -> np.ndarray:
        """Unit z_i [N, D] for captions (z_t [N, D], text_hidden [N, L, W], tokens [N, L]), batched
        over the mesh; unset settings take the config's."""
        if self.karlo:
            raise ValueError("the prior is in Karlo mode: call sample_body (it takes the CLIP text "
                             "encodings of the captions and of the empty caption)")
        diff = self.config.diffusion
        scale = float(diff.guidance_scale if guidance_scale is None else guidance_scale)
        k = int(diff.best_of if best_of is None else best_of)
        fn = self._jitted(mesh, ("sample", scale, k, diff.sampler),
                          lambda: self.sample_body(guidance_scale=scale, best_of=k, sampler=diff.sampler))
        return parallel.map_batches(lambda i, *chunk: fn(params, *chunk, jax.random.fold_in(rng, i)),
                                    [z_t, text_hidden, tokens], mesh, batch_size)
