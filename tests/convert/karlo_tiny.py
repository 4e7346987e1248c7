"""Tiny random diffusers components at Karlo's architecture, shared by the Karlo parity tests
(test_karlo_prior, test_karlo_unet, test_karlo_pipeline). Needs CPU torch and diffusers.

Every parameter is moved off its initialisation (diffusers zero-initialises some), so that a
converted model that ignored or mis-mapped any tensor would give another output.
"""
import os

import numpy as np
import torch

from tests.convert import hf_fixtures

D, TOKENS, CROSS = 12, 4, 16  # CLIP width, z_i context tokens, context width (the UNet tests)
DECODER = dict(
    sample_size=16, layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), in_channels=3,
    out_channels=6, cross_attention_dim=CROSS, class_embed_type="identity", attention_head_dim=8,
    resnet_time_scale_shift="scale_shift", norm_num_groups=8)
TEXT_PROJ = dict(clip_extra_context_tokens=TOKENS, clip_embeddings_dim=D, time_embed_dim=4 * 32,
                 cross_attention_dim=CROSS)
SUPER_RES = dict(
    sample_size=16, layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",) * 3,
    up_block_types=("ResnetUpsampleBlock2D",) * 3, block_out_channels=(16, 32, 48), in_channels=6,
    out_channels=3, add_attention=False, norm_num_groups=8)


def random_prior(seed, config):
    """A diffusers `PriorTransformer(**config)` with every parameter random (positions, prd query
    and non-trivial clip_mean / clip_std included); returns (model, config, numpy state dict)."""
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "clip_std":
                p.copy_(0.5 + torch.rand_like(p))
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("weight") and p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:  # biases, positions, prd query, clip_mean
                p.copy_(0.3 * torch.randn_like(p))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, config, state


def randomise(module, seed):
    """Every parameter moved off its initialisation (norms ~1 +- 0.2, zero inits included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.5 / np.sqrt(fan_in)))
    return module.eval()


def state(module):
    """A module's state dict as numpy arrays."""
    return {k: v.numpy() for k, v in module.state_dict().items()}


def nchw(x):
    """NHWC numpy -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
    """NCHW torch -> NHWC numpy."""
    return x.detach().numpy().transpose(0, 2, 3, 1)


def full_clip(karlo_dir, out, *, text_from_karlo=True):
    """A CLIPModel directory (what `convert_karlo.py --clip_dir` takes): Karlo's text encoder (or
    another random one) + a random image tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection

    text = CLIPTextModelWithProjection.from_pretrained(os.path.join(karlo_dir, "text_encoder"))
    t = text.config
    config = CLIPConfig(text_config=t.to_dict(), vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8), projection_dim=t.projection_dim)
    torch.manual_seed(21)
    model = CLIPModel(config).eval()
    if text_from_karlo:
        model.text_model.load_state_dict(text.text_model.state_dict())
        model.text_projection.load_state_dict(text.text_projection.state_dict())
    model.save_pretrained(str(out), safe_serialization=True)
    hf_fixtures.write_preprocessor(str(out), 32, 32)
    return str(out)
