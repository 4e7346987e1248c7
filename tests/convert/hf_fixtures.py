"""Small Hugging Face CLIP directories for the import tests, written without downloading anything.

`write_hf_clip` writes one from numpy (no torch): config.json through `transformers.CLIPConfig`,
random weights under the tensor names of a CLIPModel, a BPE tokenizer trained on a few captions
and preprocessor_config.json. The parity test writes its directory with torch instead.
"""
import json
import os

import numpy as np

from unclip_jax.convert import hf_clip
from unclip_jax.data import tokenizer as tokenizer_lib

CAPTIONS = ["a red circle above a blue square", "two green triangles on the left",
            "a photo of a cat", "a small yellow star", "an orange dog sitting on grass",
            "the quick brown fox jumps over the lazy dog", "three purple hexagons"]


def write_tokenizer(hf_dir: str, vocab_size: int = 600) -> tokenizer_lib.Tokenizer:
    """A byte-level BPE in the CLIP format (the OpenAI layout: EOT has the highest id)."""
    tokenizer_lib.train_tokenizer(CAPTIONS * 3, hf_dir, vocab_size=vocab_size)
    return tokenizer_lib.Tokenizer.from_dir(hf_dir)


def clip_config(tokenizer, *, activation="quick_gelu", image_size=32, patch_size=8, width=32,
                text_width=24, embed_dim=16, depth=2, heads=4, context_length=16,
                legacy_eos=False, mlp_ratio=2):
    """A tiny `transformers.CLIPConfig` whose text tower fits `tokenizer`."""
    from transformers import CLIPConfig

    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=text_width,
                intermediate_size=text_width * mlp_ratio, num_hidden_layers=depth,
                num_attention_heads=heads, max_position_embeddings=context_length,
                hidden_act=activation, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=2 if legacy_eos else tokenizer.eot_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=width, intermediate_size=width * mlp_ratio, num_hidden_layers=depth,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                  hidden_act=activation)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def write_preprocessor(hf_dir: str, resize: int, crop: int, mean=(0.5, 0.4, 0.3),
                       std=(0.2, 0.25, 0.3)) -> None:
    """preprocessor_config.json as transformers writes it for a CLIPImageProcessor."""
    payload = {"crop_size": {"height": crop, "width": crop}, "do_center_crop": True,
               "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
               "do_resize": True, "image_mean": list(mean), "image_std": list(std),
               "image_processor_type": "CLIPImageProcessor", "resample": 3,
               "rescale_factor": 1 / 255, "size": {"shortest_edge": resize}}
    with open(os.path.join(hf_dir, hf_clip.PREPROCESSOR_FILE), "w") as f:
        json.dump(payload, f, indent=2)


def write_hf_clip(hf_dir: str, *, seed: int = 0, resize: int | None = None, **config_kwargs):
    """A random tiny CLIPModel directory (numpy weights); returns its `transformers.CLIPConfig`."""
    from safetensors.numpy import save_file

    os.makedirs(hf_dir, exist_ok=True)
    tokenizer = write_tokenizer(hf_dir)
    config = clip_config(tokenizer, **config_kwargs)
    config.save_pretrained(hf_dir)
    model, hf, problems = hf_clip.read_model_config(hf_dir)
    assert not problems, problems
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, entry in hf_clip.expected_tensors(model, hf).items():
        value = rng.normal(0.0, 0.05, entry.hf_shape)
        if name.endswith(("norm1.weight", "norm2.weight", "layrnorm.weight", "layernorm.weight",
                          "final_layer_norm.weight")):
            value += 1.0
        if name == "logit_scale":
            value = np.asarray(np.log(1 / 0.07))
        tensors[name] = np.asarray(value, np.float32)
    save_file(tensors, os.path.join(hf_dir, hf_clip.WEIGHTS_FILE))
    size = int(config.vision_config.image_size)
    write_preprocessor(hf_dir, resize or size, size)
    return config
