"""The unCLIP upsamplers: conv-only UNets conditioned on a corrupted low-resolution image.

Trained on random crops (`data.crop_size`) of the target side; the model has no attention, so it
samples at full size with the same params. No caption, no CLIP, no guidance.

`diffusion.residual` (not the paper's choice; SRDiff, Li et al. 2022): the diffused signal is the
residual between the high-res image and the resized conditioning image (the resize the UNet does
inside), added back after sampling. The low frequencies, and so the colours, then come from the
input instead of being re-generated: the plain target left tinted backgrounds after short runs.

Karlo mode (`diffusion.sampler = "karlo"`, see `image_diffusion.is_karlo`): the upsampler samples
as diffusers' `UnCLIPPipeline` runs Kakao Brain's Karlo super-resolution (64 -> 256 px), whose
last step is taken by a second UNet, `super_res_last`. Choice: ONE stage whose params tree is
`{"first": super_res_first params, "last": super_res_last params}` (both converted by
`unclip_jax.convert.karlo_unet.convert_super_res`, the same architecture, so one `model` block from
`super_res_config`; `init_params` gives that tree), so that the pipeline loads, restores and runs
the pair as one upsampler. The model block must resize its low-resolution input bicubically
(`low_res_resize="bicubic"`: `jax.image.resize` equals the pipeline's antialiased bicubic
`F.interpolate`) and `diffusion.residual` must be off. `sample_body` then returns
`(params, image, rng, x_T=None, step_noise=None) -> x_0 float32 [B, h * scale, w * scale, 3]` in
[-1, 1]: `image` [B, h, w, 3] is the decoder's output, float in [-1, 1] as the pipeline passes it
(uint8 is accepted too and mapped to [-1, 1]), upsampled and concatenated with the noisy image on
channels inside the model; `unclip.KARLO_SUPER_RES` sampling (7 steps by default; eps, fixed small
variance, x0 clipped to 1) with "first" at every step but the last and "last" at the last; the
result is clamped to [-1, 1] (the pipeline's post-processing clamp). x_T / step_noise replace the
drawn noise. Training (`loss`) and `upsample` are not supported in this mode.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.diffusion import pixels
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import image_diffusion as diff_lib


class UpsamplerStage:
    """A `data.scale`x upsampler to `data.side` px, trained on `data.crop_size` px crops."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.sizes: dict = {}
        data = config.data
        self.side, self.scale, self.crop = int(data.side), int(data.scale), int(data.crop_size)
        if self.side % self.scale or self.crop % self.scale:
            raise ValueError(f"config.data.side={self.side} and crop_size={self.crop} must be multiples "
                             f"of scale={self.scale}")
        self.model = unet_lib.unet_from_config(config.model, low_res_conditioning=True, clip_dim=0,
                                               text_depth=0, attention_resolutions=(),
                                               learned_variance=bool(config.diffusion.learned_variance))
        self.karlo = diff_lib.is_karlo(config.diffusion)
        if self.karlo:  # See the module docstring.
            if self.model.low_res_resize != "bicubic":
                raise ValueError(f"Karlo mode (diffusion.sampler='karlo') resizes the low-resolution "
                                 f"input bicubically: model.low_res_resize="
                                 f"{self.model.low_res_resize!r} (convert.karlo_unet.super_res_config)")
            karlo = diff_lib.karlo_sampling("super_res", config.diffusion)
            self.schedule = Schedule.named(karlo.noise_schedule, karlo.num_train_timesteps)
            self.sample_schedule = karlo.schedule()
        else:
            self.schedule, self.sample_schedule = diff_lib.schedules(config.diffusion)
        self.residual = bool(config.diffusion.get("residual", False))
        self._jitted = parallel.JitCache()

    def base(self, cond: jax.Array, height: int, width: int) -> jax.Array:
        """What the diffused signal is relative to: the resized conditioning image, or 0."""
        if not self.residual:
            return jnp.zeros((cond.shape[0], height, width, cond.shape[-1]), jnp.float32)
        return unet_lib.resize_low_res(cond, height, width, self.model.low_res_resize)

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        """The model's params (boxed with logical axis names). Runs under eval_shape and jit."""
        c, low = self.crop, self.crop // self.scale
        if self.karlo:  # {"first": super_res_first, "last": super_res_last}
            k = int(self.model.image_channels)
            first, last = jax.random.split(rng)
            return {name: self.model.init(key, jnp.zeros((1, c, c, k)), jnp.zeros((1,), jnp.int32),
                                          low_res=jnp.zeros((1, low, low, k)))["params"]
                    for name, key in (("first", first), ("last", last))}
        return self.model.init(rng, jnp.zeros((1, c, c, 3)), jnp.zeros((1,), jnp.int32),
                               low_res=jnp.zeros((1, low, low, 3)))["params"]

    def loss(self, params, batch: Mapping[str, jax.Array], rng: jax.Array):
        """The diffusion loss of a batch of uint8 `high` crops and their corrupted `low` versions."""
        if self.karlo:
            raise ValueError("the upsampler is in Karlo mode (diffusion.sampler='karlo'): sampling "
                             "imported weights only, no training loss")
        noise_rng, dropout_rng = jax.random.split(rng)
        cond = pixels.to_model_range(batch["low"])
        high = pixels.to_model_range(batch["high"])
        x0 = high - self.base(cond, high.shape[1], high.shape[2])
        x_t, t, noise = diff_lib.noised(self.schedule, x0, noise_rng, self.config.diffusion)
        out = self.model.apply({"params": params}, x_t, t, low_res=cond,
                               train=bool(self.config.model.dropout), rngs={"dropout": dropout_rng})
        return diff_lib.diffusion_loss(self.config.diffusion, self.schedule, out, x0, x_t, t, noise)

    # ------------------------------------------------------------------ sampling
    def sample_body(self, *, sampler: str | None = None, steps=None, eta: float | None = None):
        """The un-jitted sampler `(params, low_res uint8 [B, h, w, 3], rng, x_T=None) -> x_0`.

        x_0: float32 [B, h * scale, w * scale, 3] in [-1, 1]. `sampler`, `steps` (a respacing spec)
        and `eta` (DDIM only) default to the config's; `x_T` replaces the drawn noise.
        In Karlo mode: the sampler of the module docstring (`sampler` None or "karlo", `steps` a
        number of inference steps, `eta` not used).
        """
        if self.karlo:
            diff_lib.check_karlo_sampler("upsampler", sampler)
            return self._karlo_sample_body(steps=steps)
        diff = self.config.diffusion
        name = sampler or diff.sampler
        schedule = self.sample_schedule if steps is None else self.schedule.respace(steps)
        extra = {"eta": float(diff.get("eta", 0.0) if eta is None else eta)} if name == "ddim" else {}

        def sample(params, low_res, rng, x_T=None):
            cond = pixels.to_model_range(low_res)

            def model_fn(x, t):
                return self.model.apply({"params": params}, x, t, low_res=cond)

            b, h, w = low_res.shape[:3]
            shape = (b, h * self.scale, w * self.scale, 3)
            base = self.base(cond, shape[1], shape[2])
            x0 = diff_lib.sample_images(diff, schedule, model_fn, shape, rng, sampler=name, x_T=x_T,
                                        clip_x0=2.0 if self.residual else 1.0, **extra)
            return jnp.clip(x0 + base, -1.0, 1.0)

        return sample

    def _karlo_sample_body(self, *, steps=None):
        """Karlo mode's sampler (see the module docstring)."""
        karlo = diff_lib.karlo_sampling("super_res", self.config.diffusion, steps)
        schedule = karlo.schedule()

        def sample(params, image, rng, x_T=None, step_noise=None):
            if not isinstance(params, Mapping) or set(params) != {"first", "last"}:
                raise ValueError("Karlo mode's upsampler params are {'first': super_res_first, "
                                 f"'last': super_res_last}}; got a tree with keys "
                                 f"{sorted(params) if isinstance(params, Mapping) else type(params)}")
            image = jnp.asarray(image)
            cond = (pixels.to_model_range(image) if image.dtype == jnp.uint8
                    else image.astype(jnp.float32))

            def model_fn(which):
                return lambda x, t: self.model.apply({"params": params[which]}, x, t, low_res=cond)

            b, h, w, c = cond.shape
            x0 = karlo.sample(model_fn("first"), (b, h * self.scale, w * self.scale, c), rng,
                              last_step_model_fn=model_fn("last"), x_T=x_T, step_noise=step_noise,
                              schedule=schedule)
            return jnp.clip(x0, -1.0, 1.0)

        return sample

    def upsample(self, params, mesh: Mesh, low: np.ndarray, rng: jax.Array, *, batch_size: int = 64) -> np.ndarray:
        """uint8 low-res [N, h, w, 3] -> uint8 [N, h * scale, w * scale, 3]."""
        if self.karlo:
            raise ValueError("the upsampler is in Karlo mode: call sample_body (it takes the "
                             "decoder's float output and {'first', 'last'} params)")
        fn = self._jitted(mesh, ("sample",), self.sample_body)
        upsampled = parallel.map_batches(lambda i, chunk: fn(params, chunk, jax.random.fold_in(rng, i)),
                                         [low], mesh, batch_size)
        return np.asarray(pixels.to_uint8(upsampled))
