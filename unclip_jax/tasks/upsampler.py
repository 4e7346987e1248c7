"""The unCLIP upsamplers: conv-only UNets conditioned on a corrupted low-resolution image.

Training (paper §2.1, App. C): random crops of a quarter of the target side (`data.crop_size`);
the low-resolution input is derived from the crop and corrupted (`data.corruption`: Gaussian blur
k3 sigma 0.6 for the first stage, BSR degradation for the second); no caption, no CLIP, no
guidance. The model has no attention, so it samples at full size with the same params.

`diffusion.residual` (not the paper's choice; SRDiff, Li et al. 2022): the diffused signal is the
residual between the high-res image and the resized conditioning image (the resize the UNet does
inside), added back after sampling. The low frequencies, and so the colours, then come from the
input instead of being re-generated: the plain target left tinted backgrounds after short runs.

Evaluation upsamples full validation images from their clean low-resolution versions and reports
PSNR against the true high-resolution render, and the shapes judge on the low-res inputs and on
the upsampled outputs.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from unclip_jax import parallel
from unclip_jax.diffusion import pixels
from unclip_jax.data import degradations
from unclip_jax.data import images as image_lib
from unclip_jax.data import input_pipeline
from unclip_jax.evaluation import shapes_judge
from unclip_jax.models import unet as unet_lib
from unclip_jax.tasks import image_diffusion as diff_lib
from unclip_jax.tasks.base import Task


class UpsamplerTask(Task):
    """Trains a `scale`x upsampler on random crops; evaluates at full size."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        super().__init__(config, workdir)
        data = config.data
        self.side, self.scale, self.crop = int(data.side), int(data.scale), int(data.crop_size)
        if self.side % self.scale or self.crop % self.scale:
            raise ValueError(f"config.data.side={self.side} and crop_size={self.crop} must be multiples "
                             f"of scale={self.scale}")
        self.model = unet_lib.unet_from_config(config.model, low_res_conditioning=True, clip_dim=0,
                                               text_depth=0, attention_resolutions=(),
                                               learned_variance=bool(config.diffusion.learned_variance))
        self.schedule, self.sample_schedule = diff_lib.schedules(config.diffusion)
        self._samplers = {}

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        c, low = self.crop, self.crop // self.scale
        return self.model.init(rng, jnp.zeros((1, c, c, 3)), jnp.zeros((1,), jnp.int32),
                               low_res=jnp.zeros((1, low, low, 3)))["params"]

    @property
    def residual(self) -> bool:
        return bool(self.config.diffusion.get("residual", False))

    def _base(self, cond: jax.Array, height: int, width: int) -> jax.Array:
        """What the diffused signal is relative to: the resized conditioning image, or 0."""
        if not self.residual:
            return jnp.zeros((cond.shape[0], height, width, cond.shape[-1]), jnp.float32)
        return unet_lib.resize_low_res(cond, height, width, self.model.low_res_resize)

    def loss_fn(self, params, batch, rng, step):
        noise_rng, dropout_rng = jax.random.split(rng)
        cond = pixels.to_model_range(batch["low"])
        high = pixels.to_model_range(batch["high"])
        x0 = high - self._base(cond, high.shape[1], high.shape[2])
        x_t, t, noise = diff_lib.noised(self.schedule, x0, noise_rng)
        out = self.model.apply({"params": params}, x_t, t, low_res=cond,
                               train=bool(self.config.model.dropout), rngs={"dropout": dropout_rng})
        return diff_lib.diffusion_loss(self.config.diffusion, self.schedule, out, x0, x_t, t, noise)

    # ------------------------------------------------------------------ data
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, c, low = int(batch_size), self.crop, self.crop // self.scale
        return {"high": jax.ShapeDtypeStruct((b, c, c, 3), jnp.uint8),
                "low": jax.ShapeDtypeStruct((b, low, low, 3), jnp.uint8)}

    def map_example(self, position: int, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A random crop and its corrupted low-res version, random per stream position (resumable)."""
        image, _ = input_pipeline.decode_example(example, self.side)
        rng = degradations.example_rng(int(self.config.data.crop_seed), position)
        high, low = degradations.crop_and_corrupt(image, self.crop, self.scale,
                                                  self.config.data.corruption, rng)
        return {"high": high, "low": low}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        data = self.config.data
        return input_pipeline.make_pipeline(
            input_pipeline.make_source(data, "train"), self.map_example, local_batch_size=local_batch_size,
            shuffle_seed=data.shuffle_seed, process_index=process_index, process_count=process_count,
            num_threads=data.num_threads, with_index=True)

    # ------------------------------------------------------------------ sampling and evaluation
    def sample_body(self, *, sampler: str | None = None, steps=None, eta: float | None = None):
        """The un-jitted sampler `(params, low_res uint8 [B, h, w, 3], rng, x_T=None) -> x_0`.

        x_0: float32 [B, h * scale, w * scale, 3] in [-1, 1]. `sampler`, `steps` (a respacing spec)
        and `eta` (DDIM only) default to the config's; `x_T` replaces the drawn noise.
        """
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
            base = self._base(cond, shape[1], shape[2])
            x0 = diff_lib.sample_images(diff, schedule, model_fn, shape, rng, sampler=name, x_T=x_T,
                                        clip_x0=2.0 if self.residual else 1.0, **extra)
            return jnp.clip(x0 + base, -1.0, 1.0)

        return sample

    def upsample(self, params, mesh: Mesh, low: np.ndarray, rng: jax.Array) -> np.ndarray:
        """uint8 low-res [N, h, w, 3] -> uint8 [N, h * scale, w * scale, 3]."""
        h, w = low.shape[1], low.shape[2]
        key = (mesh, h, w)
        if key not in self._samplers:
            self._samplers[key] = jax.jit(self.sample_body(), out_shardings=NamedSharding(mesh, jax.P()))
        sampler = self._samplers[key]
        upsampled = parallel.map_batches(lambda i, chunk: sampler(params, chunk, jax.random.fold_in(rng, i)),
                                         [low], mesh, self.config.eval.batch_size)
        return np.asarray(pixels.to_uint8(upsampled))

    def _eval_examples(self, split: str):
        source = input_pipeline.make_source(self.config.data, split)
        items = [input_pipeline.decode_example(source[i], self.side)
                 for i in range(min(len(source), int(self.config.eval.num_examples)))]
        high = np.stack([image for image, _ in items])
        low = np.stack([degradations.corrupt_low_res(x, self.scale, "none") for x in high])
        return high, low, [caption for _, caption in items]

    def evaluate(self, params, mesh: Mesh) -> dict[str, float]:
        results = {}
        for split in self.config.eval.splits:
            high, low, captions = self._eval_examples(split)
            upsampled = self.upsample(params, mesh, low, jax.random.key(int(self.config.eval.seed)))
            results[f"eval/{split}/psnr_upsampled"] = pixels.psnr(upsampled, high)
            bicubic = np.stack([image_lib.resize_center_crop(x, high.shape[1]) for x in low])
            results[f"eval/{split}/psnr_bicubic"] = pixels.psnr(bicubic, high)  # the baseline
            for name, images in (("low_res", low), ("upsampled", upsampled)):
                scores = shapes_judge.judge_batch(images, captions)
                results[f"eval/{split}/judge_exact_{name}"] = float(scores["exact"])
        return results

    def sample_images(self, params, mesh: Mesh) -> dict[str, np.ndarray]:
        if not self.config.eval.splits:
            return {}
        high, low, _ = self._eval_examples(self.config.eval.splits[0])
        n = min(8, len(high))
        upsampled = self.upsample(params, mesh, low[:n], jax.random.key(1))
        return {"upsampled_vs_real": np.concatenate([upsampled, high[:n]])}
