"""Training an upsampler (`stages/upsampler.py`) on random crops with corrupted low-res inputs.

Training (paper §2.1, App. C): random crops of a quarter of the target side (`data.crop_size`);
the low-resolution input is derived from the crop and corrupted (`data.corruption`: Gaussian blur
k3 sigma 0.6 for the first stage, BSR degradation for the second).

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
from jax.sharding import Mesh

from unclip_jax.diffusion import pixels
from unclip_jax.data import degradations
from unclip_jax.data import images as image_lib
from unclip_jax.data import input_pipeline
from unclip_jax.evaluation import shapes_judge
from unclip_jax.stages.upsampler import UpsamplerStage
from unclip_jax.tasks.base import Task


class UpsamplerTask(Task):
    """Trains a `scale`x upsampler on random crops; evaluates at full size."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, sizes: Mapping[str, Any] | None = None):
        super().__init__(config, workdir)
        self.stage = UpsamplerStage(config)
        self.side, self.scale, self.crop = self.stage.side, self.stage.scale, self.stage.crop

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

    # ------------------------------------------------------------------ evaluation
    def upsample(self, params, mesh: Mesh, low: np.ndarray, rng: jax.Array) -> np.ndarray:
        """uint8 low-res [N, h, w, 3] -> uint8 [N, h * scale, w * scale, 3]."""
        return self.stage.upsample(params, mesh, low, rng, batch_size=self.config.eval.batch_size)

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
