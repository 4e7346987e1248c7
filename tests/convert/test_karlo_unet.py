"""Parity with diffusers' Karlo components: imported random UNets give diffusers' outputs.

Tiny `UNet2DConditionModel` + `UnCLIPTextProjModel` (the decoder) and `UNet2DModel` (the upsamplers)
at Karlo's block types, every parameter randomised (diffusers zero-initialises some), converted by
`unclip_jax.convert.karlo_unet` and run on the same inputs, wired as `UnCLIPPipeline` wires them.
Needs the `[parity]` extra (CPU torch and diffusers); skipped without them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests import numerics  # noqa: E402
from tests.convert.karlo_tiny import (CROSS, DECODER, SUPER_RES, TEXT_PROJ, TOKENS, D,  # noqa: E402,F401
                                      nchw as _nchw, nhwc as _nhwc, randomise as _randomise,
                                      state as _state)
from unclip_jax.convert import karlo_unet  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402

L = 7  # caption length (D, TOKENS, CROSS, DECODER, TEXT_PROJ, SUPER_RES: karlo_tiny)
# Karlo's published configs (diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py).
KARLO_DECODER = dict(
    sample_size=64, layers_per_block=3,
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(320, 640, 960, 1280),
    in_channels=3, out_channels=6, cross_attention_dim=1536, class_embed_type="identity",
    attention_head_dim=64, resnet_time_scale_shift="scale_shift")
KARLO_TEXT_PROJ = dict(time_embed_dim=1280, cross_attention_dim=1536)
KARLO_SUPER_RES = dict(
    sample_size=256, layers_per_block=3, down_block_types=("ResnetDownsampleBlock2D",) * 4,
    up_block_types=("ResnetUpsampleBlock2D",) * 4, block_out_channels=(320, 640, 960, 1280),
    in_channels=6, out_channels=3, add_attention=False)
T = np.array([0, 250, 600, 999])
B = len(T)


def _model_shapes(model, *args, **kwargs):
    abstract = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)
    return jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract)["params"])


def _abstract_decoder_inputs(side, length, dim=D):
    """(x_t, t, conditioning) as abstract arrays, for eval_shape."""
    b, f32 = 1, jnp.float32
    return (jax.ShapeDtypeStruct((b, side, side, 3), f32), jax.ShapeDtypeStruct((b,), f32),
            dict(z_i=jax.ShapeDtypeStruct((b, dim), f32), z_t=jax.ShapeDtypeStruct((b, dim), f32),
                 text_hidden=jax.ShapeDtypeStruct((b, length, dim), f32),
                 text_mask=jax.ShapeDtypeStruct((b, length), bool),
                 drop_z_i=jax.ShapeDtypeStruct((b,), bool)))


def _decoder_shapes(model, side, length, dim=D):
    x_t, t, cond = _abstract_decoder_inputs(side, length, dim)
    return _model_shapes(model, x_t, t, **cond)


@pytest.fixture(scope="module")
def decoder():
    """(diffusers decoder, diffusers text_proj, our model, converted params, jitted apply)."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    theirs = _randomise(UNet2DConditionModel(**DECODER), seed=0)
    proj = _randomise(UnCLIPTextProjModel(**TEXT_PROJ), seed=1)
    config = karlo_unet.decoder_config(dict(theirs.config), dict(proj.config))
    params = karlo_unet.convert_decoder(_state(theirs), _state(proj), dict(theirs.config),
                                        dict(proj.config))
    model = unet_lib.unet_from_config(config)
    assert jax.tree.map(np.shape, params) == _decoder_shapes(model, 16, 5)

    @jax.jit
    def apply(params, x_t, t, z_i, z_t, hidden, mask, drop_z_i):
        return model.apply({"params": params}, x_t, t, z_i=z_i, z_t=z_t, text_hidden=hidden,
                           text_mask=mask, drop_z_i=drop_z_i)

    return theirs, proj, model, params, apply


def _decoder_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x_t = rng.normal(size=(2 * B, 16, 16, 3)).astype(np.float32)
    z_i = rng.normal(size=(B, D)).astype(np.float32)
    z_t = rng.normal(size=(2 * B, D)).astype(np.float32)  # [unconditional; conditional] rows
    hidden = rng.normal(size=(2 * B, L, D)).astype(np.float32)
    lengths = np.array([2, L, 1, 5, 3, 6, L, 4])  # padded captions, each with >= 1 real token
    mask = np.arange(L)[None] < lengths[:, None]
    return x_t, z_i, z_t, hidden, mask


def _diffusers_decoder(theirs, proj, x_t, t, z_i, z_t, hidden, mask):
    """The pipeline's decoder call with guidance: the text_proj prepends the learned guidance
    embedding for the unconditional half, the mask gets the z_i tokens in front."""
    with torch.no_grad():
        context, additive = proj(image_embeddings=torch.from_numpy(z_i),
                                 prompt_embeds=torch.from_numpy(z_t),
                                 text_encoder_hidden_states=torch.from_numpy(hidden),
                                 do_classifier_free_guidance=True)
        keys = torch.nn.functional.pad(torch.from_numpy(mask), (TOKENS, 0), value=True)
        out = theirs(sample=_nchw(x_t), timestep=torch.from_numpy(t), encoder_hidden_states=context,
                     class_labels=additive, attention_mask=keys).sample
    return _nhwc(out)


def test_decoder_config_of_karlo():
    config = karlo_unet.decoder_config(KARLO_DECODER, KARLO_TEXT_PROJ)
    assert config["base_channels"] == 320 and config["channel_mult"] == [1, 2, 3, 4]
    assert config["num_res_blocks"] == 3 and config["attention_resolutions"] == [32, 16, 8]
    assert config["head_channels"] == 64 and config["image_size"] == 64
    assert config["use_scale_shift_norm"] and config["learned_variance"]
    assert (config["clip_dim"], config["clip_tokens"], config["clip_text_width"],
            config["context_dim"], config["clip_scale"]) == (768, 4, 768, 1536, 1.0)
    model = unet_lib.unet_from_config(config)
    assert model.emb_dim == 1280 and model.context_width == 1536


def test_karlo_sized_mapping_matches_diffusers_and_the_model():
    """At Karlo's real sizes (no weights: diffusers on the meta device, ours abstract), every
    diffusers tensor has a place and every param of the UNet is filled."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**KARLO_DECODER)
        proj = UnCLIPTextProjModel(**KARLO_TEXT_PROJ)
    config = karlo_unet.decoder_config(dict(unet.config), dict(proj.config))
    unet_entries = karlo_unet.unet_tensors(config)
    proj_entries = karlo_unet.text_proj_tensors(config)
    assert karlo_unet.check_tensors(unet.state_dict(), unet_entries, "decoder") == []
    assert karlo_unet.check_tensors(proj.state_dict(), proj_entries, "text_proj") == []
    converted = {}
    for entry in list(unet_entries.values()) + list(proj_entries.values()):
        shape = jax.eval_shape(entry.convert, jax.ShapeDtypeStruct(entry.shape, jnp.float32)).shape
        node = converted
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        node[entry.path[-1]] = shape
    model = unet_lib.unet_from_config(config)
    assert converted == _decoder_shapes(model, 64, 77, 768)
    # The same for the upsamplers.
    with torch.device("meta"):
        sr = diffusers.UNet2DModel(**KARLO_SUPER_RES)
    sr_config = karlo_unet.super_res_config(dict(sr.config))
    assert karlo_unet.check_tensors(sr.state_dict(), karlo_unet.unet_tensors(sr_config), "sr") == []


def test_decoder_matches_diffusers(decoder):
    theirs, proj, model, params, apply = decoder
    x_t, z_i, z_t, hidden, mask = _decoder_inputs()
    t = np.concatenate([T, T[::-1]])
    expected = _diffusers_decoder(theirs, proj, x_t, t, z_i, z_t, hidden, mask)
    # Ours: the first half drops z_i (the learned guidance embedding), the second keeps it.
    drop = np.arange(2 * B) < B
    ours = apply(params, x_t, t, np.concatenate([z_i, z_i]), z_t, hidden, mask, drop)
    assert ours.shape == expected.shape == (2 * B, 16, 16, 6)
    assert np.abs(expected).max() > 1.0  # not a degenerate output
    # Two libraries in float32 (oneDNN vs XLA kernels): the same math, round-off apart.
    numerics.assert_close(ours, expected)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)
    # The halves differ (the guidance embedding is used), and drop_z_i=None keeps z_i.
    assert np.abs(np.asarray(ours[:B] - ours[B:])).max() > 1e-2
    kept = model.apply({"params": params}, x_t[B:], t[B:], z_i=z_i, z_t=z_t[B:],
                       text_hidden=hidden[B:], text_mask=mask[B:])
    numerics.assert_close(kept, expected[B:])


def test_decoder_padding_mask(decoder):
    """Padded caption positions are ignored (as keys), real ones are read."""
    theirs, proj, model, params, apply = decoder
    x_t, z_i, z_t, hidden, mask = _decoder_inputs(seed=1)
    t = np.concatenate([T, T])
    z_i2, drop = np.concatenate([z_i, z_i]), np.zeros((2 * B,), bool)
    base = apply(params, x_t, t, z_i2, z_t, hidden, mask, drop)
    padded = np.where(mask[..., None], hidden, 5.0).astype(np.float32)
    numerics.assert_close(apply(params, x_t, t, z_i2, z_t, padded, mask, drop), base)
    unmasked = apply(params, x_t, t, z_i2, z_t, hidden, np.ones_like(mask), drop)
    changed = np.abs(np.asarray(unmasked - base)).max(axis=(1, 2, 3))
    assert np.all(changed[~mask.all(axis=1)] > 1e-3)
    # And diffusers agrees on the full mask too.
    expected = _diffusers_decoder(theirs, proj, x_t, t, z_i, z_t, hidden, np.ones_like(mask))
    numerics.assert_close(apply(params, x_t, t, z_i2, z_t, hidden, np.ones_like(mask),
                                np.arange(2 * B) < B), expected)


def test_super_res_matches_diffusers():
    from diffusers import UNet2DModel

    theirs = _randomise(UNet2DModel(**SUPER_RES), seed=2)
    config = karlo_unet.super_res_config(dict(theirs.config))
    assert config["low_res_conditioning"] and not config["use_scale_shift_norm"]
    assert config["channel_mult"] == [1, 2, 3] and config["attention_resolutions"] == []
    params = karlo_unet.convert_super_res(_state(theirs), dict(theirs.config))
    model = unet_lib.unet_from_config(config)
    assert jax.tree.map(np.shape, params) == _model_shapes(
        model, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)), low_res=jnp.zeros((1, 4, 4, 3)))
    rng = np.random.default_rng(3)
    x_t = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
    low = np.tanh(rng.normal(size=(B, 4, 4, 3))).astype(np.float32)
    with torch.no_grad():  # The pipeline's resize and concatenation.
        up = torch.nn.functional.interpolate(_nchw(low), size=[16, 16], mode="bicubic",
                                             align_corners=False, antialias=True)
        expected = _nhwc(theirs(sample=torch.cat([_nchw(x_t), up], dim=1),
                                timestep=torch.from_numpy(T)).sample)
    ours = jax.jit(lambda p, x, t, low: model.apply({"params": p}, x, t, low_res=low))(
        params, x_t, T, low)
    assert np.abs(expected).max() > 1.0
    numerics.assert_close(ours, expected)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_decoder_config_lists_every_problem():
    bad = dict(KARLO_DECODER,
               down_block_types=("DownBlock2D",) + KARLO_DECODER["down_block_types"][1:],
               class_embed_type=None, norm_eps=1e-6, attention_head_dim=(64, 64, 64, 32),
               resnet_skip_time_act=True)
    with pytest.raises(karlo_unet.KarloConversionError) as err:
        karlo_unet.decoder_config(bad, dict(KARLO_TEXT_PROJ, cross_attention_dim=768))
    problems = "\n".join(err.value.problems)
    for needle in ("down_block_types[0]='DownBlock2D'", "class_embed_type=None", "norm_eps=1e-06",
                   "attention_head_dim=[64, 64, 64, 32]", "resnet_skip_time_act=True",
                   "text_proj cross_attention_dim=768"):
        assert needle in problems, problems
    assert len(err.value.problems) == 6
    with pytest.raises(karlo_unet.KarloConversionError, match="add_attention=True"):
        karlo_unet.super_res_config(dict(KARLO_SUPER_RES, add_attention=True))


def test_convert_lists_every_tensor_problem(decoder):
    theirs, proj, _, _, _ = decoder
    state = _state(theirs)
    del state["down_blocks.1.attentions.0.add_k_proj.weight"]
    state["mid_block.resnets.1.conv2.weight"] = state["mid_block.resnets.1.conv2.weight"][:, :8]
    state["extra.weight"] = np.zeros((2,), np.float32)
    proj_state = _state(proj)
    del proj_state["learned_classifier_free_guidance_embeddings"]
    with pytest.raises(karlo_unet.KarloConversionError) as err:
        karlo_unet.convert_decoder(state, proj_state, dict(theirs.config), dict(proj.config))
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert any("missing tensor down_blocks.1.attentions.0.add_k_proj.weight" in p for p in problems)
    assert any("mid_block.resnets.1.conv2.weight has shape [64, 8, 3, 3]" in p for p in problems)
    assert any("unexpected tensor extra.weight" in p for p in problems)
    assert any("text_proj: missing tensor learned_classifier_free_guidance_embeddings" in p
               for p in problems)
