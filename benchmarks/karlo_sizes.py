"""Parameters and weight memory of Karlo's stages at their real sizes (jax.eval_shape, nothing
allocated; diffusers builds its configs on torch's meta device). Prints JSON.

  python benchmarks/karlo_sizes.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import torch  # noqa: E402
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

from unclip_jax.convert import karlo_prior, karlo_unet  # noqa: E402
from unclip_jax.convert.karlo import stage_config  # noqa: E402
from unclip_jax.models import layers  # noqa: E402
from unclip_jax.stages import load  # noqa: E402

DECODER = dict(sample_size=64, layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280),
    in_channels=3, out_channels=6, cross_attention_dim=1536, class_embed_type="identity",
    attention_head_dim=64, resnet_time_scale_shift="scale_shift")
SR = dict(sample_size=256, layers_per_block=3, down_block_types=("ResnetDownsampleBlock2D",) * 4,
    up_block_types=("ResnetUpsampleBlock2D",) * 4, block_out_channels=(320, 640, 960, 1280),
    in_channels=6, out_channels=3, add_attention=False)

with torch.device("meta"):
    prior_cfg = dict(PriorTransformer().config)
    dec_cfg = dict(UNet2DConditionModel(**DECODER).config)
    proj_cfg = dict(UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=1280, cross_attention_dim=1536).config)
    sr_cfg = dict(UNet2DModel(**SR).config)
out = {}
st = load.build_stage(stage_config("prior", {**karlo_prior.prior_config(prior_cfg), "scan_layers": True, "remat_policy": "none"}, {}),
                      {**karlo_prior.prior_sizes(prior_cfg), "eot_token_id": 49407})
out["prior"] = layers.count_params(jax.eval_shape(st.init_params, jax.random.key(0)))
st = load.build_stage(stage_config("decoder", karlo_unet.decoder_config(dec_cfg, proj_cfg), {"learned_variance": True}),
                      {"clip_dim": 768, "text_length": 77, "vocab_size": 49408, "eot_token_id": 49407})
out["decoder_with_text_proj"] = layers.count_params(jax.eval_shape(st.init_params, jax.random.key(0)))
st = load.build_stage(stage_config("upsampler", karlo_unet.super_res_config(sr_cfg), {"learned_variance": False}, data={"side": 256, "scale": 4, "crop_size": 256}), {})
out["super_res_first_plus_last"] = layers.count_params(jax.eval_shape(st.init_params, jax.random.key(0)))
for k, v in list(out.items()):
    out[k + "_gib_float32"] = round(v * 4 / 2**30, 2)
    out[k + "_gib_bfloat16"] = round(v * 2 / 2**30, 2)
print(json.dumps(out))
