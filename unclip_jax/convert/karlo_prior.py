"""Imports the prior of Kakao Brain's Karlo (diffusers' `PriorTransformer`) into `models.prior`.

    block = karlo_prior.prior_config(json.load(open("karlo-v1-alpha/prior/config.json")))
    sizes = karlo_prior.prior_sizes(diffusers_config)      # embed_dim, text_width, text_length
    model = prior_from_config({**run_settings, **block}, **sizes)
    params = karlo_prior.convert_prior(state_dict, diffusers_config)   # numpy, float32

`state_dict` maps diffusers' tensor names to numpy arrays (e.g. read from the prior's
`diffusion_pytorch_model.safetensors` with `safetensors.numpy.load_file`); nothing here imports
torch or diffusers. Missing config.json entries take `PriorTransformer`'s defaults (diffusers
0.42), which are Karlo's.

Supported: `PriorTransformer` as Karlo configures it - a causal transformer over [text hidden
states (num_embeddings) | z_t | timestep | z_i | prd query] with learned positions
(additional_embeddings 4), linear text projection, the "prd" query token, no input norms, no
dropout, SiLU timestep MLP, output of the embedding size. It maps onto `DiffusionPrior` with
`null_conditioning=False` (Karlo has no learned null tokens: its guidance runs the empty caption)
and `embedding_stats=True` (clip_mean / clip_std become params of the prior, used by
`DiffusionPrior.denormalize_embedding`; see the module docstring of `models.prior`).

Where clip_mean / clip_std go, and how sampling uses them: the prior predicts x0 in the
standardised space (z - clip_mean) / clip_std, and its z_i_t input is in that space. Karlo's
pipeline samples there and applies `x0 * clip_std + clip_mean` once to the final sample; a sampler
of this project does the same with `model.apply(params, x0, method=model.denormalize_embedding)`.
Karlo's z_t (`proj_embedding`) is the CLIP text tower's projected embedding as is (not unit
normalised, not rescaled), its text hidden states the tower's last hidden state (after the final
LayerNorm), and its mask the tokenizer's attention mask (= `layers.text_mask`); the de-normalised
sample is fed to the decoder as is (not unit normalised).

Name mapping (diffusers -> here; linear weights transposed, attention weights split into heads):

    encoder_hidden_states_proj / embedding_proj / proj_in  -> text_proj / z_t_proj / z_i_proj
    time_embedding.linear_1 / linear_2                     -> time_embed_fc1 / time_embed_fc2
    positional_embedding [1, L + 4, W]                     -> position_embedding [L + 4, W]
    prd_embedding [1, 1, W]                                -> query [W]
    transformer_blocks.{i}.norm1 / norm3                   -> transformer/layers_{i}/layer_norm1 / 2
    transformer_blocks.{i}.attn1.to_{q,k,v} / to_out.0     -> .../self_attn/{q,k,v}_proj / out_proj
    transformer_blocks.{i}.ff.net.0.proj / ff.net.2        -> .../mlp/fc1 / fc2
    norm_out / proj_to_clip_embeddings                     -> ln_final / out_proj
    clip_mean / clip_std [1, D]                            -> clip_mean / clip_std [D]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from unclip_jax.convert import ConversionError, nest

# `PriorTransformer.__init__` defaults (diffusers 0.42): Karlo's prior.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 768,
    "num_embeddings": 77, "additional_embeddings": 4, "dropout": 0.0, "time_embed_act_fn": "silu",
    "norm_in_type": None, "embedding_proj_norm_type": None, "encoder_hid_proj_type": "linear",
    "added_emb_type": "prd", "time_embed_dim": None, "embedding_proj_dim": None,
    "clip_embed_dim": None,
}
CLASS_NAME = "PriorTransformer"
MLP_RATIO = 4.0  # diffusers' FeedForward (mult=4) with activation_fn="gelu": exact (erf) GELU.
# Non-persistent buffers that a state dict taken with `state_dict()` of an older version may hold.
IGNORED_TENSORS = ("causal_attention_mask",)


class KarloPriorError(ConversionError):
    """A diffusers prior config or state dict does not fit `DiffusionPrior`: lists every problem."""

    def __init__(self, what: str, problems: list[str]):
        super().__init__(f"the Karlo prior {what}", problems)


def _resolved(diffusers_config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config with diffusers' defaults filled in, and the problems found."""
    problems = []
    raw = dict(diffusers_config)
    name = raw.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        problems.append(f"_class_name is {name!r}; expected {CLASS_NAME!r}")
    unknown = sorted(k for k in raw if not str(k).startswith("_") and k not in DIFFUSERS_DEFAULTS)
    for key in unknown:
        problems.append(f"unknown field {key}={raw[key]!r} (not a PriorTransformer argument of "
                        "diffusers 0.42; its meaning is not known here)")
    cfg = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in raw.items() if k in DIFFUSERS_DEFAULTS}}
    for key in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim",
                "num_embeddings", "additional_embeddings"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            problems.append(f"{key}={value!r}: expected a positive integer")
    for key in ("time_embed_dim", "embedding_proj_dim", "clip_embed_dim"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value <= 0):
            problems.append(f"{key}={value!r}: expected a positive integer or null")
    return cfg, problems


def _architecture_problems(cfg: dict[str, Any]) -> list[str]:
    problems = []
    if cfg["additional_embeddings"] != 4:
        problems.append(f"additional_embeddings={cfg['additional_embeddings']}: only 4 (z_t, "
                        "timestep, z_i, prd query) is supported")
    if cfg["dropout"]:
        problems.append(f"dropout={cfg['dropout']}: only 0.0 is supported")
    if cfg["time_embed_act_fn"] not in ("silu", "swish"):
        problems.append(f"time_embed_act_fn={cfg['time_embed_act_fn']!r}: only 'silu' is supported")
    if cfg["norm_in_type"] is not None:
        problems.append(f"norm_in_type={cfg['norm_in_type']!r}: only null (no input LayerNorm) is "
                        "supported")
    if cfg["embedding_proj_norm_type"] is not None:
        problems.append(f"embedding_proj_norm_type={cfg['embedding_proj_norm_type']!r}: only null "
                        "is supported")
    if cfg["encoder_hid_proj_type"] != "linear":
        problems.append(f"encoder_hid_proj_type={cfg['encoder_hid_proj_type']!r}: only 'linear' "
                        "(text hidden states as conditioning) is supported")
    if cfg["added_emb_type"] != "prd":
        problems.append(f"added_emb_type={cfg['added_emb_type']!r}: only 'prd' (the learned query "
                        "token whose output is the prediction) is supported")
    d = cfg["embedding_dim"]
    for key in ("embedding_proj_dim", "clip_embed_dim"):
        if cfg[key] is not None and cfg[key] != d:
            problems.append(f"{key}={cfg[key]}: only null or embedding_dim ({d}) is supported")
    return problems


def prior_config(diffusers_config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers `PriorTransformer` config.json -> the `model` block for `prior_from_config`.

    Architecture fields only (width, depth, num_heads, head_dim, mlp_ratio, activation, dropout,
    num_timesteps, null_conditioning, embedding_stats, time_embed_dim): run settings (dtype,
    scan_layers, remat_policy, ...) come from the caller's template. The sizes the prior reads
    from its CLIP are `prior_sizes`. Raises KarloPriorError listing every unsupported value.
    """
    cfg, problems = _resolved(diffusers_config)
    problems += _architecture_problems(cfg)
    if problems:
        raise KarloPriorError("config", problems)
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    width = heads * head_dim
    return {
        "width": width, "depth": int(cfg["num_layers"]), "num_heads": heads, "head_dim": head_dim,
        "mlp_ratio": MLP_RATIO, "activation": "gelu", "dropout": 0.0,
        # diffusers embeds the step index as is: a 1000-step model here (no rescaling).
        "num_timesteps": 1000,
        "null_conditioning": False, "embedding_stats": True,
        "time_embed_dim": int(cfg["time_embed_dim"] or width),
    }


def prior_sizes(diffusers_config: Mapping[str, Any]) -> dict[str, int]:
    """The CLIP-dependent sizes of `prior_from_config`: embed_dim (D), text_width (the text
    tower's width, = embedding_dim in diffusers) and text_length (num_embeddings)."""
    cfg, problems = _resolved(diffusers_config)
    if problems:
        raise KarloPriorError("config", problems)
    d = int(cfg["embedding_dim"])
    return {"embed_dim": d, "text_width": d, "text_length": int(cfg["num_embeddings"])}


# ---------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    shape: tuple[int, ...]
    path: tuple[str, ...]
    convert: Callable[[np.ndarray], np.ndarray]


def _linear(e: dict, name: str, path: tuple[str, ...], fan_in: int, fan_out: int) -> None:
    e[f"{name}.weight"] = _Entry((fan_out, fan_in), path + ("kernel",), lambda w: w.T)
    e[f"{name}.bias"] = _Entry((fan_out,), path + ("bias",), lambda b: b)


def _norm(e: dict, name: str, path: tuple[str, ...], width: int) -> None:
    e[f"{name}.weight"] = _Entry((width,), path + ("scale",), lambda w: w)
    e[f"{name}.bias"] = _Entry((width,), path + ("bias",), lambda b: b)


def expected_tensors(diffusers_config: Mapping[str, Any]) -> dict[str, _Entry]:
    """Every tensor of a `PriorTransformer` of this (supported) config: name -> (diffusers shape,
    our param path, layout conversion)."""
    block = prior_config(diffusers_config)
    sizes = prior_sizes(diffusers_config)
    w, h, hd = block["width"], block["num_heads"], block["head_dim"]
    d, length, hidden = sizes["embed_dim"], sizes["text_length"], int(round(w * MLP_RATIO))
    t_hidden = block["time_embed_dim"]
    e: dict[str, _Entry] = {}
    _linear(e, "time_embedding.linear_1", ("time_embed_fc1",), w, t_hidden)
    _linear(e, "time_embedding.linear_2", ("time_embed_fc2",), t_hidden, w)
    _linear(e, "proj_in", ("z_i_proj",), d, w)
    _linear(e, "embedding_proj", ("z_t_proj",), d, w)
    _linear(e, "encoder_hidden_states_proj", ("text_proj",), sizes["text_width"], w)
    e["positional_embedding"] = _Entry((1, length + 4, w), ("position_embedding",),
                                       lambda p: p.reshape(p.shape[1:]))
    e["prd_embedding"] = _Entry((1, 1, w), ("query",), lambda p: p.reshape(-1))
    for i in range(block["depth"]):
        src, dst = f"transformer_blocks.{i}", ("transformer", f"layers_{i}")
        _norm(e, f"{src}.norm1", dst + ("layer_norm1",), w)
        _norm(e, f"{src}.norm3", dst + ("layer_norm2",), w)
        for theirs, ours in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj")):
            e[f"{src}.attn1.{theirs}.weight"] = _Entry(
                (h * hd, w), dst + ("self_attn", ours, "kernel"),
                lambda m: m.T.reshape(m.shape[1], h, hd))
            e[f"{src}.attn1.{theirs}.bias"] = _Entry(
                (h * hd,), dst + ("self_attn", ours, "bias"), lambda b: b.reshape(h, hd))
        e[f"{src}.attn1.to_out.0.weight"] = _Entry(
            (w, h * hd), dst + ("self_attn", "out_proj", "kernel"),
            lambda m: m.T.reshape(h, hd, m.shape[0]))
        e[f"{src}.attn1.to_out.0.bias"] = _Entry((w,), dst + ("self_attn", "out_proj", "bias"),
                                                 lambda b: b)
        _linear(e, f"{src}.ff.net.0.proj", dst + ("mlp", "fc1"), w, hidden)
        _linear(e, f"{src}.ff.net.2", dst + ("mlp", "fc2"), hidden, w)
    _norm(e, "norm_out", ("ln_final",), w)
    _linear(e, "proj_to_clip_embeddings", ("out_proj",), w, d)
    e["clip_mean"] = _Entry((1, d), ("clip_mean",), lambda s: s.reshape(-1))
    e["clip_std"] = _Entry((1, d), ("clip_std",), lambda s: s.reshape(-1))
    return e


def convert_prior(state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any], *,
                  scan_layers: bool = True) -> dict[str, Any]:
    """diffusers `PriorTransformer` weights -> the params of `prior_from_config(prior_config(...))`.

    state_dict: tensor name -> array (numpy, or anything `np.asarray` takes; float16 / bfloat16
    are widened to float32). diffusers_config: the prior's config.json. scan_layers: stack the
    blocks under `transformer/layers` (the module's default) instead of `layers_0..n-1`.
    Returns a nested dict of float32 numpy arrays (no logical-axis boxes). Raises KarloPriorError
    listing every unsupported config value, missing, unexpected or mis-shaped tensor, and a
    clip_std that is not positive and finite everywhere (a prior whose statistics were never set).
    """
    entries = expected_tensors(diffusers_config)
    problems = []
    for name, entry in entries.items():
        if name not in state_dict:
            problems.append(f"missing tensor {name} (expected shape {list(entry.shape)})")
            continue
        shape = tuple(np.shape(state_dict[name]))
        if shape != entry.shape:
            problems.append(f"tensor {name} has shape {list(shape)}; the config implies "
                            f"{list(entry.shape)}")
    for name in sorted(set(state_dict) - set(entries) - set(IGNORED_TENSORS)):
        problems.append(f"unexpected tensor {name} {list(np.shape(state_dict[name]))} (not part of "
                        "a PriorTransformer with this config)")
    if "clip_std" in state_dict and tuple(np.shape(state_dict["clip_std"])) == entries["clip_std"].shape:
        std = np.asarray(state_dict["clip_std"], np.float32)
        if not np.all(np.isfinite(std) & (std > 0)):
            problems.append("clip_std is not positive and finite everywhere (diffusers initialises it "
                            "to zeros: these weights hold no embedding statistics)")
    if problems:
        raise KarloPriorError("weights", problems)
    params = nest({entry.path: np.array(entry.convert(np.asarray(state_dict[name], np.float32)),
                                         np.float32, order="C")
                    for name, entry in entries.items()})
    if scan_layers:
        blocks = params["transformer"]
        depth = len(blocks)
        stacked = {}
        _stack_into(stacked, [blocks[f"layers_{i}"] for i in range(depth)])
        params["transformer"] = {"layers": stacked}
    return params


def _stack_into(out: dict[str, Any], trees: list[dict[str, Any]]) -> None:
    for key, first in trees[0].items():
        if isinstance(first, dict):
            out[key] = {}
            _stack_into(out[key], [t[key] for t in trees])
        else:
            out[key] = np.stack([t[key] for t in trees])
