"""Imports Kakao Brain's Karlo (a local diffusers-layout directory) as the project's stage workdirs.

    written = karlo.write_workdirs("karlo-v1-alpha", "runs/karlo")
    prior = load.load_stage(written["prior"])   # a Karlo-mode PriorStage with the imported params

The directory is what `UnCLIPPipeline.save_pretrained` writes (`kakaobrain/karlo-v1-alpha`):
`prior/`, `text_proj/`, `decoder/`, `super_res_first/`, `super_res_last/`, `text_encoder/`,
`tokenizer/`, each model with its `config.json` and `*.safetensors`. Everything is read and checked
before anything is written: a component with only pickle weights (`*.bin`, `*.ckpt`, ...) is refused
(never unpickled), and every missing file, unsupported config value and missing / unexpected /
mis-shaped tensor is listed in one `KarloImportError`.

Written under the output root, each as an ordinary workdir (`config.json`, `stage.json`, an orbax
checkpoint at step 0 holding params and EMA params, no optimiser state) that `stages.load` reads:
- `prior`: the prior in Karlo mode (`diffusion.sampler="karlo"`, guidance 4.0 as Karlo's pipeline);
- `decoder`: the decoder UNet with the text projection (guidance 8.0, learned variance);
- `upsampler`: the 64 -> 256 super-resolution, params `{"first": super_res_first, "last":
  super_res_last}` (the last one takes the final step).
The root is written to a temporary sibling and renamed when complete: a failed import leaves
nothing, and an existing non-empty root is never overwritten.

- `clip`: the CLIP text encoder (`text_encoder/`, a `CLIPTextModelWithProjection`, with
  `tokenizer/`), imported by `hf_clip.write_clip_workdir` as a CLIP with no image tower, when a
  CLIP config template is given (the entry passes `configs/clip_vit_l14.py:clip`'s); or, with
  `clip_dir`, a full CLIP whose text tower is that encoder (checked tensor by tensor), so that the
  manipulations can embed images and `embed.py` can cache the data for fine-tuning the decoder.
`configs/karlo.py:<root>` is the pipeline config of the root for `sample.py`;
`configs/karlo.py:decoder,<root>` fine-tunes its decoder with `train.py`.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from unclip_jax.convert import ConversionError, karlo_prior, karlo_unet, new_directory, write_imported

MODEL_COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
PRIOR_GUIDANCE, DECODER_GUIDANCE = 4.0, 8.0  # UnCLIPPipeline's defaults for Karlo.


class KarloImportError(ConversionError):
    """The directory cannot be imported; `problems` lists every reason."""

    def __init__(self, karlo_dir: str, problems: list[str]):
        super().__init__(f"Karlo from {karlo_dir}", problems)


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------
def _weight_files(component_dir: str) -> tuple[list[str], list[str]]:
    files = sorted(os.listdir(component_dir)) if os.path.isdir(component_dir) else []
    return ([f for f in files if f.endswith(".safetensors")],
            [f for f in files if f.endswith(PICKLE_SUFFIXES)])


def check_dir(karlo_dir: str) -> list[str]:
    """Every problem with the directory's layout (missing components, configs, weight files, or
    pickle-only weights), without reading any weights."""
    problems = []
    if not os.path.isdir(karlo_dir):
        return [f"{karlo_dir} is not a directory"]
    for name in MODEL_COMPONENTS:
        path = os.path.join(karlo_dir, name)
        if not os.path.isdir(path):
            problems.append(f"{name}/: missing")
            continue
        if not os.path.isfile(os.path.join(path, "config.json")):
            problems.append(f"{name}/config.json: missing")
        safe, pickled = _weight_files(path)
        if not safe and pickled:
            problems.append(f"{name}/: only pickle weights ({', '.join(pickled)}); they are never "
                            "unpickled: convert them to safetensors first")
        elif not safe:
            problems.append(f"{name}/: no *.safetensors weights")
    if not os.path.isfile(os.path.join(karlo_dir, "tokenizer", "vocab.json")):
        problems.append("tokenizer/vocab.json: missing")
    return problems


def read_config(karlo_dir: str, name: str) -> dict[str, Any]:
    with open(os.path.join(karlo_dir, name, "config.json")) as f:
        return json.load(f)


def read_state(karlo_dir: str, name: str) -> dict[str, np.ndarray]:
    """A component's tensors (every *.safetensors file of its directory) as float32 numpy arrays."""
    from safetensors import safe_open

    state = {}
    directory = os.path.join(karlo_dir, name)
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                state[key] = np.asarray(f.get_tensor(key), np.float32)
    return state


def tokenizer_sizes(karlo_dir: str) -> dict[str, int]:
    """vocab_size, eot_token_id and context_length of the directory's CLIP tokenizer."""
    tok = os.path.join(karlo_dir, "tokenizer")
    with open(os.path.join(tok, "vocab.json")) as f:
        vocab = json.load(f)
    context = 77
    config_path = os.path.join(tok, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            context = int(json.load(f).get("model_max_length", context))
    if "<|endoftext|>" not in vocab:
        raise KarloImportError(karlo_dir, ["tokenizer/vocab.json: no <|endoftext|> token"])
    return {"vocab_size": len(vocab), "eot_token_id": int(vocab["<|endoftext|>"]),
            "context_length": min(context, 77)}


# ---------------------------------------------------------------------------------------------
# Stage configs and params.
# ---------------------------------------------------------------------------------------------
def stage_config(stage: str, model: dict, diffusion: dict, **extra):
    import ml_collections

    return ml_collections.ConfigDict({
        "stage": stage, "model": model, "diffusion": {"sampler": "karlo", **diffusion},
        "mesh": {"shape": (-1, 1, 1), "dcn_shape": (-1, 1, 1), "num_devices": 0, "rules": ()},
        **extra})


def convert(karlo_dir: str, *, scan_layers: bool = True) -> dict[str, tuple[Any, dict, Any]]:
    """{"prior" | "decoder" | "upsampler": (stage config, sizes, numpy params)} of the directory.

    Raises KarloImportError listing every problem of every component.
    """
    karlo_dir = os.path.abspath(os.path.expanduser(os.fspath(karlo_dir)))
    problems = check_dir(karlo_dir)
    if problems:
        raise KarloImportError(karlo_dir, problems)
    tok = tokenizer_sizes(karlo_dir)
    out, problems = {}, []

    def attempt(name, fn):
        try:
            out[name] = fn()
        except (karlo_prior.KarloPriorError, karlo_unet.KarloConversionError) as e:
            problems.extend(f"{name}: {p}" for p in getattr(e, "problems", [str(e)]))

    def prior():
        cfg = read_config(karlo_dir, "prior")
        model = {**karlo_prior.prior_config(cfg), "scan_layers": bool(scan_layers), "remat_policy": "none"}
        sizes = {**karlo_prior.prior_sizes(cfg), "eot_token_id": tok["eot_token_id"]}
        params = karlo_prior.convert_prior(read_state(karlo_dir, "prior"), cfg, scan_layers=scan_layers)
        return stage_config("prior", model, {"guidance_scale": PRIOR_GUIDANCE, "best_of": 1}), sizes, params

    def decoder():
        unet_cfg, proj_cfg = read_config(karlo_dir, "decoder"), read_config(karlo_dir, "text_proj")
        model = karlo_unet.decoder_config(unet_cfg, proj_cfg)
        sizes = {"clip_dim": int(model["clip_dim"]), "text_length": tok["context_length"],
                 "vocab_size": tok["vocab_size"], "eot_token_id": tok["eot_token_id"]}
        params = karlo_unet.convert_decoder(read_state(karlo_dir, "decoder"), read_state(karlo_dir, "text_proj"),
                                            unet_cfg, proj_cfg)
        config = stage_config("decoder", model, {"guidance_scale": DECODER_GUIDANCE,
                                                  "learned_variance": True})
        return config, sizes, params

    def upsampler():
        first, last = read_config(karlo_dir, "super_res_first"), read_config(karlo_dir, "super_res_last")
        model = karlo_unet.super_res_config(first)
        if karlo_unet.super_res_config(last) != model:
            raise karlo_unet.KarloConversionError(
                "super_res_last", ["its config describes another model than super_res_first's"])
        side = int(first.get("sample_size", 256))
        low = int(read_config(karlo_dir, "decoder").get("sample_size", 64))
        params = {"first": karlo_unet.convert_super_res(read_state(karlo_dir, "super_res_first"), first),
                  "last": karlo_unet.convert_super_res(read_state(karlo_dir, "super_res_last"), last)}
        config = stage_config("upsampler", model, {"learned_variance": False},
                               data={"side": side, "scale": side // low, "crop_size": side})
        return config, {}, params

    for name, fn in (("prior", prior), ("decoder", decoder), ("upsampler", upsampler)):
        attempt(name, fn)
    if problems:
        raise KarloImportError(karlo_dir, problems)
    return out


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------
def text_tower_problems(clip_dir: str, text_encoder_dir: str) -> list[str]:
    """Every way the text tower of the Hugging Face CLIP in `clip_dir` differs from Karlo's
    `text_encoder/` (the `text_model.*` and `text_projection.*` tensors: missing, other shapes or
    other values). Karlo's prior and decoder were trained on that encoder's embeddings, so a CLIP
    imported for its image tower must carry the same text tower."""
    from unclip_jax.convert import hf_clip

    ours = hf_clip._Tensors(hf_clip.weight_files(text_encoder_dir))
    theirs = hf_clip._Tensors(hf_clip.weight_files(clip_dir))
    problems = []
    for name in ours.names():
        if not name.startswith(("text_model.", "text_projection.")) or name.endswith("position_ids"):
            continue
        if name not in theirs.names():
            problems.append(f"{name}: missing from --clip_dir")
        elif ours.shape(name) != theirs.shape(name):
            problems.append(f"{name}: shape {list(theirs.shape(name))} (Karlo's text encoder: "
                            f"{list(ours.shape(name))})")
        elif not np.array_equal(ours.get(name), theirs.get(name)):
            diff = float(np.max(np.abs(ours.get(name) - theirs.get(name))))
            problems.append(f"{name}: other values (max |difference| {diff:.3g})")
    return problems


def write_workdirs(karlo_dir: str, out_root: str, *, clip_template=None, clip_dir: str | None = None,
                   scan_layers: bool = True) -> dict[str, str]:
    """Converts the directory and writes the stage workdirs under `out_root` (see the module
    docstring); returns {"prior" | "decoder" | "upsampler" (| "clip"): workdir}. Single-process.
    `clip_template`: a CLIP stage config (data, eval, mesh blocks) for the text encoder's workdir;
    None leaves the text encoder out. `clip_dir`: a Hugging Face CLIP with both towers whose text
    tower is Karlo's text encoder (openai/clip-vit-large-patch14), imported as the CLIP instead
    of `text_encoder/`, for the manipulations (they embed images).

    Raises KarloImportError (every problem listed) before anything is written, or FileExistsError.
    """
    out_root = os.path.abspath(os.path.expanduser(os.fspath(out_root)))
    if clip_dir is not None and clip_template is None:
        raise ValueError("clip_dir needs a clip_template (the CLIP workdir's config blocks)")
    with new_directory(out_root) as tmp:
        converted = convert(karlo_dir, scan_layers=scan_layers)
        converted_names = []
        if clip_template is not None:
            from unclip_jax.convert import hf_clip

            karlo_dir = os.path.abspath(os.path.expanduser(os.fspath(karlo_dir)))
            source = os.path.join(karlo_dir, "text_encoder")
            if clip_dir is not None:
                clip_dir = hf_clip._check_dir(clip_dir)
                problems = text_tower_problems(clip_dir, source)
                if problems:
                    raise KarloImportError(karlo_dir, [
                        f"--clip_dir {clip_dir}: its text tower is not Karlo's text encoder: {p}"
                        for p in problems])
                source = clip_dir
            try:
                hf_clip.write_clip_workdir(source, os.path.join(tmp, "clip"), clip_template,
                                           tokenizer_dir=os.path.join(karlo_dir, "tokenizer"))
            except hf_clip.CheckpointMismatchError as e:
                where = "text_encoder" if clip_dir is None else f"--clip_dir {clip_dir}"
                raise KarloImportError(karlo_dir, [f"{where}: {p}" for p in e.problems]) from e
            converted_names.append("clip")
        for name, (config, sizes, params) in converted.items():
            os.makedirs(os.path.join(tmp, name))
            write_imported(os.path.join(tmp, name), config, sizes, params, what=f"Karlo's {name}")
            converted_names.append(name)
    return {name: os.path.join(out_root, name) for name in converted_names}
