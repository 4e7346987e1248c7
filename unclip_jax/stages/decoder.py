"""The unCLIP decoder: a GLIDE-style UNet generating images from CLIP image embeddings z_i.

Conditioning (paper §2.1): z_i projected into the timestep embedding and into 4 extra context
tokens next to the decoder's own caption transformer; z_i is replaced by a learned null 10% of the
time and the caption 50% of the time (config fields) for classifier-free guidance. Learned variance
with the hybrid loss, as the paper, or fixed variance (`diffusion.learned_variance=False`).

Karlo mode (`diffusion.sampler = "karlo"`, see `image_diffusion.is_karlo`): the decoder samples as
diffusers' `UnCLIPPipeline` samples Kakao Brain's Karlo decoder (imported by
`unclip_jax.convert.karlo_unet.decoder_config` / `convert_decoder`: CLIP-text conditioning,
`clip_text_width > 0`, required; learned variance). `sample_body` then returns
`(params, z_i, z_t, text_hidden, text_mask, uncond_z_t, uncond_hidden, uncond_mask, rng,
x_T=None, step_noise=None) -> x_0 float32 [B, side, side, 3] in [-1, 1]`:
- z_i [B, D]: the prior's output as the pipeline passes it (denormalised, not unit); z_t [B, D],
  text_hidden [B, L, W], text_mask bool [B, L]: the caption's CLIP text encodings (unnormalised
  `text_embeds`, `last_hidden_state`, the tokenizer's attention mask); `uncond_*`: the same for the
  empty caption "" (batch B or 1).
- guidance over the doubled batch: the conditional half sees (z_i, caption), the unconditional
  half the learned guidance embedding (`drop_z_i`) and the empty caption; uncond + s (cond - uncond)
  on the eps channels with the conditional half's variance (`guidance_scale`; Karlo: 8.0; 1 runs
  the conditional half alone).
- `unclip.KARLO_DECODER` sampling (25 steps by default; eps, learned range unclipped, x0 clipped to
  1) and the pipeline's final clamp to [-1, 1]. x_T / step_noise replace the drawn noise.
- `sampler="ddim"` (not Karlo's; for the manipulations): DDIM at `eta` over the same respaced
  steps and guided model, `(params, z_i, <the six text arrays>, rng, x_T=None) -> x_0`; and
  `invert_body` its inversion, `(params, x_0, z_i, <the six text arrays>) -> x_T`.
`karlo_model_fn` is the (guided) model function of this mode; `karlo_decode` samples host arrays
in batches. Training (`loss`, fine-tuning the imported decoder) takes a batch of uint8 `image`
and the four encodings above of its captions, and `empty_caption`, the empty caption's three
(`karlo_conditioning`): the hybrid loss on Karlo's schedule (eps, learned range), z_i replaced by
the learned guidance embedding with `diffusion.z_i_drop_prob` and the caption by the empty one with
`diffusion.text_drop_prob`, so that training drops exactly what guidance's unconditional half
drops. The token-based `guided_model_fn` / `decode` are not supported in this mode.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.diffusion import pixels, samplers
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import unet as unet_lib
from unclip_jax.models.layers import text_mask
from unclip_jax.stages import image_diffusion as diff_lib

GUIDANCE_DROPS = ("all", "z_i")  # What the unconditional half of guidance drops.


class DecoderStage:
    """The decoder of a stage config (`model`, `diffusion`) over a CLIP of the given sizes.

    Sizes: clip_dim (D of z_i), text_length (L, the CLIP's context), vocab_size and eot_token_id
    of the CLIP's tokenizer (the decoder's own caption transformer reads the same tokens).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, clip_dim: int, text_length: int,
                 vocab_size: int, eot_token_id: int):
        self.config = config
        self.sizes = {"clip_dim": int(clip_dim), "text_length": int(text_length),
                      "vocab_size": int(vocab_size), "eot_token_id": int(eot_token_id)}
        self.clip_dim, self.text_length, self.eot_token_id = int(clip_dim), int(text_length), int(eot_token_id)
        self.side = int(config.model.image_size)
        self.model = unet_lib.unet_from_config(
            config.model, clip_dim=self.clip_dim, text_length=self.text_length,
            text_vocab_size=-(-int(vocab_size) // 128) * 128,
            learned_variance=bool(config.diffusion.learned_variance))
        self.karlo = diff_lib.is_karlo(config.diffusion)
        if self.karlo:  # See the module docstring: the converter's model options, Karlo's schedule.
            if not self.model.uses_clip_text:
                raise ValueError("Karlo mode (diffusion.sampler='karlo') needs the Karlo decoder's "
                                 "CLIP-text conditioning: model.clip_text_width > 0 "
                                 "(convert.karlo_unet.decoder_config)")
            karlo = diff_lib.karlo_sampling("decoder", config.diffusion)
            self.schedule = Schedule.named(karlo.noise_schedule, karlo.num_train_timesteps)
            self.sample_schedule = karlo.schedule()
        else:
            self.schedule, self.sample_schedule = diff_lib.schedules(config.diffusion)
        self._jitted = parallel.JitCache()

    def _refuse_karlo(self, what: str) -> None:
        if self.karlo:
            raise ValueError(f"the decoder is in Karlo mode (diffusion.sampler='karlo'): {what} is "
                             "not supported (sample_body and karlo_model_fn are)")

    def _conditioning(self, batch: Mapping[str, jax.Array], drop_z_i=None, drop_text=None):
        """The UNet's conditioning kwargs: z_i, and the caption unless the text pathway is off."""
        cond = {"z_i": batch["z_i"], "drop_z_i": drop_z_i}
        if self.model.uses_text:
            tokens = batch["tokens"]
            cond.update(text_tokens=tokens, text_mask=text_mask(tokens, self.eot_token_id),
                        drop_text=drop_text)
        if self.model.uses_clip_text:  # Karlo: the CLIP text encodings (no learned null caption)
            cond.update(z_t=batch["z_t"], text_hidden=batch["text_hidden"],
                        text_mask=batch["text_mask"])
        return cond

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        """The model's params (boxed with logical axis names). Runs under eval_shape and jit."""
        b, s, no = 1, self.side, jnp.zeros((1,), bool)
        batch = {"z_i": jnp.zeros((b, self.clip_dim)), "tokens": jnp.zeros((b, self.text_length), jnp.int32)}
        if self.model.uses_clip_text:
            batch.update(z_t=jnp.zeros((b, self.clip_dim)),
                         text_hidden=jnp.zeros((b, self.text_length, self.model.clip_text_width)),
                         text_mask=jnp.ones((b, self.text_length), bool))
            return self.model.init(rng, jnp.zeros((b, s, s, self.model.image_channels)),
                                   jnp.zeros((b,), jnp.int32), **self._conditioning(batch, no))["params"]
        return self.model.init(rng, jnp.zeros((b, s, s, 3)), jnp.zeros((b,), jnp.int32),
                               **self._conditioning(batch, no, no))["params"]

    def loss(self, params, batch: Mapping[str, jax.Array], rng: jax.Array, empty_caption=None):
        """The diffusion loss of a batch of uint8 `image`, `z_i` and caption `tokens`.

        Karlo mode: `z_i`, `z_t`, `text_hidden`, `text_mask` in place of the tokens, and
        `empty_caption` = (z_t [1, D], hidden [1, L, W], mask [1, L]) of "" (module docstring).
        """
        if self.karlo and empty_caption is None:
            raise ValueError("Karlo-mode training needs the empty caption's encodings (empty_caption)")
        diff = self.config.diffusion
        noise_rng, z_rng, text_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = pixels.to_model_range(batch["image"])
        x_t, t, noise = diff_lib.noised(self.schedule, x0, noise_rng, self.config.diffusion)
        b = x0.shape[0]
        drop_z_i = jax.random.bernoulli(z_rng, diff.z_i_drop_prob, (b,))
        drop_text = jax.random.bernoulli(text_rng, diff.text_drop_prob, (b,))
        if self.karlo:
            cond = self.karlo_conditioning(batch, drop_z_i, drop_text, empty_caption)
            # Karlo's loss settings (eps, learned range) whatever the stored block spells out.
            karlo = diff_lib.karlo_sampling("decoder", diff)
            diff = ml_collections.ConfigDict({**diff.to_dict(), "param": karlo.param,
                                              "learned_variance": karlo.learned_variance})
        else:
            cond = self._conditioning(batch, drop_z_i, drop_text)
        out = self.model.apply({"params": params}, x_t, t, **cond,
                               train=bool(self.config.model.get("dropout", 0.0)), rngs={"dropout": dropout_rng})
        return diff_lib.diffusion_loss(diff, self.schedule, out, x0, x_t, t, noise)

    def karlo_conditioning(self, batch: Mapping[str, jax.Array], drop_z_i: jax.Array, drop_text: jax.Array,
                           empty_caption) -> dict[str, jax.Array]:
        """Karlo mode's training conditioning: the UNet kwargs of a batch (`z_i`, `z_t`,
        `text_hidden`, `text_mask`) with z_i replaced by the learned guidance embedding where
        `drop_z_i` [B] and the caption by `empty_caption` (z_t [1, D], hidden [1, L, W], mask
        [1, L]) where `drop_text` [B]: a kept row is what `karlo_model_fn`'s conditional half
        sees, a row with both dropped what its unconditional half sees."""
        names = ("z_t", "text_hidden", "text_mask")
        dtypes = (jnp.float32, jnp.float32, bool)
        text = {}
        for name, empty, dtype in zip(names, empty_caption, dtypes):
            value = jnp.asarray(batch[name], dtype)
            empty = jnp.broadcast_to(jnp.asarray(empty, dtype), value.shape)
            drop = drop_text.astype(bool).reshape((-1,) + (1,) * (value.ndim - 1))
            text[name] = jnp.where(drop, empty, value)
        return self._conditioning({"z_i": jnp.asarray(batch["z_i"], jnp.float32), **text},
                                  drop_z_i.astype(bool))

    # ------------------------------------------------------------------ sampling
    def schedule_for(self, steps) -> Any:
        """The sampling schedule: the config's `sample_steps`, or the respacing spec `steps`."""
        return self.sample_schedule if steps is None else self.schedule.respace(steps)

    def guided_model_fn(self, params, z_i: jax.Array, tokens: jax.Array, guidance_scale: float, *,
                        drop_text: bool = False):
        """The model function `(x_t, t) -> output` the samplers call: guided when the scale is not 1.

        The conditional half sees z_i [B, D] and the caption tokens [B, L] (or the caption's learned
        null with `drop_text`, as for an image without a caption); the unconditional half sees
        neither (`diffusion.guidance_drops="all"`, the paper's) or only the caption (`"z_i"`: the
        guidance then pushes along z_i alone, with the caption held in both halves).
        """
        self._refuse_karlo("guided_model_fn (caption tokens)")
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
        In Karlo mode: the sampler of the module docstring (`sampler` None or "karlo", `steps` a
        number of inference steps; `eta` and `drop_text` are not used).
        """
        if self.karlo:
            diff_lib.check_karlo_sampler("decoder", sampler, also=("ddim",))
            return self._karlo_sample_body(guidance_scale=guidance_scale, steps=steps,
                                           ddim_eta=None if sampler != "ddim" else float(eta or 0.0))
        diff = self.config.diffusion
        name = sampler or diff.sampler
        schedule = self.schedule_for(steps)
        extra = {"eta": float(diff.get("eta", 0.0) if eta is None else eta)} if name == "ddim" else {}

        def sample(params, z_i, tokens, rng, x_T=None):
            model_fn = self.guided_model_fn(params, z_i, tokens, guidance_scale, drop_text=drop_text)
            b = z_i.shape[0]
            return diff_lib.sample_images(diff, schedule, model_fn, (b, self.side, self.side, 3), rng,
                                          sampler=name, x_T=x_T, **extra)

        return sample

    def karlo_model_fn(self, params, z_i: jax.Array, text, uncond, guidance_scale: float):
        """Karlo mode's model function `(x_t, t) -> output` (see the module docstring).

        text = (z_t [B, D], text_hidden [B, L, W], text_mask bool [B, L]) of the captions; uncond:
        the same three of the empty caption (batch B or 1). Guided when the scale is not 1.
        """
        z_i = jnp.asarray(z_i, jnp.float32)
        text = (jnp.asarray(text[0], jnp.float32), jnp.asarray(text[1], jnp.float32),
                jnp.asarray(text[2], bool))
        names = ("z_t", "text_hidden", "text_mask")
        cond = {"z_i": z_i, **dict(zip(names, text))}
        apply = lambda x, t, batch, drop: self.model.apply(  # noqa: E731
            {"params": params}, x, t, **self._conditioning(batch, drop))
        if guidance_scale == 1:
            return lambda x, t: apply(x, t, cond, None)
        b = z_i.shape[0]
        uncond = [jnp.broadcast_to(jnp.asarray(u, c.dtype), c.shape) for u, c in zip(uncond, text)]
        two = {"z_i": jnp.concatenate([z_i, z_i]),
               **{n: jnp.concatenate([c, u]) for n, c, u in zip(names, text, uncond)}}
        drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
        return samplers.guided(lambda x, t: apply(x, t, two, drop), guidance_scale,
                               learned_variance=bool(self.model.learned_variance))

    def karlo_decode(self, params, mesh: Mesh, z_i: np.ndarray, text, empty_caption, rng: jax.Array, *,
                     batch_size: int = 64, guidance_scale: float | None = None) -> np.ndarray:
        """Karlo mode: decodes z_i [N, D] with its captions' `text` (z_t [N, D], hidden [N, L, W],
        mask [N, L]) and the empty caption's three (batch 1) to uint8 images [N, side, side, 3]
        with Karlo's sampler (`sample_body`; the config's guidance scale unless given)."""
        scale = float(self.config.diffusion.guidance_scale if guidance_scale is None else guidance_scale)
        fn = self._jitted(mesh, ("karlo_sample", scale), lambda: self.sample_body(guidance_scale=scale))
        dtypes = (np.float32, np.float32, bool)  # z_t, hidden, mask
        captions = [np.asarray(x, dt) for x, dt in zip(text, dtypes)]
        empty = [np.repeat(np.asarray(u, dt), len(z_i), axis=0) for u, dt in zip(empty_caption, dtypes)]
        images = parallel.map_batches(lambda i, *x: fn(params, *x, jax.random.fold_in(rng, i)),
                                      [np.asarray(z_i, np.float32), *captions, *empty], mesh, batch_size)
        return np.asarray(pixels.to_uint8(images))

    def _karlo_sample_body(self, *, guidance_scale: float, steps=None, ddim_eta: float | None = None):
        """Karlo mode's sampler (see the module docstring); DDIM at `ddim_eta` unless None."""
        karlo = diff_lib.karlo_sampling("decoder", self.config.diffusion, steps)
        schedule = karlo.schedule()
        channels = int(self.model.image_channels)

        def sample(params, z_i, z_t, text_hidden, text_mask, uncond_z_t, uncond_hidden, uncond_mask,
                   rng, x_T=None, step_noise=None):
            model_fn = self.karlo_model_fn(params, z_i, (z_t, text_hidden, text_mask),
                                           (uncond_z_t, uncond_hidden, uncond_mask), guidance_scale)
            shape = (z_i.shape[0], self.side, self.side, channels)
            if ddim_eta is not None:
                if step_noise is not None:
                    raise ValueError("step_noise is for Karlo's own sampler, not DDIM")
                x0 = samplers.sample("ddim", model_fn, schedule, shape, rng, x_T=x_T, eta=ddim_eta,
                                     param=karlo.param, learned_variance=karlo.learned_variance,
                                     clip_x0=karlo.clip_x0)
            else:
                x0 = karlo.sample(model_fn, shape, rng, x_T=x_T, step_noise=step_noise,
                                  schedule=schedule)
            return jnp.clip(x0, -1.0, 1.0)

        return sample

    def invert_body(self, *, guidance_scale: float = 1.0, steps=None, num_fixed_point_iters: int = 0,
                    drop_text: bool = False):
        """Un-jitted DDIM inversion `(params, x_0 [B, side, side, 3] in [-1, 1], z_i, tokens) -> x_T`.

        Inverts with the same (guided) model and step schedule that DDIM sampling with these
        settings uses, so DDIM at eta = 0 from the returned x_T reconstructs x_0 (exactly as
        `num_fixed_point_iters` grows; see `samplers.ddim_invert`).
        """
        if self.karlo:
            return self._karlo_invert_body(guidance_scale=guidance_scale, steps=steps,
                                           num_fixed_point_iters=num_fixed_point_iters)
        diff = self.config.diffusion
        schedule = self.schedule_for(steps)

        def invert(params, x0, z_i, tokens):
            model_fn = self.guided_model_fn(params, z_i, tokens, guidance_scale, drop_text=drop_text)
            return samplers.ddim_invert(model_fn, schedule, x0, param=diff.param, clip_x0=1.0,
                                        learned_variance=bool(diff.learned_variance),
                                        num_fixed_point_iters=num_fixed_point_iters)

        return invert

    def _karlo_invert_body(self, *, guidance_scale: float, steps, num_fixed_point_iters: int):
        """Karlo mode's DDIM inversion (see the module docstring): the inverse of
        `sample_body(sampler="ddim", eta=0)` with the same guidance scale and steps."""
        karlo = diff_lib.karlo_sampling("decoder", self.config.diffusion, steps)
        schedule = karlo.schedule()

        def invert(params, x0, z_i, z_t, text_hidden, text_mask, uncond_z_t, uncond_hidden, uncond_mask):
            model_fn = self.karlo_model_fn(params, z_i, (z_t, text_hidden, text_mask),
                                           (uncond_z_t, uncond_hidden, uncond_mask), guidance_scale)
            return samplers.ddim_invert(model_fn, schedule, x0, param=karlo.param, clip_x0=karlo.clip_x0,
                                        learned_variance=karlo.learned_variance,
                                        num_fixed_point_iters=num_fixed_point_iters)

        return invert

    def decode(self, params, mesh: Mesh, z_i: np.ndarray, tokens: np.ndarray, rng: jax.Array, *,
               batch_size: int = 64, guidance_scale: float | None = None) -> np.ndarray:
        """Decodes unit z_i [N, D] (with caption tokens [N, L]) to uint8 images [N, side, side, 3]."""
        self._refuse_karlo("decode (caption tokens)")
        scale = float(self.config.diffusion.guidance_scale if guidance_scale is None else guidance_scale)
        fn = self._jitted(mesh, ("sample", scale), lambda: self.sample_body(guidance_scale=scale))
        images = parallel.map_batches(lambda i, z, tok: fn(params, z, tok, jax.random.fold_in(rng, i)),
                                      [z_i, tokens], mesh, batch_size)
        return np.asarray(pixels.to_uint8(images))
