"""Sampling Kakao Brain's Karlo (the published unCLIP) after `convert_karlo.py` imported it.

Usage: `python sample.py --config configs/karlo.py:runs/karlo --prompt "a photo of a red apple"`,
the root after the colon being `convert_karlo.py --out`'s (workdirs `<root>/clip` (Karlo's CLIP
text encoder), `<root>/prior`, `<root>/decoder`, `<root>/upsampler`). Text -> 64 px -> 256 px
with Karlo's own sampling (diffusers' UnCLIPPipeline: 25 prior steps with guidance 4, 25 decoder
steps with guidance 8, 7 super-resolution steps); unset fields take the stages' values.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    root = (arg or "runs/karlo").rstrip("/")
    c = ml_collections.ConfigDict()
    c.clip_workdir = f"{root}/clip"  # Karlo's CLIP ViT-L/14 text encoder (no image tower).
    c.prior_workdir = f"{root}/prior"  # The 1B prior.
    c.decoder_workdir = f"{root}/decoder"  # The 64 px decoder with its text projection.
    c.upsampler_workdirs = (f"{root}/upsampler",)  # 64 -> 256 px (super_res_first + super_res_last).
    c.params = "ema"  # Which params of each checkpoint (an import holds the same in both).

    c.prior = ml_collections.ConfigDict()
    c.prior.guidance_scale = config_dict.placeholder(float)  # Karlo's: 4.0.
    c.prior.best_of = config_dict.placeholder(int)  # Karlo's: 1.
    c.prior.sampler = config_dict.placeholder(str)  # Only "karlo" (the imported schedule).
    c.prior.steps = config_dict.placeholder(str)  # Inference steps (Karlo's: 25).

    c.decoder = ml_collections.ConfigDict()
    c.decoder.guidance_scale = config_dict.placeholder(float)  # Karlo's: 8.0.
    c.decoder.sampler = config_dict.placeholder(str)  # Only "karlo".
    c.decoder.steps = config_dict.placeholder(str)  # Inference steps (Karlo's: 25).
    c.decoder.eta = config_dict.placeholder(float)  # Not used by Karlo's sampler.

    c.upsampler = ml_collections.ConfigDict()
    c.upsampler.sampler = config_dict.placeholder(str)  # Only "karlo".
    c.upsampler.steps = config_dict.placeholder(str)  # Inference steps (Karlo's: 7).
    c.upsampler.eta = config_dict.placeholder(float)  # Not used by Karlo's sampler.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # Devices along (data, fsdp, tensor): sampling is data parallel.
    c.mesh.num_devices = 0  # Use only the first N devices (0: all).
    c.lock()
    return c
