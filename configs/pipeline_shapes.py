"""The unCLIP pipeline over the embedded shapes stages (what `sample.py` loads by default).

Usage: `python sample.py --config configs/pipeline_shapes.py --prompt "a large red circle in the
center on a white background"`. Each stage is a `train.py` workdir (configs/shapes.py variants);
any field can be overridden on the command line, e.g. `--config.decoder.guidance_scale=2`,
`--config.upsampler_workdirs='()'` (stop at the decoder's 32 px). Sampling fields left unset
(None) take the stage's own config value.

After `train_stack.py`, name its root after the colon to sample its stages:
`--config configs/pipeline_shapes.py:runs/stack_fast` (workdirs `<root>/shapes_<stage>`).

The autoregressive prior (configs/shapes.py:ar_prior) instead of the diffusion prior:
`--config.prior.kind=autoregressive --config.prior_workdir=runs/shapes_ar_prior`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    root = (arg or "runs").rstrip("/")  # A train_stack.py root, or runs/ of the README's train.py runs.
    c = ml_collections.ConfigDict()
    c.clip_workdir = f"{root}/shapes_clip"  # The trained CLIP (tokenizer, text and image encoders).
    c.prior_workdir = f"{root}/shapes_prior"  # The trained prior, of the kind prior.kind names.
    c.decoder_workdir = f"{root}/shapes_decoder"  # The trained decoder (32 px).
    c.upsampler_workdirs = (f"{root}/shapes_upsampler",)  # Upsamplers in order (32 -> 128 px); () for none.
    c.params = "ema"  # Which params of each checkpoint: ema | params.

    c.prior = ml_collections.ConfigDict()
    # "diffusion" (configs/shapes.py:prior) | "autoregressive" (configs/shapes.py:ar_prior); the
    # prior workdir must hold that kind.
    c.prior.kind = "diffusion"
    c.prior.guidance_scale = config_dict.placeholder(float)  # Classifier-free guidance (None: the prior config's).
    # The diffusion prior's:
    c.prior.best_of = config_dict.placeholder(int)  # Candidates per caption, the one closest to z_t kept (paper: 2).
    c.prior.sampler = config_dict.placeholder(str)  # ddpm | ddim | dpm++2m.
    c.prior.steps = config_dict.placeholder(str)  # Sampling steps: "64", "ddim25", "10,10,3,2,2".
    # The autoregressive prior's (None: its config's `ar`):
    c.prior.temperature = config_dict.placeholder(float)  # Softmax temperature (0: greedy).
    c.prior.top_k = config_dict.placeholder(int)  # Draw among the k most likely tokens (0: all).
    c.prior.top_p = config_dict.placeholder(float)  # Draw within the smallest set holding this mass (1: all).
    c.prior.dot_percentile = config_dict.placeholder(float)  # z_i . z_t token drawn above this percentile (paper: 0.5).

    c.decoder = ml_collections.ConfigDict()
    c.decoder.guidance_scale = config_dict.placeholder(float)  # Classifier-free guidance on z_i and caption.
    c.decoder.sampler = config_dict.placeholder(str)  # ddpm | ddim | dpm++2m.
    c.decoder.steps = config_dict.placeholder(str)  # Sampling steps (respacing spec).
    c.decoder.eta = config_dict.placeholder(float)  # DDIM stochasticity (ddim only).

    c.upsampler = ml_collections.ConfigDict()  # Applies to every upsampler.
    c.upsampler.sampler = config_dict.placeholder(str)  # ddpm | ddim | dpm++2m.
    c.upsampler.steps = config_dict.placeholder(str)  # Sampling steps (respacing spec).
    c.upsampler.eta = config_dict.placeholder(float)  # DDIM stochasticity (ddim only).

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # Devices along (data, fsdp, tensor): sampling is data parallel.
    c.mesh.num_devices = 0  # Use only the first N devices (0: all).
    c.lock()
    return c
