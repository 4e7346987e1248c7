"""Tests of the ADM / GLIDE UNet (unclip_jax.models.unet): decoder and upsampler roles.

A freshly initialised UNet outputs exactly 0 (zero-initialised output convolution), so the tests
of what the output depends on use random params of the right shapes (`_random_params`, filled on
the host from `eval_shape`: no compiled init). The one compiled init is the sharded one, with an
"rbg" key: threefry initialisers take long to compile on a small CPU.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from tests import numerics
from tests.models.param_checks import assert_every_param_named
from unclip_jax import parallel
from unclip_jax.models.layers import count_params
from unclip_jax.models.unet import (GroupNorm, UNet, coordinate_channels, depth_to_space, downsample_avg,
                                   norm_groups, space_to_depth, unet_from_config, upsample_nearest)

B, D, VOCAB, L = 4, 8, 50, 6
DECODER = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
               image_size=32, head_channels=8, clip_dim=D, clip_tokens=4, text_vocab_size=VOCAB,
               text_length=L, text_width=16, text_depth=1, text_heads=2, learned_variance=True)
UPSAMPLER = dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                 low_res_conditioning=True, image_size=32)
NO = jnp.zeros((B,), bool)


def _decoder_inputs(size=32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x_t = jax.random.normal(k[0], (B, size, size, 3))
    t = jnp.array([0, 250, 500, 999])
    z_i = jax.random.normal(k[1], (B, D))
    tokens = jax.random.randint(k[2], (B, L), 1, VOCAB)
    mask = jnp.arange(L)[None] < jnp.array([3, 6, 1, 4])[:, None]
    return x_t, t, dict(z_i=z_i, text_tokens=tokens, text_mask=mask)


def _upsampler_inputs(size=32, low=8, seed=1):
    k = jax.random.split(jax.random.key(seed), 2)
    return (jax.random.normal(k[0], (B, size, size, 3)), jnp.array([0, 250, 500, 999]),
            jnp.tanh(jax.random.normal(k[1], (B, low, low, 3))))


def _random_params(model, *args, seed=0, **kwargs):
    """Non-zero params of `model`'s shapes (kernels ~ N(0, 1/fan_in), norms' scale ~ 1)."""
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        std = 1.0 / np.sqrt(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 0.1
        value = rng.normal(size=x.shape) * std + (1.0 if path[-1].key == "scale" else 0.0)
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def decoder():
    """(model, random params, jitted apply taking every conditioning input)."""
    model = UNet(**DECODER)
    x_t, t, cond = _decoder_inputs()
    params = _random_params(model, x_t, t, **cond)

    @jax.jit
    def jitted(params, x_t, t, cond, drop_z_i, drop_text):
        return model.apply(params, x_t, t, **cond, drop_z_i=drop_z_i, drop_text=drop_text)

    def apply(params, x_t, t, cond, drop_z_i=NO, drop_text=NO):  # one trace for every drop pattern
        return jitted(params, x_t, t, cond, drop_z_i, drop_text)

    return model, params, apply


@pytest.fixture(scope="module")
def upsampler():
    model = UNet(**UPSAMPLER)
    x_t, t, low = _upsampler_inputs()
    params = _random_params(model, x_t, t, low_res=low, seed=1)
    return model, params, jax.jit(lambda p, x, t, low: model.apply(p, x, t, low_res=low))


def test_decoder_output_shapes_at_several_resolutions(decoder):
    model, params, apply = decoder
    assert model.out_channels == 6  # learned_variance: mean + variance channels
    for size in (32, 64):
        x_t, t, cond = _decoder_inputs(size)
        out = apply(params, x_t, t, cond)
        assert out.shape == (B, size, size, 6) and out.dtype == jnp.float32
        assert np.all(np.isfinite(out)) and float(jnp.abs(out).max()) > 0
    plain = UNet(**{**DECODER, "learned_variance": False})
    x_t, t, cond = _decoder_inputs()
    plain_params = jax.eval_shape(plain.init, jax.random.key(0), x_t, t, **cond)
    assert jax.eval_shape(plain.apply, plain_params, x_t, t, **cond).shape == (B, 32, 32, 3)


def test_upsampler_is_fully_convolutional(upsampler):
    model, params, apply = upsampler
    assert not any("attn" in k for k in params["params"])
    for size, low in ((32, 8), (64, 16), (48, 12)):
        x_t, t, low_res = _upsampler_inputs(size, low)
        out = apply(params, x_t, t, low_res)
        assert out.shape == (B, size, size, 3) and out.dtype == jnp.float32
        assert np.all(np.isfinite(out))


def test_upsampler_output_depends_on_low_res(upsampler):
    _, params, apply = upsampler
    x_t, t, low_res = _upsampler_inputs()
    base = apply(params, x_t, t, low_res)
    moved = apply(params, x_t, t, low_res.at[1].multiply(-1.0))
    change = np.abs(np.asarray(moved - base)).max(axis=(1, 2, 3))
    assert change[1] > 1e-3 and np.all(change[[0, 2, 3]] == 0)  # rows are independent


def test_z_i_conditioning_is_used_and_dropped(decoder):
    _, params, apply = decoder
    x_t, t, cond = _decoder_inputs()
    other = {**cond, "z_i": cond["z_i"] + 1.0}
    assert np.all(np.abs(apply(params, x_t, t, other) - apply(params, x_t, t, cond)).max(
        axis=(1, 2, 3)) > 1e-3)
    drop = jnp.ones((B,), bool)
    np.testing.assert_array_equal(apply(params, x_t, t, other, drop_z_i=drop),
                                  apply(params, x_t, t, cond, drop_z_i=drop))


def test_text_conditioning_is_used_and_dropped(decoder):
    _, params, apply = decoder
    x_t, t, cond = _decoder_inputs()
    real = np.asarray(cond["text_mask"])
    other = {**cond, "text_tokens": jnp.where(real, (cond["text_tokens"] + 7) % VOCAB,
                                              cond["text_tokens"])}
    base = apply(params, x_t, t, cond)
    assert np.all(np.abs(apply(params, x_t, t, other) - base).max(axis=(1, 2, 3)) > 1e-3)
    drop = jnp.ones((B,), bool)
    np.testing.assert_array_equal(apply(params, x_t, t, other, drop_text=drop),
                                  apply(params, x_t, t, cond, drop_text=drop))
    # Tokens behind the mask (padding) change nothing.
    padded = {**cond, "text_tokens": jnp.where(real, cond["text_tokens"], 3)}
    numerics.assert_close(apply(params, x_t, t, padded), base)
    # Dropping both conditions is a proper (finite, t-dependent) model, per row.
    both = apply(params, x_t, t, cond, drop_z_i=drop, drop_text=drop)
    assert np.all(np.isfinite(both))
    mixed = apply(params, x_t, t, cond, drop_text=jnp.array([True, False, True, False]))
    np.testing.assert_array_equal(mixed[1::2], base[1::2])
    assert np.all(np.abs(mixed[0::2] - base[0::2]).max(axis=(1, 2, 3)) > 1e-3)


def test_bf16_activations_with_fp32_params_stay_close(decoder):
    _, params, apply = decoder
    model = UNet(**DECODER, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x_t, t, cond = _decoder_inputs()
    out = jax.jit(lambda p: model.apply(p, x_t, t, **cond))(params)
    assert out.dtype == jnp.float32
    reference = apply(params, x_t, t, cond)
    # bfloat16 activations (8-bit mantissa) through every block, round-off compounding per block.
    numerics.assert_close(out, reference, ulps=8, dtype=jnp.bfloat16)


@pytest.mark.slow
def test_remat_gives_the_same_gradients(decoder):
    _, params, _ = decoder
    x_t, t, cond = _decoder_inputs()
    drop = jnp.array([True, False, False, True])

    def grads(remat):
        model = UNet(**DECODER, remat=remat)
        loss = lambda p: jnp.sum(jnp.square(model.apply(p, x_t, t, **cond, drop_z_i=drop)))
        return jax.jit(jax.grad(loss))(params)

    # Same math, different fusion: float32 round-off only (scaled to the tree's largest gradient).
    numerics.assert_trees_close(grads(True), grads(False))


def test_dropout_only_in_training(upsampler):
    _, params, apply = upsampler
    model = UNet(**UPSAMPLER, dropout=0.5)
    x_t, t, low_res = _upsampler_inputs()

    @jax.jit
    def run(rng):
        train = model.apply(params, x_t, t, low_res=low_res, train=True, rngs={"dropout": rng})
        return train, model.apply(params, x_t, t, low_res=low_res)

    (train_1, sample), (train_2, _) = run(jax.random.key(1)), run(jax.random.key(2))
    assert float(jnp.abs(train_1 - train_2).max()) > 1e-3
    numerics.assert_close(sample, apply(params, x_t, t, low_res))


def test_every_param_has_logical_names():
    model = UNet(**DECODER)
    x_t, t, cond = _decoder_inputs()
    abstract = jax.eval_shape(model.init, jax.random.key(0), x_t, t, **cond)
    specs = assert_every_param_named(abstract, unnamed_ok=("null_z_i",))
    assert specs["input_conv"]["kernel"] == P(None, None, "conv_in", "conv_out")
    assert specs["down_0_res_0"]["emb_proj"]["kernel"] == P(None, "conv_out")
    assert specs["down_0_res_0"]["in_norm"]["scale"] == P("norm")
    attn = specs["down_1_attn_0"]
    assert attn["q_proj"]["kernel"] == P("embed", "heads", "kv")
    assert attn["context_k_proj"]["kernel"] == P("embed", "heads", "kv")
    assert attn["out_proj_kernel"] == P("heads", "kv", "embed")
    assert specs["time_embed_fc1"]["kernel"] == P("embed", "mlp")
    fc1 = specs["text_encoder"]["transformer"]["layers"]["mlp"]["fc1"]["kernel"]
    assert fc1 == P("layers", "embed", "mlp")
    p = nn.meta.unbox(abstract)["params"]
    assert p["down_1_attn_0"]["q_proj"]["kernel"].shape == (32, 4, 8)  # 32 ch / head_channels 8
    assert p["down_1_attn_0"]["context_k_proj"]["kernel"].shape == (16, 4, 8)  # text_width 16
    assert p["clip_tokens_proj"]["kernel"].shape == (D, 4 * 16)
    assert "up_0_attn_0" not in p and "middle_attn" in p  # attention only at 16 px (level 1)


@pytest.mark.slow
def test_sharded_init_and_forward_match_unsharded(decoder):
    model, params, apply = decoder
    x_t, t, cond = _decoder_inputs()
    mesh = parallel.make_mesh((2, 2, 2))
    rules = parallel.DEFAULT_RULES
    key = jax.random.key(0, impl="rbg")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, key, x_t, t, **cond)
        shardings = parallel.logical_shardings(abstract, mesh, rules)
        variables = jax.jit(model.init, out_shardings=shardings)(key, x_t, t, **cond)
        sharded = variables["params"]
        assert sharded["input_conv"]["kernel"].value.sharding.spec == P(None, None, None, "fsdp")
        q = sharded["down_1_attn_0"]["q_proj"]["kernel"].value
        assert q.sharding.spec == P("fsdp", "tensor", None)
        batch = jax.device_put((x_t, t, cond, NO, NO), parallel.batch_sharding(mesh))
        zero = apply(nn.meta.unbox(variables), *batch)
        # The real init: the zero-initialised output convolution makes the first output exactly 0.
        np.testing.assert_array_equal(np.asarray(zero), 0.0)
        out = apply(jax.device_put(params, shardings), *batch)
        assert out.sharding.spec[0] == ("data", "fsdp")
    numerics.assert_close(out, apply(params, x_t, t, cond))


def test_unet_from_config():
    cfg = ml_collections.ConfigDict(dict(
        base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[16],
        image_size=32, head_channels=8, dropout=0.1, learned_variance=True, dtype="bfloat16",
        param_dtype="float32", remat=True, attention_implementation=None, learning_rate=1e-4,
        drop_z_i_prob=0.1))
    model = unet_from_config(cfg, clip_dim=D)
    assert model.channel_mult == (1, 2) and model.attention_resolutions == (16,)
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    assert (model.clip_dim, model.remat, model.dropout, model.out_channels) == (D, True, 0.1, 6)
    assert model.context_width == 64  # no text: the context tokens are emb-wide
    x_t, t, cond = _decoder_inputs()
    abstract = jax.eval_shape(model.init, jax.random.key(0), x_t, t, z_i=cond["z_i"])
    assert count_params(abstract) > 0 and "text_encoder" not in abstract["params"]
    with pytest.raises(ValueError, match="unknown size"):
        unet_from_config(cfg, width=3)


def test_coordinate_channels_are_used_and_size_free(upsampler):
    grid = np.asarray(coordinate_channels(2, 4, 8))
    assert grid.shape == (2, 4, 8, 2)
    np.testing.assert_allclose(grid[0, 0, :, 0], (np.arange(8) + 0.5) / 8 * 2 - 1)  # x: columns
    np.testing.assert_allclose(grid[0, :, 0, 1], (np.arange(4) + 0.5) / 4 * 2 - 1)  # y: rows
    assert np.all(grid[0] == grid[1])
    model = UNet(**{**UPSAMPLER, "coord_channels": True})
    x_t, t, low_res = _upsampler_inputs()
    params = _random_params(model, x_t, t, low_res=low_res, seed=3)
    kernel = params["params"]["input_conv"]["kernel"]
    assert kernel.shape[2] == 3 + 3 + 2  # x_t, the low-res image, (x, y)
    apply = jax.jit(lambda p, x, t, low: model.apply(p, x, t, low_res=low))
    out = apply(params, x_t, t, low_res)
    blind = jax.tree.map(lambda a: a, params)
    blind["params"]["input_conv"]["kernel"] = kernel.at[:, :, 6:].set(0.0)
    assert float(jnp.abs(out - apply(blind, x_t, t, low_res)).max()) > 1e-3
    x_t, t, low_res = _upsampler_inputs(48, 12)
    assert apply(params, x_t, t, low_res).shape == (B, 48, 48, 3)


def test_clip_spatial_map_conditions_through_the_bottleneck():
    """`clip_spatial`: z_i also becomes an s x s map at the bottleneck; with the timestep-embedding
    and context-token projections of z_i zeroed, z_i still changes the output through it alone."""
    model = UNet(**{**DECODER, "clip_spatial": 4, "text_depth": 0})
    x_t, t, cond = _decoder_inputs()
    params = _random_params(model, x_t, t, z_i=cond["z_i"], seed=4)
    p = params["params"]
    assert p["clip_spatial_proj"]["kernel"].shape == (D, 4 * 4 * 16 * 2)  # bottleneck: 32 channels
    for name in ("clip_emb_proj", "clip_tokens_proj"):
        p[name] = jax.tree.map(jnp.zeros_like, p[name])
    apply = jax.jit(lambda params, z: model.apply(params, x_t, t, z_i=z))
    base = apply(params, cond["z_i"])
    assert float(jnp.abs(apply(params, -cond["z_i"]) - base).max()) > 1e-3
    p["clip_spatial_proj"] = jax.tree.map(jnp.zeros_like, p["clip_spatial_proj"])
    np.testing.assert_allclose(apply(params, -cond["z_i"]), apply(params, cond["z_i"]), atol=1e-6)


def test_clip_level_maps_start_at_zero_and_condition_each_listed_level():
    """`clip_map_resolutions`: a zero-initialised z_i map of each listed level's side and entry
    width is added at that level's entry, so a new model computes what one without them computes
    with the same other params; made nonzero, one changes the output through z_i alone; a side
    that is no level is refused."""
    model = UNet(**{**DECODER, "clip_map_resolutions": (32, 16), "text_depth": 0})
    plain = UNet(**{**DECODER, "text_depth": 0})
    x_t, t, cond = _decoder_inputs()
    fresh = nn.meta.unbox(model.init(jax.random.key(0), x_t, t, z_i=cond["z_i"]))["params"]
    assert fresh["clip_map_0_proj"]["kernel"].shape == (D, 32 * 32 * 16)
    assert fresh["clip_map_1_proj"]["kernel"].shape == (D, 16 * 16 * 16)  # the downsampled width
    assert not any(float(jnp.abs(a).max()) for k, v in fresh.items() if k.startswith("clip_map_")
                   for a in jax.tree.leaves(v))
    params = _random_params(model, x_t, t, z_i=cond["z_i"], seed=4)
    p = params["params"]
    for name in ("clip_map_0_proj", "clip_map_1_proj"):
        p[name] = jax.tree.map(jnp.zeros_like, p[name])
    without = {"params": {k: v for k, v in p.items() if not k.startswith("clip_map_")}}
    np.testing.assert_allclose(model.apply(params, x_t, t, z_i=cond["z_i"]),
                               plain.apply(without, x_t, t, z_i=cond["z_i"]), atol=1e-6)
    for name in ("clip_emb_proj", "clip_tokens_proj", "clip_spatial_proj"):
        if name in p:
            p[name] = jax.tree.map(jnp.zeros_like, p[name])
    apply = jax.jit(lambda params, z: model.apply(params, x_t, t, z_i=z))
    np.testing.assert_allclose(apply(params, -cond["z_i"]), apply(params, cond["z_i"]), atol=1e-6)
    kernel = p["clip_map_1_proj"]["kernel"]
    p["clip_map_1_proj"]["kernel"] = jax.random.normal(jax.random.key(0), kernel.shape) * 0.1
    assert float(jnp.abs(apply(params, -cond["z_i"]) - apply(params, cond["z_i"])).max()) > 1e-3
    with pytest.raises(ValueError, match="clip_map_resolutions"):
        UNet(**{**DECODER, "clip_map_resolutions": (8,)}).init(jax.random.key(0), x_t, t, **cond)


def test_space_to_depth_folds_pixel_blocks_and_depth_to_space_undoes_it():
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
    folded = np.asarray(space_to_depth(jnp.asarray(x), 2))
    assert folded.shape == (2, 3, 2, 12)
    for i, j, di, dj in [(0, 0, 0, 0), (1, 1, 1, 0), (2, 0, 1, 1), (0, 1, 0, 1)]:
        np.testing.assert_array_equal(folded[:, i, j, (2 * di + dj) * 3:(2 * di + dj + 1) * 3],
                                      x[:, 2 * i + di, 2 * j + dj])
    np.testing.assert_array_equal(np.asarray(depth_to_space(jnp.asarray(folded), 2)), x)


def test_patched_unet_runs_its_levels_at_a_fraction_of_the_side():
    """`patch_size` 2: the first level runs at 16 px for a 32 px input, attention resolutions
    refer to that level's side, the output (mean + variance) comes back at 32 px, a pixel's
    output depends on its own block's input, and sides must be multiples of p x 2^(levels - 1)."""
    model = UNet(**{**DECODER, "patch_size": 2, "attention_resolutions": (8,)})
    x_t, t, cond = _decoder_inputs()
    params = _random_params(model, x_t, t, **cond, seed=5)
    p = params["params"]
    assert p["input_conv"]["kernel"].shape[2] == 4 * 3
    assert p["out_conv"]["kernel"].shape[-1] == 4 * 6
    assert "down_1_attn_0" in p and "down_0_attn_0" not in p  # 8 px: the second level (16 -> 8)
    apply = jax.jit(lambda params, x: model.apply(params, x, t, **cond))
    out = apply(params, x_t)
    assert out.shape == (B, 32, 32, 6) and np.all(np.isfinite(out))
    changed = apply(params, x_t.at[:, 5, 7].add(1.0))  # block (2, 3) of the 16 x 16 grid
    assert float(jnp.abs(changed - out)[:, 4:6, 6:8].max()) > 1e-4
    assert apply(params, _decoder_inputs(64)[0]).shape == (B, 64, 64, 6)
    with pytest.raises(ValueError, match="multiples of 4"):
        jax.eval_shape(lambda: model.apply(params, x_t[:, :30, :30], t, **cond))
    with pytest.raises(ValueError, match="patch_size"):
        jax.eval_shape(UNet(**{**DECODER, "patch_size": 3}).init, jax.random.key(0), x_t, t, **cond)


@pytest.mark.slow
def test_text_spatial_map_conditions_through_the_bottleneck():
    """`text_spatial`: the caption's pooled embedding term also becomes an s x s bottleneck map
    (randomly initialised, so that the caption encoder gets a gradient through it)."""
    with_map = UNet(**{**DECODER, "text_spatial": 4})
    without = UNet(**DECODER)
    x_t, t, cond = _decoder_inputs()
    init = nn.meta.unbox(with_map.init(jax.random.key(0), x_t, t, **cond))["params"]
    assert float(jnp.std(init["text_spatial_proj"]["kernel"])) > 0.01
    params = _random_params(with_map, x_t, t, **cond, seed=5)
    p = params["params"]
    assert p["text_spatial_proj"]["kernel"].shape == (with_map.emb_dim, 4 * 4 * 32)
    rest = {"params": {k: v for k, v in p.items() if k != "text_spatial_proj"}}

    def apply(model, params, tokens, drop=NO):
        return model.apply(params, x_t, t, **{**cond, "text_tokens": tokens}, drop_text=drop)

    other = (cond["text_tokens"] + 7) % VOCAB
    base = apply(with_map, params, cond["text_tokens"])
    assert float(jnp.abs(base - apply(without, rest, cond["text_tokens"])).max()) > 1e-3
    # The map's contribution depends on the caption...
    delta = base - apply(without, rest, cond["text_tokens"])
    delta_other = apply(with_map, params, other) - apply(without, rest, other)
    assert float(jnp.abs(delta - delta_other).max()) > 1e-3
    # ... is the same for every dropped caption, and vanishes with a zeroed projection.
    yes = jnp.ones((B,), bool)
    np.testing.assert_array_equal(apply(with_map, params, other, yes),
                                  apply(with_map, params, cond["text_tokens"], yes))
    p["text_spatial_proj"] = jax.tree.map(jnp.zeros_like, p["text_spatial_proj"])
    np.testing.assert_allclose(apply(with_map, params, other), apply(without, rest, other),
                               atol=1e-6)
    with pytest.raises(ValueError, match="text_spatial=4 needs text_depth > 0"):
        UNet(**{**DECODER, "text_spatial": 4, "text_depth": 0}).init(
            jax.random.key(0), x_t, t, z_i=cond["z_i"])


def test_norm_groups():
    assert [norm_groups(c) for c in (512, 64, 16, 48, 40, 3)] == [32, 32, 16, 24, 20, 3]


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (2, 5, 48), (3, 4, 6, 20)])
def test_group_norm_matches_the_textbook_formula(shape):
    # The layer reduces per channel first, then per group (faster on XLA:CPU); the numbers must be
    # those of one reduction over each group's (spatial, channels) block, in value and gradient.
    x = jax.random.normal(jax.random.key(0), shape) * 3 + 1.5
    cot = jax.random.normal(jax.random.key(1), shape)
    layer = GroupNorm(num_groups=32)
    params = layer.init(jax.random.key(2), x)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(3), a.shape) * 0.1, params)
    groups = norm_groups(shape[-1], 32)

    def reference(params, x):
        xg = x.reshape(x.shape[:-1] + (groups, -1))
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean = xg.mean(axis=axes, keepdims=True)
        var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
        y = ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
        p = nn.unbox(params)["params"]
        return y * p["scale"] + p["bias"]

    numerics.assert_close(layer.apply(params, x), reference(params, x))
    grads = [jax.grad(lambda p, x: jnp.sum(f(p, x) * cot), argnums=(0, 1))(params, x)
             for f in (layer.apply, reference)]
    numerics.assert_trees_close(*grads)


def test_resampling_matches_repeat_and_mean():
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    np.testing.assert_array_equal(upsample_nearest(x),
                                  jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    np.testing.assert_allclose(downsample_avg(x), x.reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4)),
                               atol=1e-6)


def test_bad_inputs_fail_clearly(decoder):
    model, params, _ = decoder
    x_t, t, cond = _decoder_inputs()

    def run(*args, model=model, **kwargs):
        jax.eval_shape(lambda: model.apply(params, *args, **kwargs))

    with pytest.raises(ValueError, match="x_t"):
        run(x_t[..., :2], t, **cond)
    with pytest.raises(ValueError, match="multiples of 2"):
        run(x_t[:, :31, :31], t, **cond)
    with pytest.raises(ValueError, match="t has shape"):
        run(x_t, t[:2], **cond)
    with pytest.raises(ValueError, match="z_i is required"):
        run(x_t, t, **{**cond, "z_i": None})
    with pytest.raises(ValueError, match="z_i has shape"):
        run(x_t, t, **{**cond, "z_i": cond["z_i"][:, :3]})
    with pytest.raises(ValueError, match="text_mask"):
        run(x_t, t, **{**cond, "text_mask": cond["text_mask"][:, :2]})
    with pytest.raises(ValueError, match="drop_text"):
        run(x_t, t, **cond, drop_text=jnp.zeros((2,), bool))
    with pytest.raises(ValueError, match="low_res was given"):
        run(x_t, t, **cond, low_res=x_t)
    upsampler = UNet(**UPSAMPLER)
    with pytest.raises(ValueError, match="low_res is required"):
        jax.eval_shape(upsampler.init, jax.random.key(0), x_t, t)
    with pytest.raises(ValueError, match="z_i was given"):
        jax.eval_shape(upsampler.init, jax.random.key(0), x_t, t, low_res=x_t, z_i=cond["z_i"])
    with pytest.raises(ValueError, match="attention_resolutions"):
        jax.eval_shape(UNet(**{**DECODER, "attention_resolutions": (12,)}).init,
                       jax.random.key(0), x_t, t, **cond)


# CLIP-text conditioning (Karlo's decoder): z_t and the CLIP text encoder's hidden states instead of
# the caption transformer; parity with diffusers is tested in tests/convert/test_karlo_unet.py.
KARLO = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
             image_size=32, head_channels=8, clip_dim=D, clip_tokens=4, clip_scale=1.0,
             clip_text_width=10, context_dim=24, learned_variance=True)


def _karlo_inputs(length=5):
    x_t, t, cond = _decoder_inputs()
    k = jax.random.split(jax.random.key(3), 2)
    return x_t, t, dict(z_i=cond["z_i"], z_t=jax.random.normal(k[0], (B, D)),
                        text_hidden=jax.random.normal(k[1], (B, length, 10)),
                        text_mask=jnp.arange(length)[None] < jnp.array([1, 5, 3, 2])[:, None],
                        drop_z_i=jnp.array([True, False, True, False]))


def test_clip_text_conditioning_params_and_names():
    model = unet_from_config(ml_collections.ConfigDict(KARLO))
    assert model.uses_clip_text and not model.uses_text and model.context_width == 24
    x_t, t, cond = _karlo_inputs()
    abstract = jax.eval_shape(model.init, jax.random.key(0), x_t, t, **cond)
    specs = assert_every_param_named(abstract, unnamed_ok=("null_z_i",))
    assert specs["clip_text_seq_proj"]["kernel"] == P(None, "embed")
    assert specs["clip_text_seq_norm"]["scale"] == P("norm")
    p = nn.meta.unbox(abstract)["params"]
    assert p["clip_text_emb_proj"]["kernel"].shape == (D, 64)  # into emb (4 * base)
    assert p["clip_text_seq_proj"]["kernel"].shape == (10, 24)  # hidden width -> context_dim
    assert p["clip_tokens_proj"]["kernel"].shape == (D, 4 * 24)
    assert p["down_1_attn_0"]["context_k_proj"]["kernel"].shape == (24, 4, 8)
    assert "text_encoder" not in p and "null_text_emb" not in p
    # Any caption length; the output is the decoder's.
    for length in (5, 9):
        x_t, t, cond = _karlo_inputs(length)
        assert jax.eval_shape(model.apply, abstract, x_t, t, **cond).shape == (B, 32, 32, 6)


def test_clip_text_conditioning_bad_inputs_fail_clearly():
    model = UNet(**KARLO)
    x_t, t, cond = _karlo_inputs()
    params = jax.eval_shape(model.init, jax.random.key(0), x_t, t, **cond)

    def run(model=model, **kwargs):
        jax.eval_shape(lambda: model.apply(params, x_t, t, **{**cond, **kwargs}))

    with pytest.raises(ValueError, match="z_t is required"):
        run(z_t=None)
    with pytest.raises(ValueError, match="text_hidden is required"):
        run(text_hidden=None)
    with pytest.raises(ValueError, match="text_hidden has shape"):
        run(text_hidden=cond["text_hidden"][..., :4])
    with pytest.raises(ValueError, match="text_mask has shape"):
        run(text_mask=cond["text_mask"][:, :2])
    with pytest.raises(ValueError, match="no learned null caption"):
        run(drop_text=jnp.zeros((B,), bool))
    with pytest.raises(ValueError, match="text_tokens was given"):
        run(text_tokens=jnp.zeros((B, L), jnp.int32))
    with pytest.raises(ValueError, match="text_depth=0"):
        text = {k: v for k, v in DECODER.items() if k.startswith("text_")}
        run(model=UNet(**{**KARLO, **text, "context_dim": text["text_width"]}))
    with pytest.raises(ValueError, match="context_dim=24 differs from text_width=16"):
        jax.eval_shape(lambda: UNet(**{**DECODER, "context_dim": 24}).init(
            jax.random.key(0), x_t, t, **_decoder_inputs()[2]))
    with pytest.raises(ValueError, match="z_t was given"):
        jax.eval_shape(lambda: UNet(**DECODER).init(jax.random.key(0), x_t, t,
                                                    **_decoder_inputs()[2], z_t=cond["z_t"]))
