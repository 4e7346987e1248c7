"""Imports a Hugging Face CLIP model directory into this project's CLIP (`unclip_jax.models.clip`).

    imported = hf_clip.read_hf_clip("clip-vit-large-patch14")     # config, params, preprocessing
    hf_clip.write_clip_workdir("clip-vit-large-patch14", "runs/clip_l14", config)

A Hugging Face `CLIPModel` directory holds `config.json`, the weights as `model.safetensors` (or
shards listed in `model.safetensors.index.json`), the tokenizer (`tokenizer.json` and/or
`vocab.json` + `merges.txt`) and usually `preprocessor_config.json`. Weights are read with the
`safetensors` package into numpy: never unpickled (a directory with only `pytorch_model.bin` or
other pickles is refused). Float16 and bfloat16 weights are widened to float32.

Supported: the published OpenAI / LAION shapes (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14-336,
ViT-H/14, and any other size of the same architecture): pre-LN transformers with quick-GELU, GELU or
tanh-GELU, class-token pooling, learned position embeddings, bias-free projections, learned logit
scale, the same MLP ratio and activation in both towers, LayerNorm epsilon 1e-5.

`write_clip_workdir` writes a directory that every consumer of a trained CLIP accepts (the
`clip_workdir` of the prior and decoder configs, `embed.py`, `stages.load`): `config.json`
(a CLIP stage config with the imported sizes and preprocessing), `stage.json`, `tokenizer/` and an
orbax checkpoint at step 0 under `checkpoints/` whose params and EMA params are both the imported
weights (no optimiser state: fine-tune from it with `train.init_from`).

Name mapping (Hugging Face -> here; linear weights are transposed, attention weights split into
heads, the patch convolution goes from OIHW to HWIO):

    vision_model.embeddings.{patch_embedding, class_embedding, position_embedding}
        -> vision_model/{patch_embedding/kernel, class_embedding, position_embedding}
    vision_model.pre_layrnorm / post_layernorm     -> vision_model/ln_pre, ln_post
    text_model.embeddings.{token_embedding, position_embedding}
        -> text_model/{token_embedding/embedding, position_embedding}
    text_model.final_layer_norm                    -> text_model/ln_final
    *.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}
        -> */encoder/layers_{i}/... (the same names)
    visual_projection, text_projection, logit_scale -> the same names
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
from typing import Any, Callable

import numpy as np

from unclip_jax.convert import ConversionError, nest, new_directory, write_imported

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_DIR = "tokenizer"

# Hugging Face `hidden_act` -> this project's activation names (`models.layers`).
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
LAYER_NORM_EPS = 1e-5  # What `models.layers.LayerNorm` computes with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's filter codes, as `preprocessor_config.json` stores `resample`.
PIL_RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Files that hold pickles (arbitrary code when loaded): never opened here.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# Non-persistent buffers that older transformers versions saved: arange(n), not weights.
IGNORED_SUFFIXES = (".embeddings.position_ids",)


class CheckpointMismatchError(ConversionError):
    """A checkpoint directory does not fit this CLIP: lists every difference found."""

    def __init__(self, hf_dir: str, problems: list[str]):
        super().__init__(f"the CLIP checkpoint in {hf_dir}", problems)


@dataclasses.dataclass
class HFClip:
    """What `read_hf_clip` found: model fields, preprocessing and (converted) params.

    model: fields of a CLIP `config.model` block (`clip_model_from_config` names) plus
      `eot_pooling`; preprocess: the `config.preprocess` block (resize_size, crop_size, resample,
      mean, std); params: the param tree of `models.clip.CLIP` (numpy float32, layers unrolled), or
      None when only the config was read; hf: a few raw Hugging Face values (vocab_size,
      eos_token_id) that the tokenizer is checked against.
    """

    hf_dir: str
    model: dict[str, Any]
    preprocess: dict[str, Any]
    params: dict[str, Any] | None
    hf: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# config.json and preprocessor_config.json
# ---------------------------------------------------------------------------------------------
def _check_dir(hf_dir: str) -> str:
    hf_dir = os.path.abspath(os.path.expanduser(os.fspath(hf_dir)))
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"Hugging Face CLIP directory {hf_dir} does not exist")
    if not os.path.isfile(os.path.join(hf_dir, CONFIG_FILE)):
        raise FileNotFoundError(f"{hf_dir} has no {CONFIG_FILE}: expected a Hugging Face CLIPModel "
                                f"directory (config.json, model.safetensors, tokenizer files)")
    return hf_dir


def read_model_config(hf_dir: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """config.json -> (CLIP `config.model` fields, raw HF values, problems found).

    Missing entries take Hugging Face's defaults (`transformers.CLIPConfig`), as loading with
    transformers would.
    """
    from transformers import CLIPConfig

    hf_dir = _check_dir(hf_dir)
    path = os.path.join(hf_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if raw.get("model_type") == "clip_text_model":
        return _read_text_model_config(hf_dir, raw)
    if raw.get("model_type") != "clip":
        raise CheckpointMismatchError(hf_dir, [
            f"{CONFIG_FILE}: model_type is {raw.get('model_type')!r}; expected 'clip' (a CLIPModel "
            "with both towers) or 'clip_text_model' (a CLIPTextModelWithProjection: the text "
            "encoder alone); vision-only checkpoints, SigLIP, Chinese-CLIP, ... are not supported"])
    cfg = CLIPConfig.from_dict(raw)
    text, vision = cfg.text_config, cfg.vision_config
    problems = []
    activations = {}
    for name, tower in (("text_config", text), ("vision_config", vision)):
        act = tower.hidden_act
        if act not in ACTIVATIONS:
            problems.append(f"{CONFIG_FILE}: {name}.hidden_act={act!r} is not supported (expected "
                            f"one of {sorted(ACTIVATIONS)})")
        else:
            activations[name] = ACTIVATIONS[act]
        eps = float(tower.layer_norm_eps)
        if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
            problems.append(f"{CONFIG_FILE}: {name}.layer_norm_eps={eps} (this CLIP computes "
                            f"LayerNorm with {LAYER_NORM_EPS})")
        if tower.hidden_size % tower.num_attention_heads:
            problems.append(f"{CONFIG_FILE}: {name}.hidden_size={tower.hidden_size} is not divisible "
                            f"by num_attention_heads={tower.num_attention_heads}")
    if len(set(activations.values())) > 1:
        problems.append(f"{CONFIG_FILE}: the towers use different activations "
                        f"({text.hidden_act!r} text, {vision.hidden_act!r} vision); this CLIP has one")
    mlp_ratio = vision.intermediate_size / vision.hidden_size
    if int(round(text.hidden_size * mlp_ratio)) != text.intermediate_size:
        problems.append(
            f"{CONFIG_FILE}: the MLP ratios differ (vision {vision.intermediate_size}/"
            f"{vision.hidden_size}, text {text.intermediate_size}/{text.hidden_size}); this CLIP "
            "uses one mlp_ratio for both towers")
    if vision.image_size % vision.patch_size:
        problems.append(f"{CONFIG_FILE}: vision_config.image_size={vision.image_size} is not a "
                        f"multiple of patch_size={vision.patch_size}")
    if getattr(vision, "num_channels", 3) != 3:
        problems.append(f"{CONFIG_FILE}: vision_config.num_channels={vision.num_channels}; "
                        "expected 3 (RGB)")
    model = {
        "embed_dim": int(cfg.projection_dim),
        "image_size": int(vision.image_size), "patch_size": int(vision.patch_size),
        "vision_width": int(vision.hidden_size), "vision_depth": int(vision.num_hidden_layers),
        "vision_heads": int(vision.num_attention_heads),
        "text_width": int(text.hidden_size), "text_depth": int(text.num_hidden_layers),
        "text_heads": int(text.num_attention_heads),
        "context_length": int(text.max_position_embeddings),
        "mlp_ratio": float(mlp_ratio),
        "activation": activations.get("vision_config", activations.get("text_config", "quick_gelu")),
        # transformers pools the text at argmax(ids) when eos_token_id is the legacy 2, else at
        # the first eos_token_id.
        "eot_pooling": "argmax" if text.eos_token_id == 2 else "eot_id",
    }
    hf = {"vocab_size": int(text.vocab_size), "eos_token_id": int(text.eos_token_id),
          "text_intermediate_size": int(text.intermediate_size),
          "vision_intermediate_size": int(vision.intermediate_size)}
    return model, hf, problems


def _read_text_model_config(hf_dir: str, raw: dict[str, Any]) -> tuple[dict, dict, list[str]]:
    """A `CLIPTextModelWithProjection` config.json (e.g. Karlo's `text_encoder/`): the text tower
    and its projection, as a CLIP with no image tower (`vision_depth=0`)."""
    from transformers import CLIPTextConfig

    text = CLIPTextConfig.from_dict(raw)
    problems = []
    if text.hidden_act not in ACTIVATIONS:
        problems.append(f"{CONFIG_FILE}: hidden_act={text.hidden_act!r} is not supported (expected "
                        f"one of {sorted(ACTIVATIONS)})")
    if not math.isclose(float(text.layer_norm_eps), LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"{CONFIG_FILE}: layer_norm_eps={text.layer_norm_eps} (this CLIP computes "
                        f"LayerNorm with {LAYER_NORM_EPS})")
    if text.hidden_size % text.num_attention_heads:
        problems.append(f"{CONFIG_FILE}: hidden_size={text.hidden_size} is not divisible by "
                        f"num_attention_heads={text.num_attention_heads}")
    model = {
        "embed_dim": int(text.projection_dim),
        # No image tower: nominal sizes (never built).
        "image_size": 224, "patch_size": 14, "vision_width": 0, "vision_depth": 0, "vision_heads": 0,
        "text_width": int(text.hidden_size), "text_depth": int(text.num_hidden_layers),
        "text_heads": int(text.num_attention_heads),
        "context_length": int(text.max_position_embeddings),
        "mlp_ratio": float(text.intermediate_size / text.hidden_size),
        "activation": ACTIVATIONS.get(text.hidden_act, "quick_gelu"),
        "eot_pooling": "argmax" if text.eos_token_id == 2 else "eot_id",
    }
    hf = {"vocab_size": int(text.vocab_size), "eos_token_id": int(text.eos_token_id),
          "text_intermediate_size": int(text.intermediate_size), "vision_intermediate_size": 0}
    return model, hf, problems


def _square_size(value: Any, name: str, problems: list[str], key: str | None = None) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if key is not None and key in value:
            return int(value[key])
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                problems.append(f"{PREPROCESSOR_FILE}: {name}={value} is not square")
                return None
            if key is None:
                return int(value["height"])
    problems.append(f"{PREPROCESSOR_FILE}: {name}={value!r} is not supported (expected "
                    f"{'{' + repr(key) + ': n}' if key else 'n or {height: n, width: n}'})")
    return None


def read_preprocess(hf_dir: str, image_size: int) -> tuple[dict[str, Any], list[str]]:
    """preprocessor_config.json -> (the `config.preprocess` block, problems found).

    Without the file: resize the shorter side to `image_size` (bicubic), centre-crop `image_size`,
    OpenAI's mean and std.
    """
    path = os.path.join(hf_dir, PREPROCESSOR_FILE)
    out = {"resize_size": int(image_size), "crop_size": int(image_size), "resample": "bicubic",
           "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}
    if not os.path.isfile(path):
        return out, []
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    problems = []
    for flag in ("do_resize", "do_center_crop", "do_rescale"):
        if not raw.get(flag, True):
            problems.append(f"{PREPROCESSOR_FILE}: {flag}=false is not supported (CLIP "
                            "preprocessing resizes, centre-crops and rescales to [0, 1])")
    factor = float(raw.get("rescale_factor", 1 / 255))
    if not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        problems.append(f"{PREPROCESSOR_FILE}: rescale_factor={factor}; expected 1/255")
    resize = _square_size(raw.get("size", {"shortest_edge": image_size}), "size", problems,
                          key="shortest_edge")
    crop = _square_size(raw.get("crop_size", image_size), "crop_size", problems)
    resample = raw.get("resample", 3)
    if isinstance(resample, str) and resample.lower() in PIL_RESAMPLE_CODES.values():
        resample = resample.lower()
    elif resample in PIL_RESAMPLE_CODES:
        resample = PIL_RESAMPLE_CODES[resample]
    else:
        problems.append(f"{PREPROCESSOR_FILE}: resample={resample!r} is not a Pillow filter code")
        resample = "bicubic"
    if raw.get("do_normalize", True):
        mean, std = raw.get("image_mean", OPENAI_CLIP_MEAN), raw.get("image_std", OPENAI_CLIP_STD)
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3:
        problems.append(f"{PREPROCESSOR_FILE}: image_mean / image_std need 3 values, got {mean} "
                        f"and {std}")
    if crop is not None and crop != image_size:
        problems.append(f"{PREPROCESSOR_FILE}: crop_size={crop} but the vision tower takes "
                        f"image_size={image_size}")
    if crop is not None and resize is not None and crop > resize:
        problems.append(f"{PREPROCESSOR_FILE}: crop_size={crop} is larger than the resized shorter "
                        f"side {resize}")
    out.update(resize_size=resize or image_size, crop_size=crop or image_size, resample=resample,
               mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    return out, problems


# ---------------------------------------------------------------------------------------------
# Weights: safetensors only.
# ---------------------------------------------------------------------------------------------
def weight_files(hf_dir: str) -> list[str]:
    """The safetensors file(s) of a model directory; refuses a directory with only pickles."""
    single = os.path.join(hf_dir, WEIGHTS_FILE)
    index = os.path.join(hf_dir, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(hf_dir, name))]
        if not files or missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {hf_dir}: {missing}")
        return [os.path.join(hf_dir, name) for name in files]
    pickles = sorted({os.path.basename(p) for pattern in PICKLE_PATTERNS
                      for p in glob.glob(os.path.join(hf_dir, pattern))})
    if pickles:
        raise ValueError(
            f"{hf_dir} holds no {WEIGHTS_FILE}, only pickle files {pickles}: they are never "
            "unpickled here (loading a pickle runs arbitrary code). Download the safetensors "
            f"version of the model ({WEIGHTS_FILE}), or convert it yourself with a trusted "
            "transformers install (model.save_pretrained(dir, safe_serialization=True)).")
    raise FileNotFoundError(f"{hf_dir} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE})")


class _Tensors:
    """Lazy read access to the tensors of safetensors files: shapes first, data on demand."""

    def __init__(self, files: list[str]):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 checkpoints)
        from safetensors import safe_open

        self._handles = [safe_open(path, framework="numpy") for path in files]
        self._where = {}
        for handle in self._handles:
            for name in handle.keys():
                self._where[name] = handle

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._where[name].get_tensor(name), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The name and layout mapping.
# ---------------------------------------------------------------------------------------------
def _transpose(w):
    return w.T


def _identity(w):
    return w


@dataclasses.dataclass
class _Entry:
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    convert: Callable[[np.ndarray], np.ndarray]


def _tower_layers(entries: dict, hf_prefix: str, our_prefix: str, width: int, depth: int,
                  heads: int, hidden: int) -> None:
    head_dim = width // heads if heads and width % heads == 0 else None
    for i in range(depth):
        hf, ours = f"{hf_prefix}.encoder.layers.{i}", (our_prefix, "encoder", f"layers_{i}")
        for proj in ("q_proj", "k_proj", "v_proj"):
            entries[f"{hf}.self_attn.{proj}.weight"] = _Entry(
                (width, width), ours + ("self_attn", proj, "kernel"),
                lambda w, h=heads, d=head_dim: w.T.reshape(w.shape[1], h, d))
            entries[f"{hf}.self_attn.{proj}.bias"] = _Entry(
                (width,), ours + ("self_attn", proj, "bias"),
                lambda b, h=heads, d=head_dim: b.reshape(h, d))
        entries[f"{hf}.self_attn.out_proj.weight"] = _Entry(
            (width, width), ours + ("self_attn", "out_proj", "kernel"),
            lambda w, h=heads, d=head_dim: w.T.reshape(h, d, w.shape[0]))
        entries[f"{hf}.self_attn.out_proj.bias"] = _Entry(
            (width,), ours + ("self_attn", "out_proj", "bias"), _identity)
        for norm in ("layer_norm1", "layer_norm2"):
            entries[f"{hf}.{norm}.weight"] = _Entry((width,), ours + (norm, "scale"), _identity)
            entries[f"{hf}.{norm}.bias"] = _Entry((width,), ours + (norm, "bias"), _identity)
        for fc, shape, out in (("fc1", (hidden, width), hidden), ("fc2", (width, hidden), width)):
            entries[f"{hf}.mlp.{fc}.weight"] = _Entry(shape, ours + ("mlp", fc, "kernel"), _transpose)
            entries[f"{hf}.mlp.{fc}.bias"] = _Entry((out,), ours + ("mlp", fc, "bias"), _identity)


def _layer_norm(entries: dict, hf: str, path: tuple[str, ...], width: int) -> None:
    entries[f"{hf}.weight"] = _Entry((width,), path + ("scale",), _identity)
    entries[f"{hf}.bias"] = _Entry((width,), path + ("bias",), _identity)


def expected_tensors(model: dict[str, Any], hf: dict[str, Any], vocab_rows: int | None = None
                     ) -> dict[str, _Entry]:
    """Every tensor a Hugging Face CLIPModel of this config holds: name -> (shape, our path, layout
    conversion). `vocab_rows` pads (zeros) or cuts the token embedding to that many rows."""
    m = model
    vw, d = m["vision_width"], m["embed_dim"]
    p = m["patch_size"]
    positions = (m["image_size"] // p) ** 2 + 1
    vocab = hf["vocab_size"]
    rows = vocab if vocab_rows is None else int(vocab_rows)

    def fit_rows(w):
        out = np.zeros((rows, w.shape[1]), w.dtype)
        n = min(rows, w.shape[0])
        out[:n] = w[:n]
        return out

    e: dict[str, _Entry] = {}
    if m["vision_depth"] == 0:  # A text encoder alone (CLIPTextModelWithProjection).
        _text_tensors(e, m, hf, vocab, fit_rows)
        return e
    e["vision_model.embeddings.patch_embedding.weight"] = _Entry(
        (vw, 3, p, p), ("vision_model", "patch_embedding", "kernel"),
        lambda w: w.transpose(2, 3, 1, 0))
    e["vision_model.embeddings.class_embedding"] = _Entry((vw,), ("vision_model", "class_embedding"),
                                                          _identity)
    e["vision_model.embeddings.position_embedding.weight"] = _Entry(
        (positions, vw), ("vision_model", "position_embedding"), _identity)
    _layer_norm(e, "vision_model.pre_layrnorm", ("vision_model", "ln_pre"), vw)
    _tower_layers(e, "vision_model", "vision_model", vw, m["vision_depth"], m["vision_heads"],
                  hf["vision_intermediate_size"])
    _layer_norm(e, "vision_model.post_layernorm", ("vision_model", "ln_post"), vw)
    _text_tensors(e, m, hf, vocab, fit_rows)
    e["visual_projection.weight"] = _Entry((d, vw), ("visual_projection", "kernel"), _transpose)
    e["logit_scale"] = _Entry((), ("logit_scale",), lambda w: w.reshape(()))
    return e


def _text_tensors(e: dict, m: dict[str, Any], hf: dict[str, Any], vocab: int, fit_rows) -> None:
    tw, d = m["text_width"], m["embed_dim"]
    e["text_model.embeddings.token_embedding.weight"] = _Entry(
        (vocab, tw), ("text_model", "token_embedding", "embedding"), fit_rows)
    e["text_model.embeddings.position_embedding.weight"] = _Entry(
        (m["context_length"], tw), ("text_model", "position_embedding"), _identity)
    _tower_layers(e, "text_model", "text_model", tw, m["text_depth"], m["text_heads"],
                  hf["text_intermediate_size"])
    _layer_norm(e, "text_model.final_layer_norm", ("text_model", "ln_final"), tw)
    e["text_projection.weight"] = _Entry((d, tw), ("text_projection", "kernel"), _transpose)


def _check_tensors(tensors: _Tensors, entries: dict[str, _Entry]) -> list[str]:
    problems = []
    names = set(tensors.names())
    for name, entry in entries.items():
        if name not in names:
            problems.append(f"missing tensor {name} (expected shape {list(entry.hf_shape)})")
            continue
        shape = tensors.shape(name)
        # logit_scale is a scalar; some exports store it as [1].
        ok = shape == entry.hf_shape or (name == "logit_scale" and shape in ((), (1,)))
        if not ok:
            problems.append(f"tensor {name} has shape {list(shape)}; config.json implies "
                            f"{list(entry.hf_shape)}")
    for name in sorted(names - set(entries)):
        if not name.endswith(IGNORED_SUFFIXES):
            problems.append(f"unexpected tensor {name} {list(tensors.shape(name))} (not part of a "
                            "CLIPModel with this config.json)")
    return problems


def read_hf_clip(hf_dir: str, *, vocab_rows: int | None = None, load_params: bool = True,
                 extra_problems: list[str] | None = None) -> HFClip:
    """Reads and checks a Hugging Face CLIP directory; converts its weights to our param tree.

    Args:
      hf_dir: the model directory (config.json, model.safetensors, preprocessor_config.json).
      vocab_rows: rows of the converted token embedding (default: the checkpoint's vocab_size);
        extra rows are zeros, rows past it are dropped.
      load_params: False reads and checks everything but loads no weight data (params=None).
      extra_problems: problems found by the caller (e.g. with the tokenizer), reported together.

    Raises:
      CheckpointMismatchError: listing every problem (unsupported config values, missing or
        unexpected tensors, wrong shapes, unsupported preprocessing).
      ValueError: only pickle checkpoints in the directory (never unpickled).
    """
    hf_dir = _check_dir(hf_dir)
    model, hf, problems = read_model_config(hf_dir)
    preprocess, more = read_preprocess(hf_dir, model["image_size"])
    problems += more
    tensors = _Tensors(weight_files(hf_dir))
    entries = expected_tensors(model, hf, vocab_rows)
    problems += _check_tensors(tensors, entries)
    problems += list(extra_problems or [])
    if problems:
        raise CheckpointMismatchError(hf_dir, problems)
    params = None
    if load_params:
        params = nest({entry.path: np.array(entry.convert(tensors.get(name)), np.float32, order="C")
                        for name, entry in entries.items()})
    return HFClip(hf_dir=hf_dir, model=model, preprocess=preprocess, params=params, hf=hf)


# ---------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------
def copy_tokenizer(hf_dir: str, out_dir: str, context_length: int):
    """Saves the directory's CLIP tokenizer to `out_dir` (tokenizer.json, vocab.json, merges.txt,
    configs) and loads it back as a `data.tokenizer.Tokenizer` with `context_length`."""
    from transformers import CLIPTokenizerFast

    from unclip_jax.data import tokenizer as tokenizer_lib

    files = set(os.listdir(hf_dir))
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise FileNotFoundError(f"{hf_dir} has no tokenizer (neither tokenizer.json nor vocab.json + "
                                "merges.txt): download the model's tokenizer files too")
    os.makedirs(out_dir, exist_ok=True)
    hf_tokenizer = CLIPTokenizerFast.from_pretrained(hf_dir, local_files_only=True)
    hf_tokenizer.model_max_length = int(context_length)
    hf_tokenizer.save_pretrained(out_dir)
    for name in ("vocab.json", "merges.txt"):
        if name in files and not os.path.exists(os.path.join(out_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    return tokenizer_lib.Tokenizer.from_dir(out_dir, context_length=context_length)


def tokenizer_problems(tokenizer, model: dict[str, Any], hf: dict[str, Any]) -> list[str]:
    """Where a tokenizer and a checkpoint's text tower (`read_model_config`) disagree."""
    problems = []
    if tokenizer.vocab_size > hf["vocab_size"]:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} ids but the text tower's "
                        f"vocab_size is {hf['vocab_size']}")
    if model["eot_pooling"] == "eot_id" and tokenizer.eot_token_id != hf["eos_token_id"]:
        problems.append(f"the tokenizer's end-of-text id is {tokenizer.eot_token_id} but "
                        f"{CONFIG_FILE}'s text_config.eos_token_id is {hf['eos_token_id']}")
    return problems


def padded_vocab_rows(vocab_size: int) -> int:
    """Embedding rows of the CLIP task's text tower: the vocabulary rounded up to 128 (see ClipTask)."""
    return -(-int(vocab_size) // 128) * 128


# ---------------------------------------------------------------------------------------------
# The workdir.
# ---------------------------------------------------------------------------------------------
def clip_config(template, imported: HFClip, tokenizer) -> Any:
    """A CLIP stage config: `template` (data, train, eval, mesh, model dtype/scan/remat) with the
    imported sizes, preprocessing and tokenizer settings. Returns a new, unlocked ConfigDict."""
    import ml_collections

    config = ml_collections.ConfigDict(template.to_dict() if hasattr(template, "to_dict") else template)
    config.stage = "clip"
    for key, value in imported.model.items():
        config.model[key] = value
    config.tokenizer.dir = ""  # The workdir's own tokenizer/ (written by write_clip_workdir).
    config.tokenizer.context_length = int(tokenizer.context_length)
    config.tokenizer.vocab_size = int(tokenizer.vocab_size)
    config.preprocess = ml_collections.ConfigDict(imported.preprocess)
    config.imported_from = imported.hf_dir
    return config


def write_clip_workdir(hf_dir: str, workdir: str, template, *, tokenizer_dir: str | None = None) -> Any:
    """Imports the Hugging Face CLIP in `hf_dir` as a frozen-CLIP workdir; returns its config.

    `template` is a CLIP stage config (e.g. `configs/clip_vit_l14.py:clip`): its data, train,
    eval and mesh blocks and model dtype/scan_layers/remat_policy are kept; sizes, preprocessing
    and tokenizer come from the checkpoint. The workdir must not exist yet (or be empty): it is
    written to a temporary sibling and renamed when complete, so nothing is ever overwritten and a
    failed import leaves nothing behind. Single-process. The tokenizer files are read from
    `tokenizer_dir` (default: `hf_dir`; Karlo keeps them in a sibling `tokenizer/`). A
    `CLIPTextModelWithProjection` directory imports as a text encoder alone (`vision_depth=0`).

    Raises CheckpointMismatchError (every difference listed), FileNotFoundError, FileExistsError.
    """
    import jax

    from unclip_jax.models import layers

    hf_dir = _check_dir(hf_dir)
    with new_directory(workdir) as tmp:
        weight_files(hf_dir)  # A pickle-only directory is refused before anything else.
        model, hf, _ = read_model_config(hf_dir)  # Its problems are listed by read_hf_clip.
        tokenizer = copy_tokenizer(tokenizer_dir or hf_dir, os.path.join(tmp, TOKENIZER_DIR),
                                   model["context_length"])
        imported = read_hf_clip(hf_dir, vocab_rows=padded_vocab_rows(tokenizer.vocab_size),
                                extra_problems=tokenizer_problems(tokenizer, model, hf))
        config = clip_config(template, imported, tokenizer)
        config.train.num_steps = 0  # Imported, not trained here.
        sizes = {"vocab_size": tokenizer.vocab_size, "eot_token_id": tokenizer.eot_token_id,
                 "context_length": tokenizer.context_length, "eot_pooling": imported.model["eot_pooling"]}
        params = imported.params
        if bool(config.model.get("scan_layers", False)):
            params = jax.tree.map(np.asarray, layers.stack_layer_params(params))
        # Recorded relative to the workdir: the renamed directory finds its tokenizer.
        write_imported(tmp, config, sizes, params, what=f"the CLIP checkpoint in {hf_dir}",
                       tokenizer=tokenizer, depends_on={"tokenizer": os.path.join(tmp, TOKENIZER_DIR)})
        del params
    return config
