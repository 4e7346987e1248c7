"""Kakao Brain's Karlo (the published unCLIP) after `convert_karlo.py` imported it: sampling, and
fine-tuning its decoder.

The argument (after the colon):
- `<root>` (default `runs/karlo`): the pipeline config of `convert_karlo.py --out <root>` (workdirs
  `<root>/clip` (Karlo's CLIP: the text encoder, or with `--clip_dir` the full CLIP),
  `<root>/prior`, `<root>/decoder`, `<root>/upsampler`) for `sample.py`:
  `python sample.py --config configs/karlo.py:runs/karlo --prompt "a photo of a red apple"`.
  Text -> 64 px -> 256 px with Karlo's own sampling (diffusers' UnCLIPPipeline: 25 prior steps
  with guidance 4, 25 decoder steps with guidance 8, 7 super-resolution steps); unset fields take
  the stages' values.
- `decoder` or `decoder,<root>`: the `train.py` config fine-tuning the root's imported decoder on
  the data of its CLIP workdir (which needs the full CLIP: `convert_karlo.py --clip_dir`, with
  `--clip_config.data.shards=...`) through that CLIP's embedding cache (`embed.py`, with norms):
  `python train.py --config configs/karlo.py:decoder --workdir runs/karlo_ft
  [--config.train.init_from=<root>/decoder --config.clip_workdir=<root>/clip]`. Its model and
  diffusion blocks are the imported decoder's (`train.init_sections`: read from
  `train.init_from`'s config.json), with the fields set below laid over them. The defaults (lr
  1e-5 after 500 warmup steps, batch 64, EMA 0.9999, the paper's 10% z_i / 50% caption drops)
  are a starting point for fine-tuning, not Karlo's training recipe (which is not published).
  A root literally named `decoder` is spelled `./decoder`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import clip_vit_l14, shapes

DEFAULT_ROOT = "runs/karlo"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or DEFAULT_ROOT
    if arg == "decoder" or arg.startswith("decoder,"):
        return decoder_config(arg.partition(",")[2].rstrip("/") or DEFAULT_ROOT)
    return sampling_config(arg.rstrip("/"))


def decoder_config(root: str) -> ml_collections.ConfigDict:
    """Fine-tuning `<root>/decoder` on `<root>/clip`'s data and embedding cache (module docstring)."""
    c = ml_collections.ConfigDict()
    c.stage = "decoder"  # Which task trains (unclip_jax/tasks/decoder.py, in Karlo mode).
    c.seed = 0  # Training RNG seed (the params come from init_from).
    c.clip_workdir = f"{root}/clip"  # The full imported CLIP (convert_karlo.py --clip_dir): data set and cache.
    c.cache_dir = ""  # Its embedding cache (embed.py; format 2, with norms); "" = <clip_workdir>/cache.
    c.data = ml_collections.ConfigDict()
    c.data.shuffle_seed = 0  # Seed of the (per-epoch) shuffle of the training stream.
    c.data.num_threads = 16  # Grain threads decoding images.

    # Laid over the imported decoder's blocks (train.init_sections); None keeps the imported value.
    c.model = ml_collections.ConfigDict()
    c.model.dtype = "bfloat16"  # Activations (params stay float32); "float32" samples as the import does.
    c.model.remat = True  # Recompute activations in the backward pass (memory).
    c.model.dropout = config_dict.placeholder(float)  # Imported: Karlo's config value (0).
    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.z_i_drop_prob = 0.1  # z_i replaced by the learned guidance embedding (paper: 10%).
    c.diffusion.text_drop_prob = 0.5  # Caption replaced by the empty caption (paper: 50%).
    c.diffusion.t_sampling = "uniform"  # Training noise levels (see image_diffusion.sample_t).
    c.diffusion.guidance_scale = config_dict.placeholder(float)  # Evaluation; imported: 8.0.
    c.diffusion.sample_steps = config_dict.placeholder(int)  # Evaluation steps; Karlo's: 25.

    c.train = shapes.train_config(
        batch_size=64, num_steps=20_000, learning_rate=1e-5, warmup_steps=500, weight_decay=0.0,
        b2=0.999, eps=1e-8, ema_decay=0.9999, log_every=100, checkpoint_every=2_000)
    c.train.init_from = f"{root}/decoder"  # The imported decoder: its params, model and diffusion blocks.
    c.train.init_sections = ("model", "diffusion")  # Read from init_from's config.json.

    c.eval = ml_collections.ConfigDict()
    clip_vit_l14._real_data_eval(c)  # FD-CLIP and CLIP score of decoded validation z_i.
    c.eval.num_examples = 64  # Images per split.
    c.eval.batch_size = 64  # Decoding batch.
    c.eval.seed = 0  # Sampling seed.
    c.eval.use_ema = True  # Evaluate the EMA params.
    c.mesh = shapes.mesh_config()
    c.lock()
    return c


def sampling_config(root: str) -> ml_collections.ConfigDict:
    """The pipeline config of the stages `convert_karlo.py --out <root>` wrote."""
    c = ml_collections.ConfigDict()
    c.clip_workdir = f"{root}/clip"  # Karlo's CLIP ViT-L/14 (text encoder alone unless --clip_dir).
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
