"""Imports Kakao Brain's Karlo UNets (diffusers' `UnCLIPPipeline` layout) into `models.unet.UNet`.

    model = karlo_unet.decoder_config(decoder_config_json, text_proj_config_json)
    params = karlo_unet.convert_decoder(decoder_state_dict, text_proj_state_dict,
                                        decoder_config_json, text_proj_config_json)
    unet = unet_lib.unet_from_config(model)   # then unet.apply({"params": params}, ...)

    model = karlo_unet.super_res_config(super_res_first_config_json)   # or super_res_last
    params = karlo_unet.convert_super_res(super_res_first_state_dict, super_res_first_config_json)

The configs are the `config.json` dicts of the pipeline's `decoder` (`UNet2DConditionModel`),
`text_proj` (`UnCLIPTextProjModel`) and `super_res_first` / `super_res_last` (`UNet2DModel`);
missing entries take diffusers' defaults. State dicts map diffusers' tensor names (no prefix) to
torch tensors or numpy arrays (float16/bfloat16 are widened to float32). The results are a model
config block (fields of `unet_from_config`) and a nested dict of float32 numpy arrays, the UNet's
`params`. Nothing here imports torch or diffusers.

Karlo's UNets are the ADM UNet this project already has, so the import is a renaming:

- `ResnetBlock2D` is `ResBlock` (GroupNorm, SiLU, 3x3 conv, time projection as scale-shift
  (`resnet_time_scale_shift="scale_shift"`, the decoder) or added (`"default"`, the upsamplers),
  GroupNorm, SiLU, 3x3 conv, 1x1 skip conv when the width changes); `ResnetDownsampleBlock2D` /
  `ResnetUpsampleBlock2D` resample inside a residual block (2x2 average / nearest), as ADM does.
- `SimpleCrossAttn*Block2D` / `UNetMidBlock2DSimpleCrossAttn` attention (`AttnAddedKVProcessor`):
  GroupNorm, q/k/v of the image, the context's keys/values from `add_k_proj`/`add_v_proj`
  concatenated BEFORE the image's, `channels / attention_head_dim` heads, output projection,
  residual: `AttentionBlock` with its `context_k_proj`/`context_v_proj`.
- The decoder's `UnCLIPTextProjModel` is the UNet's CLIP-text conditioning (`clip_text_width > 0`,
  see `models.unet`): z_i projected into the time embedding (`class_embed_type="identity"` adds it)
  and into `clip_extra_context_tokens` context tokens, z_t projected into the time embedding,
  the CLIP text hidden states projected and LayerNormed as the rest of the context, the learned
  classifier-free-guidance embedding as `null_z_i` (`drop_z_i=True` is the pipeline's
  unconditional half, which also passes the empty caption's z_t / hidden states / mask).
- The upsamplers concatenate the noisy image and the low-resolution image resized by bicubic
  interpolation with antialiasing (torch's `interpolate(..., mode="bicubic", antialias=True)`),
  which is `jax.image.resize(..., "bicubic")`: `low_res_resize="bicubic"`.

Name mapping (diffusers -> here; linear weights transposed, convolutions OIHW -> HWIO, attention
projections split into heads):

    time_embedding.linear_1 / linear_2              -> time_embed_fc1 / time_embed_fc2
    conv_in / conv_norm_out / conv_out              -> input_conv / out_norm / out_conv
    down_blocks.{l}.resnets.{i}                     -> down_{l}_res_{i}
    down_blocks.{l}.attentions.{i}                  -> down_{l}_attn_{i}
    down_blocks.{l}.downsamplers.0                  -> down_{l}_downsample
    mid_block.resnets.{0,1} / attentions.0          -> middle_res_{0,1} / middle_attn
    up_blocks.{k}.resnets.{i} / attentions.{i}      -> up_{L-1-k}_res_{i} / up_{L-1-k}_attn_{i}
    up_blocks.{k}.upsamplers.0                      -> up_{L-1-k}_upsample
    resnet norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
        -> in_norm, in_conv, emb_proj, out_norm, out_conv, skip_conv
    attention group_norm, to_q, to_k, to_v, add_k_proj, add_v_proj, to_out.0
        -> norm, q_proj, k_proj, v_proj, context_k_proj, context_v_proj, out_proj_{kernel,bias}
    text_proj: learned_classifier_free_guidance_embeddings -> null_z_i
        clip_image_embeddings_project_to_time_embeddings  -> clip_emb_proj
        clip_extra_context_tokens_proj                     -> clip_tokens_proj (rows regrouped:
                                                              diffusers lays tokens out
                                                              channel-major)
        embedding_proj                                     -> clip_text_emb_proj
        encoder_hidden_states_proj                         -> clip_text_seq_proj
        text_encoder_hidden_states_norm                    -> clip_text_seq_norm
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from unclip_jax.convert import ConversionError

NUM_TIMESTEPS = 1000  # Karlo's decoder and upsamplers are trained with 1000 steps.

# diffusers' defaults (UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel __init__).
_CONDITION_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
_MODEL_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
}
_TEXT_PROJ_DEFAULTS = {"clip_extra_context_tokens": 4, "clip_embeddings_dim": 768}

_NORM_EPS = 1e-5  # what models.unet.GroupNorm and layers.LayerNorm compute with
_ATTN_DOWN, _ATTN_UP = "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D"
_RES_DOWN, _RES_UP = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
_SCALE_SHIFT = {"scale_shift": True, "default": False}


class KarloConversionError(ConversionError):
    """A Karlo config or state dict does not fit this project's UNet: lists every problem."""


# -------------------------------------------------------------------------------------------------
# Configs.
# -------------------------------------------------------------------------------------------------
def _with_defaults(config: Mapping[str, Any], defaults: dict) -> dict:
    out = dict(defaults)
    out.update({k: v for k, v in dict(config).items() if not k.startswith("_")})
    return out


def _uniform(value: Any, n: int, name: str, problems: list[str]) -> Any:
    """An int-or-per-block config value as one value (this UNet has one per model)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            problems.append(f"{name}={list(value)} has {len(value)} entries for {n} blocks")
            return value[0] if value else None
        if len(set(value)) != 1:
            problems.append(f"{name}={list(value)} differs per block (this UNet has one value)")
        return value[0]
    return value


def _expect(cfg: dict, name: str, allowed: tuple, problems: list[str], why: str = "") -> None:
    value = cfg.get(name)
    ok = any((value == a) if not isinstance(a, float) else
             (value is not None and math.isclose(float(value), a, rel_tol=1e-6)) for a in allowed)
    if not ok:
        choices = " or ".join(repr(a) for a in allowed)
        problems.append(f"{name}={value!r} is not supported (expected {choices}{why})")


def _levels(cfg: dict, problems: list[str], *, attention_ok: bool) -> tuple[list[int], list[int]]:
    """Checks the block layout; returns (channels per level, levels with attention)."""
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    channels = [int(c) for c in cfg["block_out_channels"]]
    n = len(channels)
    if len(down) != n or len(up) != n:
        problems.append(f"down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                        f"block_out_channels ({n}) must have the same length")
    attention = []
    down_ok = (_RES_DOWN, _ATTN_DOWN) if attention_ok else (_RES_DOWN,)
    up_ok = (_RES_UP, _ATTN_UP) if attention_ok else (_RES_UP,)
    for level, kind in enumerate(down):
        if kind not in down_ok:
            problems.append(f"down_block_types[{level}]={kind!r} is not supported (expected one of "
                            f"{list(down_ok)}: ADM blocks that resample inside a residual block)")
        elif kind == _ATTN_DOWN:
            attention.append(level)
    for k, kind in enumerate(up):
        level = len(up) - 1 - k
        if kind not in up_ok:
            problems.append(f"up_block_types[{k}]={kind!r} is not supported (expected one of "
                            f"{list(up_ok)})")
            continue
        if level < len(down) and (kind == _ATTN_UP) != (down[level] == _ATTN_DOWN):
            problems.append(f"up_block_types[{k}]={kind!r} and down_block_types[{level}]="
                            f"{down[level]!r} disagree on attention (this UNet attends at the same "
                            "levels on both paths)")
    if not channels or min(channels) <= 0:
        problems.append(f"block_out_channels={channels} must be positive")
        return channels, attention
    base = channels[0]
    if any(c % base for c in channels):
        problems.append(f"block_out_channels={channels} must be multiples of the first ({base}): "
                        "this UNet's widths are base_channels * channel_mult")
    groups = cfg["norm_num_groups"]
    if groups is None or any(c % int(groups) for c in channels):
        problems.append(f"norm_num_groups={groups!r} must divide every block_out_channels "
                        f"{channels}")
    return channels, attention


def _common_checks(cfg: dict, channels: list[int], problems: list[str]) -> None:
    _expect(cfg, "center_input_sample", (False,), problems)
    _expect(cfg, "flip_sin_to_cos", (True,), problems, ": cos before sin")
    _expect(cfg, "freq_shift", (0,), problems)
    _expect(cfg, "time_embedding_type", ("positional",), problems)
    _expect(cfg, "act_fn", ("silu", "swish"), problems)
    _expect(cfg, "norm_eps", (_NORM_EPS,), problems, ": this UNet's GroupNorm epsilon")
    _expect(cfg, "mid_block_scale_factor", (1, 1.0), problems)
    _expect(cfg, "resnet_time_scale_shift", tuple(_SCALE_SHIFT), problems)
    if channels and cfg.get("time_embedding_dim") not in (None, 4 * channels[0]):
        problems.append(f"time_embedding_dim={cfg['time_embedding_dim']} is not supported "
                        f"(this UNet's time embedding is 4 * block_out_channels[0] = "
                        f"{4 * channels[0]} wide)")
    if not 0.0 <= float(cfg.get("dropout") or 0.0) < 1.0:
        problems.append(f"dropout={cfg['dropout']} must be in [0, 1)")


def _sample_size(cfg: dict, levels: int, problems: list[str]) -> int:
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            problems.append(f"sample_size={list(size)} is not square")
            return int(size[0]) if size else 0
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        problems.append(f"sample_size={size!r}: a positive int is needed (the training "
                        "resolution, which sets where attention is)")
        return 0
    if size % 2 ** max(levels - 1, 0):
        problems.append(f"sample_size={size} is not a multiple of 2^(levels - 1) = "
                        f"{2 ** (levels - 1)}")
    return size


def _model_block(channels: list[int], layers: int, size: int, attention: list[int],
                 cfg: dict) -> dict:
    base = channels[0] if channels else 1
    return {
        "base_channels": base,
        "channel_mult": [c // base for c in channels],
        "num_res_blocks": int(layers),
        "attention_resolutions": [size // 2 ** level for level in attention],
        "image_size": size,
        "num_groups": int(cfg["norm_num_groups"] or 32),
        "use_scale_shift_norm": _SCALE_SHIFT.get(cfg["resnet_time_scale_shift"], True),
        "dropout": float(cfg.get("dropout") or 0.0),
        "num_timesteps": NUM_TIMESTEPS,
        "coord_channels": False, "clip_spatial": 0, "text_spatial": 0, "text_depth": 0,
    }


def decoder_config(unet_config: Mapping[str, Any], text_proj_config: Mapping[str, Any]) -> dict:
    """The `model` config block (fields of `unet_from_config`) of Karlo's decoder.

    unet_config: the decoder's config.json (`UNet2DConditionModel`); text_proj_config: the
    text_proj's config.json (`UnCLIPTextProjModel`). Raises KarloConversionError listing every
    unsupported value.
    """
    cfg = _with_defaults(unet_config, _CONDITION_DEFAULTS)
    proj = _with_defaults(text_proj_config, _TEXT_PROJ_DEFAULTS)
    problems = []
    for config, expected in ((unet_config, "UNet2DConditionModel"),
                             (text_proj_config, "UnCLIPTextProjModel")):
        name = dict(config).get("_class_name", expected)
        if name != expected:
            problems.append(f"_class_name={name!r}; expected {expected!r}")
    channels, attention = _levels(cfg, problems, attention_ok=True)
    _common_checks(cfg, channels, problems)
    n = len(channels)
    layers = _uniform(cfg["layers_per_block"], n, "layers_per_block", problems)
    head_dim = _uniform(cfg["attention_head_dim"], n, "attention_head_dim", problems)
    cross = _uniform(cfg["cross_attention_dim"], n, "cross_attention_dim", problems)
    if not isinstance(layers, int) or layers <= 0:
        problems.append(f"layers_per_block={layers!r} must be a positive int")
        layers = 1
    mid = cfg["mid_block_type"]
    if attention and mid != "UNetMidBlock2DSimpleCrossAttn":
        problems.append(f"mid_block_type={mid!r} is not supported (expected "
                        "'UNetMidBlock2DSimpleCrossAttn' with attention in the other blocks)")
    if not attention:
        problems.append("no SimpleCrossAttn block: the decoder's text projection needs attention "
                        "to read its context tokens")
    if cfg.get("num_attention_heads") is not None:
        problems.append(f"num_attention_heads={cfg['num_attention_heads']!r} is not supported "
                        "(SimpleCrossAttn blocks take channels / attention_head_dim heads)")
    if not isinstance(head_dim, int) or head_dim <= 0:
        problems.append(f"attention_head_dim={head_dim!r} must be a positive int")
    else:
        for level in attention + ([n - 1] if attention else []):
            if level < n and channels[level] % head_dim:
                problems.append(f"block_out_channels[{level}]={channels[level]} is not divisible "
                                f"by attention_head_dim={head_dim}")
    for name, allowed, why in (
            ("class_embed_type", ("identity",), ": the text projection's time-embedding term is "
                                                "added as class_labels"),
            ("only_cross_attention", (False,), ""),
            ("mid_block_only_cross_attention", (None, False), ""),
            ("cross_attention_norm", (None,), ""), ("dual_cross_attention", (False,), ""),
            ("encoder_hid_dim", (None,), ""), ("encoder_hid_dim_type", (None,), ""),
            ("addition_embed_type", (None,), ""), ("num_class_embeds", (None,), ""),
            ("time_embedding_act_fn", (None,), ""), ("timestep_post_act", (None,), ""),
            ("time_cond_proj_dim", (None,), ""), ("class_embeddings_concat", (False,), ""),
            ("resnet_skip_time_act", (False,), ""), ("resnet_out_scale_factor", (1.0,), ""),
            ("conv_in_kernel", (3,), ""), ("conv_out_kernel", (3,), ""),
            ("attention_type", ("default",), "")):
        _expect(cfg, name, allowed, problems, why)
    in_ch, out_ch = int(cfg["in_channels"]), int(cfg["out_channels"])
    if out_ch not in (in_ch, 2 * in_ch):
        problems.append(f"out_channels={out_ch} must be in_channels={in_ch} or twice it (learned "
                        "variance)")
    size = _sample_size(cfg, n, problems)
    clip_dim = int(proj["clip_embeddings_dim"])
    tokens = int(proj["clip_extra_context_tokens"])
    if clip_dim <= 0 or tokens < 0:
        problems.append(f"text_proj clip_embeddings_dim={clip_dim} and clip_extra_context_tokens="
                        f"{tokens} must be positive")
    if channels and proj.get("time_embed_dim") != 4 * channels[0]:
        problems.append(f"text_proj time_embed_dim={proj.get('time_embed_dim')!r}; the decoder's "
                        f"time embedding is 4 * block_out_channels[0] = {4 * channels[0]}")
    if proj.get("cross_attention_dim") != cross:
        problems.append(f"text_proj cross_attention_dim={proj.get('cross_attention_dim')!r} "
                        f"differs from the decoder's cross_attention_dim={cross!r}")
    if problems:
        raise KarloConversionError("the Karlo decoder config", problems)
    model = _model_block(channels, layers, size, attention, cfg)
    model.update({
        "head_channels": int(head_dim), "num_heads": 1,
        "image_channels": in_ch, "learned_variance": out_ch == 2 * in_ch,
        "low_res_conditioning": False,
        "clip_dim": clip_dim, "clip_tokens": tokens, "clip_scale": 1.0,
        "clip_text_width": clip_dim, "context_dim": int(cross),
    })
    return model


def super_res_config(unet_config: Mapping[str, Any]) -> dict:
    """The `model` config block of one of Karlo's upsamplers (`super_res_first` or
    `super_res_last`, `UNet2DModel`). Raises KarloConversionError listing every unsupported value.
    """
    cfg = _with_defaults(unet_config, _MODEL_DEFAULTS)
    problems = []
    name = dict(unet_config).get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        problems.append(f"_class_name={name!r}; expected 'UNet2DModel'")
    channels, _ = _levels(cfg, problems, attention_ok=False)
    _common_checks(cfg, channels, problems)
    _expect(cfg, "mid_block_type", ("UNetMidBlock2D",), problems)
    _expect(cfg, "add_attention", (False,), problems, ": the upsamplers are convolutional")
    _expect(cfg, "class_embed_type", (None,), problems)
    _expect(cfg, "num_class_embeds", (None,), problems)
    layers = cfg["layers_per_block"]
    if not isinstance(layers, int) or layers <= 0:
        problems.append(f"layers_per_block={layers!r} must be a positive int")
        layers = 1
    in_ch, out_ch = int(cfg["in_channels"]), int(cfg["out_channels"])
    image = in_ch // 2
    if in_ch % 2 or out_ch not in (image, 2 * image):
        problems.append(f"in_channels={in_ch}, out_channels={out_ch}: expected the noisy image and "
                        "the upsampled low-resolution image on channels (in = 2 * image channels) "
                        "and out = image channels (or twice, learned variance)")
    size = _sample_size(cfg, len(channels), problems)
    if problems:
        raise KarloConversionError("the Karlo super-resolution config", problems)
    model = _model_block(channels, layers, size, [], cfg)
    model.update({
        "head_channels": 0, "num_heads": 1, "image_channels": image,
        "learned_variance": out_ch == 2 * image,
        "low_res_conditioning": True, "low_res_resize": "bicubic",
        "clip_dim": 0, "clip_text_width": 0, "context_dim": 0,
    })
    return model


# -------------------------------------------------------------------------------------------------
# Tensors.
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    shape: tuple[int, ...]
    path: tuple[str, ...]
    convert: Callable[[np.ndarray], np.ndarray]


def _same(w):
    return w


def _linear(w):  # [out, in] -> [in, out]
    return w.T


def _conv(w):  # OIHW -> HWIO
    return w.transpose(2, 3, 1, 0)


def _add_linear(e: dict, name: str, path: tuple, n_in: int, n_out: int) -> None:
    e[f"{name}.weight"] = _Entry((n_out, n_in), path + ("kernel",), _linear)
    e[f"{name}.bias"] = _Entry((n_out,), path + ("bias",), _same)


def _add_norm(e: dict, name: str, path: tuple, width: int) -> None:
    e[f"{name}.weight"] = _Entry((width,), path + ("scale",), _same)
    e[f"{name}.bias"] = _Entry((width,), path + ("bias",), _same)


def _add_conv(e: dict, name: str, path: tuple, n_in: int, n_out: int, k: int) -> None:
    e[f"{name}.weight"] = _Entry((n_out, n_in, k, k), path + ("kernel",), _conv)
    e[f"{name}.bias"] = _Entry((n_out,), path + ("bias",), _same)


def _add_resnet(e: dict, name: str, ours: str, n_in: int, n_out: int, emb: int,
                scale_shift: bool) -> None:
    p = (ours,)
    _add_norm(e, f"{name}.norm1", p + ("in_norm",), n_in)
    _add_conv(e, f"{name}.conv1", p + ("in_conv",), n_in, n_out, 3)
    _add_linear(e, f"{name}.time_emb_proj", p + ("emb_proj",), emb,
                2 * n_out if scale_shift else n_out)
    _add_norm(e, f"{name}.norm2", p + ("out_norm",), n_out)
    _add_conv(e, f"{name}.conv2", p + ("out_conv",), n_out, n_out, 3)
    if n_in != n_out:
        _add_conv(e, f"{name}.conv_shortcut", p + ("skip_conv",), n_in, n_out, 1)


def _add_attention(e: dict, name: str, ours: str, width: int, head_dim: int, context: int) -> None:
    p, heads = (ours,), width // head_dim
    _add_norm(e, f"{name}.group_norm", p + ("norm",), width)
    for theirs, mine, n_in in (("to_q", "q_proj", width), ("to_k", "k_proj", width),
                               ("to_v", "v_proj", width), ("add_k_proj", "context_k_proj", context),
                               ("add_v_proj", "context_v_proj", context)):
        e[f"{name}.{theirs}.weight"] = _Entry(
            (width, n_in), p + (mine, "kernel"),
            lambda w, n=n_in: w.T.reshape(n, heads, head_dim))
        e[f"{name}.{theirs}.bias"] = _Entry((width,), p + (mine, "bias"),
                                            lambda b: b.reshape(heads, head_dim))
    e[f"{name}.to_out.0.weight"] = _Entry((width, width), p + ("out_proj_kernel",),
                                          lambda w: w.T.reshape(heads, head_dim, width))
    e[f"{name}.to_out.0.bias"] = _Entry((width,), p + ("out_proj_bias",), _same)


def unet_tensors(model: Mapping[str, Any]) -> dict[str, _Entry]:
    """Every tensor of the diffusers UNet (UNet2DConditionModel or UNet2DModel) that `model` (a
    config block from `decoder_config` / `super_res_config`) describes: diffusers name ->
    (diffusers shape, path in the params, layout conversion)."""
    base, mults = int(model["base_channels"]), [int(m) for m in model["channel_mult"]]
    blocks, size = int(model["num_res_blocks"]), int(model["image_size"])
    emb = 4 * base
    scale_shift = bool(model.get("use_scale_shift_norm", True))
    head_dim = int(model.get("head_channels") or 0)
    context = int(model.get("context_dim") or 0)
    attention = {size // r for r in model.get("attention_resolutions", ())}
    image = int(model.get("image_channels", 3))
    in_ch = image * (2 if model.get("low_res_conditioning") else 1)
    out_ch = image * (2 if model.get("learned_variance") else 1)
    levels = len(mults)

    e: dict[str, _Entry] = {}
    _add_linear(e, "time_embedding.linear_1", ("time_embed_fc1",), base, emb)
    _add_linear(e, "time_embedding.linear_2", ("time_embed_fc2",), emb, emb)
    _add_conv(e, "conv_in", ("input_conv",), in_ch, base * mults[0], 3)
    skips = [base * mults[0]]
    width = base * mults[0]
    for level, mult in enumerate(mults):
        for i in range(blocks):
            _add_resnet(e, f"down_blocks.{level}.resnets.{i}", f"down_{level}_res_{i}", width,
                        base * mult, emb, scale_shift)
            width = base * mult
            if 2 ** level in attention:
                _add_attention(e, f"down_blocks.{level}.attentions.{i}", f"down_{level}_attn_{i}",
                               width, head_dim, context)
            skips.append(width)
        if level != levels - 1:
            _add_resnet(e, f"down_blocks.{level}.downsamplers.0", f"down_{level}_downsample",
                        width, width, emb, scale_shift)
            skips.append(width)
    _add_resnet(e, "mid_block.resnets.0", "middle_res_0", width, width, emb, scale_shift)
    if attention:
        _add_attention(e, "mid_block.attentions.0", "middle_attn", width, head_dim, context)
    _add_resnet(e, "mid_block.resnets.1", "middle_res_1", width, width, emb, scale_shift)
    for k, (level, mult) in enumerate(reversed(list(enumerate(mults)))):
        for i in range(blocks + 1):
            n_in = width + skips.pop()
            _add_resnet(e, f"up_blocks.{k}.resnets.{i}", f"up_{level}_res_{i}", n_in, base * mult,
                        emb, scale_shift)
            width = base * mult
            if 2 ** level in attention:
                _add_attention(e, f"up_blocks.{k}.attentions.{i}", f"up_{level}_attn_{i}", width,
                               head_dim, context)
        if level:
            _add_resnet(e, f"up_blocks.{k}.upsamplers.0", f"up_{level}_upsample", width, width,
                        emb, scale_shift)
    _add_norm(e, "conv_norm_out", ("out_norm",), width)
    _add_conv(e, "conv_out", ("out_conv",), width, out_ch, 3)
    return e


def text_proj_tensors(model: Mapping[str, Any]) -> dict[str, _Entry]:
    """Every tensor of the `UnCLIPTextProjModel` that goes with the decoder `model`."""
    d, n = int(model["clip_dim"]), int(model["clip_tokens"])
    width, emb = int(model["context_dim"]), 4 * int(model["base_channels"])
    hidden = int(model["clip_text_width"])

    def token_rows(w):
        # diffusers reads token j, channel c from output row c * n + j; here row j * width + c.
        return w.reshape(width, n, *w.shape[1:]).swapaxes(0, 1).reshape(n * width, *w.shape[1:])

    e: dict[str, _Entry] = {}
    e["learned_classifier_free_guidance_embeddings"] = _Entry((d,), ("null_z_i",), _same)
    _add_linear(e, "clip_image_embeddings_project_to_time_embeddings", ("clip_emb_proj",), d, emb)
    _add_linear(e, "embedding_proj", ("clip_text_emb_proj",), d, emb)
    if n:
        e["clip_extra_context_tokens_proj.weight"] = _Entry(
            (n * width, d), ("clip_tokens_proj", "kernel"), lambda w: token_rows(w).T)
        e["clip_extra_context_tokens_proj.bias"] = _Entry(
            (n * width,), ("clip_tokens_proj", "bias"), token_rows)
    _add_linear(e, "encoder_hidden_states_proj", ("clip_text_seq_proj",), hidden, width)
    _add_norm(e, "text_encoder_hidden_states_norm", ("clip_text_seq_norm",), width)
    return e


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (any dtype, any device), without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in getattr(value, "shape", np.shape(value)))


def check_tensors(state: Mapping[str, Any], entries: dict[str, _Entry], what: str) -> list[str]:
    """Every missing, mis-shaped or unexpected tensor of `state` (names -> arrays or tensors) as
    `entries` (`unet_tensors` / `text_proj_tensors`) expect them, each prefixed by `what`."""
    problems = []
    for name, entry in entries.items():
        if name not in state:
            problems.append(f"{what}: missing tensor {name} (expected shape {list(entry.shape)})")
        elif _shape(state[name]) != entry.shape:
            problems.append(f"{what}: tensor {name} has shape {list(_shape(state[name]))}; the "
                            f"config implies {list(entry.shape)}")
    for name in sorted(set(state) - set(entries)):
        problems.append(f"{what}: unexpected tensor {name} {list(_shape(state[name]))}")
    return problems


def _convert(parts: list[tuple[Mapping[str, Any], dict[str, _Entry]]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for state, entries in parts:
        for name, entry in entries.items():
            node = tree
            for key in entry.path[:-1]:
                node = node.setdefault(key, {})
            node[entry.path[-1]] = np.array(entry.convert(_as_numpy(state[name])), np.float32,
                                            order="C")
    return tree


def convert_decoder(unet_state_dict: Mapping[str, Any], text_proj_state_dict: Mapping[str, Any],
                    unet_config: Mapping[str, Any], text_proj_config: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Karlo's decoder UNet + text projection -> this UNet's params (nested dict, float32 numpy).

    The configs are the diffusers config.json dicts that `decoder_config` reads (the tensors'
    shapes and the attention heads come from them: head splits are not visible in the weights).
    Raises KarloConversionError listing every unsupported config value, or else every missing,
    unexpected or mis-shaped tensor of both state dicts.
    """
    model = decoder_config(unet_config, text_proj_config)
    unet, proj = unet_tensors(model), text_proj_tensors(model)
    problems = (check_tensors(unet_state_dict, unet, "decoder")
                + check_tensors(text_proj_state_dict, proj, "text_proj"))
    if problems:
        raise KarloConversionError("the Karlo decoder weights", problems)
    return _convert([(unet_state_dict, unet), (text_proj_state_dict, proj)])


def convert_super_res(unet_state_dict: Mapping[str, Any], unet_config: Mapping[str, Any]
                      ) -> dict[str, Any]:
    """One of Karlo's upsamplers (`super_res_first` / `super_res_last`) -> this UNet's params.

    `unet_config` is its diffusers config.json dict (see `super_res_config`). Raises
    KarloConversionError listing every unsupported config value, or else every missing,
    unexpected or mis-shaped tensor.
    """
    entries = unet_tensors(super_res_config(unet_config))
    problems = check_tensors(unet_state_dict, entries, "super_res")
    if problems:
        raise KarloConversionError("the Karlo super-resolution weights", problems)
    return _convert([(unet_state_dict, entries)])
