"""Tests of the CLIP model (unclip_jax.models.clip)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from tests import numerics
from unclip_jax import parallel
from unclip_jax.models import layers
from unclip_jax.models.clip import CLIP, clip_model_from_config

BATCH, CONTEXT, VOCAB = 4, 8, 50
TINY = dict(embed_dim=24, image_size=32, patch_size=8, vision_width=32, vision_depth=2,
            vision_heads=4, vocab_size=VOCAB, context_length=CONTEXT, text_width=32, text_depth=2,
            text_heads=4)


def _inputs(batch=BATCH, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(k1, (batch, 32, 32, 3))
    tokens = jax.random.randint(k2, (batch, CONTEXT), 1, VOCAB - 1)
    tokens = tokens.at[:, 0].set(VOCAB - 2).at[:, 5].set(VOCAB - 1)  # BOS ... EOT at 5
    return images, tokens


@pytest.fixture(scope="module")
def fp32_model_and_vars():
    model = CLIP(**TINY)
    return model, model.init(jax.random.key(0), *_inputs())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_outputs_are_normalised_fp32_with_fp32_params(dtype):
    model = CLIP(**TINY, dtype=dtype, param_dtype=jnp.float32)
    images, tokens = _inputs()
    variables = model.init(jax.random.key(0), images, tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables)))
    z_i, z_t, logit_scale = jax.jit(model.apply)(variables, images, tokens)
    assert z_i.shape == z_t.shape == (BATCH, 24)
    assert z_i.dtype == z_t.dtype == logit_scale.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(z_i, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(z_t, axis=-1), 1.0, rtol=1e-5)
    assert logit_scale.shape == ()
    np.testing.assert_allclose(logit_scale, 1 / 0.07, rtol=1e-5)


def test_encoders_and_hidden_states(fp32_model_and_vars):
    model, variables = fp32_model_and_vars
    images, tokens = _inputs()
    z_i_raw = model.apply(variables, images, normalize=False, method=CLIP.encode_image)
    z_i = model.apply(variables, images, method=CLIP.encode_image)
    np.testing.assert_allclose(z_i, z_i_raw / jnp.linalg.norm(z_i_raw, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    z_t, hidden = model.apply(variables, tokens, return_hidden=True, method=CLIP.encode_text)
    assert z_t.shape == (BATCH, 24)
    assert hidden.shape == (BATCH, CONTEXT, 32) and hidden.dtype == jnp.float32


def test_logit_scale_is_clipped_at_100(fp32_model_and_vars):
    model, variables = fp32_model_and_vars
    params = nn.meta.unbox(variables)["params"]
    params = {**params, "logit_scale": jnp.asarray(10.0)}
    _, _, logit_scale = model.apply({"params": params}, *_inputs())
    assert float(logit_scale) == 100.0


def test_wrong_shapes_fail_clearly(fp32_model_and_vars):
    model, variables = fp32_model_and_vars
    images, tokens = _inputs()
    with pytest.raises(ValueError, match=r"image_size=32"):
        model.apply(variables, jnp.zeros((2, 64, 64, 3)), method=CLIP.encode_image)
    with pytest.raises(ValueError, match=r"context_length=8"):
        model.apply(variables, tokens[:, :5], method=CLIP.encode_text)
    with pytest.raises(ValueError, match="eot_pooling"):
        CLIP(**TINY, eot_pooling="last").init(jax.random.key(0), images, tokens)


def test_text_tower_is_causal(fp32_model_and_vars):
    model, variables = fp32_model_and_vars
    _, tokens = _inputs()
    changed = tokens.at[:, 6].set(3)
    _, h = model.apply(variables, tokens, return_hidden=True, method=CLIP.encode_text)
    _, h2 = model.apply(variables, changed, return_hidden=True, method=CLIP.encode_text)
    np.testing.assert_allclose(h[:, :6], h2[:, :6], atol=1e-6)
    assert not np.allclose(h[:, 6:], h2[:, 6:])


def _projected(variables, hidden, positions):
    kernel = nn.meta.unbox(variables)["params"]["text_projection"]["kernel"]
    return hidden[jnp.arange(hidden.shape[0]), positions] @ kernel


@pytest.mark.parametrize("pooling, tokens, eot_positions", [
    pytest.param({}, [[48, 3, 4, 49, 49, 49, 49, 49],  # EOT (max id 49) at 3, then padding
                      [48, 3, 4, 5, 6, 7, 8, 49]], [3, 7], id="argmax_picks_the_largest_id"),
    pytest.param({"eot_pooling": "eot_id", "eot_token_id": 2},  # EOT is not the largest id
                 [[1, 40, 41, 2, 2, 2, 2, 2],
                  [1, 45, 2, 30, 31, 2, 0, 0]], [3, 2], id="eot_id_picks_the_first_eot"),
])
def test_eot_pooling(fp32_model_and_vars, pooling, tokens, eot_positions):
    _, variables = fp32_model_and_vars
    model = CLIP(**TINY, **pooling)
    z_t, hidden = model.apply(variables, jnp.array(tokens, jnp.int32), return_hidden=True,
                              normalize=False, method=CLIP.encode_text)
    np.testing.assert_allclose(z_t, _projected(variables, hidden, jnp.array(eot_positions)),
                               rtol=1e-5, atol=1e-5)


def test_scan_layers_matches_unrolled_after_restack(fp32_model_and_vars):
    model, variables = fp32_model_and_vars
    scanned = CLIP(**TINY, scan_layers=True, remat_policy="full")
    stacked = layers.stack_layer_params(variables)
    abstract = jax.eval_shape(scanned.init, jax.random.key(0), *_inputs())
    assert jax.tree.map(jnp.shape, nn.meta.unbox(stacked)) == jax.tree.map(
        jnp.shape, nn.meta.unbox(abstract))
    assert nn.get_partition_spec(stacked) == nn.get_partition_spec(abstract)
    for a, b in zip(scanned.apply(stacked, *_inputs()), model.apply(variables, *_inputs())):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_every_param_has_logical_names(fp32_model_and_vars):
    _, variables = fp32_model_and_vars
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) for b in boxes)
    specs = nn.get_partition_spec(variables)
    shapes = jax.tree.leaves(jax.tree.map(lambda x: x.shape, nn.meta.unbox(variables)),
                             is_leaf=lambda s: isinstance(s, tuple))
    for (path, spec), shape in zip(jax.tree_util.tree_leaves_with_path(specs), shapes):
        assert len(spec) == len(shape), jax.tree_util.keystr(path)
        if len(shape) > 1:
            assert any(name is not None for name in spec), jax.tree_util.keystr(path)
    params = specs["params"]
    assert params["text_model"]["token_embedding"]["embedding"] == P("vocab", "embed")
    assert params["vision_model"]["patch_embedding"]["kernel"] == P(None, None, "conv_in", "embed")


def test_sharded_init_on_8_devices():
    mesh = parallel.make_mesh((2, 2, 2))
    rules = parallel.DEFAULT_RULES
    model = CLIP(**TINY, dtype=jnp.bfloat16, scan_layers=True, remat_policy="dots_saveable")
    images, tokens = _inputs(batch=8)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
        shardings = parallel.logical_shardings(abstract, mesh, rules)
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), images, tokens)
        params = variables["params"]
        encoder = params["text_model"]["encoder"]["layers"]
        assert encoder["mlp"]["fc1"]["kernel"].value.sharding.spec == P(None, "fsdp", "tensor")
        assert encoder["self_attn"]["v_proj"]["kernel"].value.sharding.spec == P(
            None, "fsdp", "tensor", None)
        assert params["text_model"]["token_embedding"]["embedding"].value.sharding.spec == P(
            "tensor", "fsdp")
        assert params["visual_projection"]["kernel"].value.sharding.spec == P("fsdp", None)
        z_i, z_t, _ = jax.jit(model.apply)(variables, images, tokens)
    np.testing.assert_allclose(jnp.linalg.norm(z_i, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(z_t, axis=-1), 1.0, rtol=1e-5)


def test_clip_model_from_config():
    cfg = ml_collections.ConfigDict(dict(
        embed_dim=16, image_size=32, patch_size=16, vision_width=32, vision_depth=1,
        vision_heads=2, text_width=32, text_depth=1, text_heads=2, context_length=CONTEXT,
        dtype="bfloat16", learning_rate=1e-3))  # unrelated fields are ignored
    model = clip_model_from_config(cfg, vocab_size=60, eot_token_id=7)
    assert model.vocab_size == 60 and model.eot_token_id == 7 and model.eot_pooling == "eot_id"
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    assert model.mlp_ratio == 4.0 and model.activation == "quick_gelu"
    assert not model.scan_layers and model.remat_policy == "none"
    abstract = jax.eval_shape(model.init, jax.random.key(0), *_inputs())
    assert nn.meta.unbox(abstract)["params"]["logit_scale"].shape == ()
    model = clip_model_from_config(cfg, vocab_size=60, eot_token_id=59, eot_pooling="argmax",
                                   context_length=12)
    assert model.eot_pooling == "argmax" and model.context_length == 12
    del cfg["text_heads"]
    with pytest.raises(ValueError, match="text_heads"):
        clip_model_from_config(cfg, vocab_size=60, eot_token_id=7)


def test_logit_scale_initialised_to_log_inverse_temperature(fp32_model_and_vars):
    _, variables = fp32_model_and_vars
    value = nn.meta.unbox(variables)["params"]["logit_scale"]
    np.testing.assert_allclose(value, math.log(1 / 0.07), rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_matmul_operands_stay_close_to_float32(fp32_model_and_vars):
    model, variables = fp32_model_and_vars
    images, tokens = _inputs()
    mixed = CLIP(**TINY, matmul_dtype=jnp.bfloat16)
    z_i, z_t, _ = model.apply(variables, images, tokens)
    z_i16, z_t16, _ = mixed.apply(variables, images, tokens)  # same params: only the products change
    assert z_i16.dtype == z_t16.dtype == jnp.float32
    # bfloat16 operands (8-bit mantissa) in every product, through 2 blocks per tower.
    numerics.assert_close(z_i16, z_i, ulps=8, dtype=jnp.bfloat16)
    numerics.assert_close(z_t16, z_t, ulps=8, dtype=jnp.bfloat16)
    assert not np.allclose(z_i16, z_i, atol=1e-6)  # the bfloat16 products did run

    def loss(params, m):
        a, b, s = m.apply({"params": params}, images, tokens)
        return jnp.sum(s * a @ b.T)

    g32 = jax.grad(loss)(variables["params"], model)
    g16 = jax.grad(loss)(variables["params"], mixed)
    assert all(np.all(np.isfinite(b)) for b in jax.tree.leaves(g16))
    numerics.assert_trees_close(g16, g32, ulps=8, dtype=jnp.bfloat16)
    cfg = ml_collections.ConfigDict(dict(TINY, matmul_dtype="bfloat16"))
    assert clip_model_from_config(cfg, vocab_size=VOCAB, eot_token_id=VOCAB - 1).matmul_dtype == jnp.bfloat16
