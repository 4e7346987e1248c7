"""Tests of the diffusion prior (unclip_jax.models.prior)."""
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
from unclip_jax.models import layers
from unclip_jax.models.layers import timestep_embedding
from unclip_jax.models.prior import DiffusionPrior, prior_from_config

BATCH, D, TEXT_WIDTH, L = 4, 16, 24, 8
TINY = dict(embed_dim=D, text_width=TEXT_WIDTH, text_length=L, width=32, depth=2, num_heads=4)
Z_T, T_POS, Z_I, QUERY = L, L + 1, L + 2, L + 3  # sequence positions of the extra tokens


def _inputs(batch=BATCH, seed=0):
    """(z_i_t, t, z_t, text_hidden, text_mask); rows have 6, 8, 3, 6 ... real tokens."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    z_i_t = jax.random.normal(k1, (batch, D))
    t = jax.random.randint(k2, (batch,), 0, 1000)
    z_t = jax.random.normal(k3, (batch, D))
    text_hidden = jax.random.normal(k4, (batch, L, TEXT_WIDTH))
    lengths = jnp.array([6, 8, 3, 6, 5, 7, 2, 8][:batch] * (batch // 8 + 1))[:batch]
    text_mask = jnp.arange(L)[None] < lengths[:, None]
    return z_i_t, t, z_t, text_hidden, text_mask


@pytest.fixture(scope="module")
def model_and_vars():
    model = DiffusionPrior(**TINY)
    return model, nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *_inputs()))


@pytest.fixture(scope="module")
def apply_fn(model_and_vars):
    model, variables = model_and_vars
    return jax.jit(model.apply, static_argnames="return_sequence")


def test_output_shape_and_dtype_fp32(model_and_vars, apply_fn):
    _, variables = model_and_vars
    out = apply_fn(variables, *_inputs())
    assert out.shape == (BATCH, D) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    seq = apply_fn(variables, *_inputs(), return_sequence=True)
    assert seq.shape == (BATCH, L + 4, 32) and seq.dtype == jnp.float32


def test_bf16_activations_with_fp32_params(model_and_vars, apply_fn):
    _, fp32_vars = model_and_vars
    model = DiffusionPrior(**TINY, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    inputs = _inputs()
    abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(abstract)))
    out = jax.jit(model.apply)(fp32_vars, *inputs)
    assert out.shape == (BATCH, D) and out.dtype == jnp.float32
    reference = apply_fn(fp32_vars, *inputs)
    # bfloat16 activations (8-bit mantissa) through 2 blocks, round-off compounding per block.
    numerics.assert_close(out, reference, ulps=8, dtype=jnp.bfloat16)


def test_causal_mask_earlier_positions_ignore_the_noised_z_i(model_and_vars, apply_fn):
    _, variables = model_and_vars
    z_i_t, t, z_t, text, mask = _inputs()
    base = apply_fn(variables, z_i_t, t, z_t, text, mask, return_sequence=True)
    moved = apply_fn(variables, z_i_t + 1.0, t, z_t, text, mask, return_sequence=True)
    real = np.asarray(mask)
    # Text (real tokens), z_t and timestep positions are unchanged ...
    np.testing.assert_allclose(np.asarray(moved[:, :L])[real], np.asarray(base[:, :L])[real],
                               atol=1e-6)
    np.testing.assert_allclose(moved[:, Z_T:Z_I], base[:, Z_T:Z_I], atol=1e-6)
    # ... the z_i and query positions, and so the prediction, change.
    assert np.all(np.abs(moved[:, Z_I:] - base[:, Z_I:]).max(axis=-1) > 1e-3)
    out, out_moved = apply_fn(variables, z_i_t, t, z_t, text, mask), apply_fn(
        variables, z_i_t + 1.0, t, z_t, text, mask)
    assert np.all(np.abs(out_moved - out).max(axis=-1) > 1e-3)


def test_padded_text_tokens_change_nothing(model_and_vars, apply_fn):
    _, variables = model_and_vars
    z_i_t, t, z_t, text, mask = _inputs()
    noise = jax.random.normal(jax.random.key(5), text.shape) * 3.0
    text_padded_changed = jnp.where(mask[..., None], text, text + noise)
    args = (z_i_t, t, z_t)
    base = apply_fn(variables, *args, text, mask, return_sequence=True)
    moved = apply_fn(variables, *args, text_padded_changed, mask, return_sequence=True)
    keep = np.concatenate([np.asarray(mask), np.ones((BATCH, 4), bool)], axis=1)
    np.testing.assert_allclose(np.asarray(moved)[keep], np.asarray(base)[keep], atol=1e-6)
    np.testing.assert_allclose(apply_fn(variables, *args, text_padded_changed, mask),
                               apply_fn(variables, *args, text, mask), atol=1e-6)
    # A real token does matter.
    text_real_changed = text.at[:, 0].add(1.0)
    assert np.all(np.abs(apply_fn(variables, *args, text_real_changed, mask)
                         - apply_fn(variables, *args, text, mask)).max(axis=-1) > 1e-4)


def test_drop_text_ignores_caption_and_z_t(model_and_vars, apply_fn):
    _, variables = model_and_vars
    z_i_t, t, z_t, text, mask = _inputs()
    drop = jnp.array([True, False, True, False])
    _, _, other_z_t, other_text, _ = _inputs(seed=3)
    other_mask = jnp.ones_like(mask)
    out = apply_fn(variables, z_i_t, t, z_t, text, mask, drop)
    out_other = apply_fn(variables, z_i_t, t, other_z_t, other_text, other_mask, drop)
    np.testing.assert_allclose(out[drop], out_other[drop], atol=1e-6)
    assert np.all(np.abs(out[~drop] - out_other[~drop]).max(axis=-1) > 1e-4)
    # The null conditioning is a different input from the caption, and drop_text=False is the
    # same as no drop_text.
    out_cond = apply_fn(variables, z_i_t, t, z_t, text, mask)
    np.testing.assert_allclose(out[~drop], out_cond[~drop], atol=1e-6)
    assert np.all(np.abs(out[drop] - out_cond[drop]).max(axis=-1) > 1e-4)
    # The unconditional model still depends on the noised z_i and the timestep.
    assert np.abs(apply_fn(variables, z_i_t + 1, t, z_t, text, mask, drop)[drop]
                  - out[drop]).max() > 1e-3
    assert np.abs(apply_fn(variables, z_i_t, (t + 500) % 1000, z_t, text, mask, drop)[drop]
                  - out[drop]).max() > 1e-4


def test_drop_text_gradients_reach_the_null_embeddings(model_and_vars):
    model, variables = model_and_vars
    inputs = _inputs()
    drop = jnp.array([True, False, True, False])
    loss = lambda v: jnp.sum(jnp.square(model.apply(v, *inputs, drop)))
    grads = jax.jit(jax.grad(loss))(variables)["params"]
    assert float(jnp.abs(grads["null_text_token"]).max()) > 0
    assert float(jnp.abs(grads["null_z_t"]).max()) > 0


def test_timestep_embedding_scale_follows_num_timesteps(model_and_vars, apply_fn):
    _, variables = model_and_vars
    z_i_t, t, z_t, text, mask = _inputs()
    coarse = DiffusionPrior(**TINY, num_timesteps=100)
    numerics.assert_close(jax.jit(coarse.apply)(variables, z_i_t, t // 10, z_t, text, mask),
                          apply_fn(variables, z_i_t, (t // 10) * 10, z_t, text, mask))
    emb = timestep_embedding(jnp.array([0, 7]), 9)
    assert emb.shape == (2, 9) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_scan_and_unrolled_agree_after_restack(model_and_vars):
    model, variables = model_and_vars  # scan_layers=True is the default
    inputs = _inputs()
    unrolled = DiffusionPrior(**TINY, scan_layers=False)
    v_unrolled = jax.jit(unrolled.init)(jax.random.key(1), *inputs)
    restacked = layers.stack_layer_params(nn.meta.unbox(v_unrolled))
    assert jax.tree.map(jnp.shape, restacked) == jax.tree.map(jnp.shape, variables)
    numerics.assert_close(jax.jit(model.apply)(restacked, *inputs),
                          jax.jit(unrolled.apply)(v_unrolled, *inputs))


def test_remat_gives_the_same_gradients(model_and_vars):
    # Scanned layers (the default); layers.py's tests cover the unrolled stack and more policies.
    _, variables = model_and_vars
    inputs = _inputs()
    drop = jnp.array([True, False, False, False])

    def grads(policy):
        model = DiffusionPrior(**TINY, remat_policy=policy)
        loss = lambda v: jnp.sum(jnp.square(model.apply(v, *inputs, drop) - inputs[0]))
        return jax.jit(jax.grad(loss))(variables)

    # Same math, different fusion: round-off at the scale of each leaf's largest gradient (~300).
    numerics.assert_trees_close(grads("nothing_saveable"), grads("none"))


def test_every_param_has_logical_names():
    model = DiffusionPrior(**TINY)
    abstract = jax.eval_shape(model.init, jax.random.key(0), *_inputs())
    specs = assert_every_param_named(abstract, unnamed_ok=("bias",))
    assert specs["text_proj"]["kernel"] == P(None, "embed")
    assert specs["out_proj"]["kernel"] == P("embed", None)
    assert specs["null_z_t"] == P("embed")
    assert specs["position_embedding"] == P(None, "embed")
    assert specs["transformer"]["layers"]["mlp"]["fc1"]["kernel"] == P("layers", "embed", "mlp")
    assert abstract["params"]["position_embedding"].value.shape == (L + 4, 32)


def test_sharded_init_and_forward_match_unsharded(model_and_vars):
    _, reference_vars = model_and_vars
    mesh = parallel.make_mesh((2, 2, 2))
    rules = parallel.DEFAULT_RULES
    model = DiffusionPrior(**TINY)
    inputs = _inputs(batch=8)
    drop = jnp.array([True, False] * 4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
        shardings = parallel.logical_shardings(abstract, mesh, rules)
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), *inputs)
        params = variables["params"]
        fc1 = params["transformer"]["layers"]["mlp"]["fc1"]["kernel"].value
        assert fc1.sharding.spec == P(None, "fsdp", "tensor")
        assert params["text_proj"]["kernel"].value.sharding.spec == P(None, "fsdp")
        batch = jax.device_put((*inputs, drop), parallel.batch_sharding(mesh))
        out = jax.jit(model.apply)(variables, *batch)
        assert out.sharding.spec[0] == ("data", "fsdp")
    unboxed = nn.meta.unbox(variables)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 unboxed, reference_vars)  # same init as unsharded
    numerics.assert_close(out, model.apply(reference_vars, *inputs, drop))


def test_prior_from_config():
    cfg = ml_collections.ConfigDict(dict(
        width=32, depth=2, num_heads=4, mlp_ratio=2.0, dtype="bfloat16", param_dtype="float32",
        scan_layers=False, remat_policy="dots_saveable", attention_implementation=None,
        num_timesteps=1000, drop_text_prob=0.1, learning_rate=1e-4))
    model = prior_from_config(cfg, embed_dim=D, text_width=TEXT_WIDTH, text_length=L)
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    assert (model.mlp_ratio, model.scan_layers, model.remat_policy) == (2.0, False,
                                                                        "dots_saveable")
    assert model.sequence_length == L + 4
    abstract = jax.eval_shape(model.init, jax.random.key(0), *_inputs())
    assert "layers_1" in abstract["params"]["transformer"]
    with pytest.raises(ValueError, match="num_heads"):
        prior_from_config(ml_collections.ConfigDict(dict(width=32, depth=2)), embed_dim=D,
                          text_width=TEXT_WIDTH, text_length=L)


def test_bad_inputs_fail_clearly(model_and_vars):
    model, variables = model_and_vars
    z_i_t, t, z_t, text, mask = _inputs()
    with pytest.raises(ValueError, match="z_i_t"):
        model.apply(variables, z_i_t[:, :5], t, z_t, text, mask)
    with pytest.raises(ValueError, match="z_t"):
        model.apply(variables, z_i_t, t, z_t[:2], text, mask)
    with pytest.raises(ValueError, match="t has shape"):
        model.apply(variables, z_i_t, t[:, None], z_t, text, mask)
    with pytest.raises(ValueError, match="text_hidden"):
        model.apply(variables, z_i_t, t, z_t, text[:, :5], mask)
    with pytest.raises(ValueError, match="text_mask"):
        model.apply(variables, z_i_t, t, z_t, text, mask[:, :5])
    with pytest.raises(ValueError, match="drop_text"):
        model.apply(variables, z_i_t, t, z_t, text, mask, jnp.zeros((2,), bool))
    with pytest.raises(ValueError, match="dropout"):
        DiffusionPrior(**TINY, dropout=0.1).init(jax.random.key(0), *_inputs())
    with pytest.raises(ValueError, match="divisible"):
        DiffusionPrior(**{**TINY, "num_heads": 5}).init(jax.random.key(0), *_inputs())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_prefix_sampling_path_equals_the_full_forward(scan_layers):
    """encode_prefix + denoise (what sampling runs every step) == the full causal forward."""
    model = DiffusionPrior(embed_dim=16, text_width=24, text_length=7, width=32, depth=2, num_heads=4,
                           scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    b = 3
    z_i = jnp.asarray(rng.normal(size=(b, 16)), jnp.float32)
    z_t = jnp.asarray(rng.normal(size=(b, 16)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(b, 7, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None] < np.array([3, 7, 5])[:, None])
    t, drop = jnp.array([0, 500, 999]), jnp.array([False, True, False])
    params = model.init(jax.random.key(0), z_i, t, z_t, hidden, mask, drop)
    full = model.apply(params, z_i, t, z_t, hidden, mask, drop)
    prefix = model.apply(params, z_t, hidden, mask, drop, method=model.encode_prefix)
    assert prefix["kv"][0].shape == (2, b, 8, 4, 8)  # [depth, B, L + 1, heads, head_dim]
    numerics.assert_close(model.apply(params, prefix, z_i, t, method=model.denoise), full)


def test_new_options_default_to_the_original_param_tree():
    abstract = jax.eval_shape(DiffusionPrior(**TINY).init, jax.random.key(0), *_inputs())
    assert set(abstract["params"]) == {
        "text_proj", "z_t_proj", "z_i_proj", "time_embed_fc1", "time_embed_fc2", "null_text_token",
        "null_z_t", "query", "position_embedding", "transformer", "ln_final", "out_proj"}
    assert abstract["params"]["time_embed_fc1"]["kernel"].value.shape == (32, 32)


def test_imported_prior_options(model_and_vars):
    """null_conditioning=False, embedding_stats=True, time_embed_dim: Karlo's prior's options."""
    model = DiffusionPrior(**TINY, null_conditioning=False, embedding_stats=True, time_embed_dim=48)
    inputs = _inputs()
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *inputs))
    params = variables["params"]
    assert "null_text_token" not in params and "null_z_t" not in params
    assert params["time_embed_fc1"]["kernel"].shape == (32, 48)
    assert params["time_embed_fc2"]["kernel"].shape == (48, 32)
    # Initialised to the identity; forward is unchanged by the statistics.
    np.testing.assert_array_equal(params["clip_mean"], np.zeros(D))
    np.testing.assert_array_equal(params["clip_std"], np.ones(D))
    out = jax.jit(model.apply)(variables, *inputs)
    stats = {**params, "clip_mean": params["clip_mean"] + 3.0, "clip_std": params["clip_std"] * 2}
    numerics.assert_close(jax.jit(model.apply)({"params": stats}, *inputs), out)
    x = inputs[0]
    denorm = model.apply({"params": stats}, x, method=model.denormalize_embedding)
    numerics.assert_close(denorm, x * 2.0 + 3.0)
    numerics.assert_close(model.apply({"params": stats}, denorm, method=model.normalize_embedding), x)
    with pytest.raises(ValueError, match="null_conditioning=False"):
        model.apply(variables, *inputs, jnp.zeros((BATCH,), bool))
    with pytest.raises(ValueError, match="null_conditioning=False"):
        model.apply(variables, *inputs[2:], jnp.zeros((BATCH,), bool), method=model.encode_prefix)
    # The KV-cached sampling path still equals the full forward.
    prefix = model.apply(variables, *inputs[2:], method=model.encode_prefix)
    numerics.assert_close(model.apply(variables, prefix, *inputs[:2], method=model.denoise), out)
    specs = assert_every_param_named(jax.eval_shape(model.init, jax.random.key(0), *inputs),
                                     unnamed_ok=("bias",))
    assert specs["clip_std"] == P("norm") and specs["time_embed_fc1"]["kernel"] == P("embed", "mlp")
    # Without embedding_stats both maps are the identity.
    plain, plain_vars = model_and_vars
    numerics.assert_close(plain.apply(plain_vars, x, method=plain.denormalize_embedding), x)
    numerics.assert_close(plain.apply(plain_vars, x, method=plain.normalize_embedding), x)
    with pytest.raises(ValueError, match="time_embed_dim"):
        DiffusionPrior(**TINY, time_embed_dim=-1).init(jax.random.key(0), *inputs)


def test_prior_from_config_new_options():
    cfg = ml_collections.ConfigDict(dict(width=32, depth=2, num_heads=4, null_conditioning=False,
                                         embedding_stats=True, time_embed_dim=0))
    model = prior_from_config(cfg, embed_dim=D, text_width=TEXT_WIDTH, text_length=L)
    assert (model.null_conditioning, model.embedding_stats, model.time_embed_dim) == (False, True,
                                                                                      None)
    model = prior_from_config(dict(width=32, depth=2, num_heads=4, time_embed_dim=64), embed_dim=D,
                              text_width=TEXT_WIDTH, text_length=L)
    assert (model.null_conditioning, model.embedding_stats, model.time_embed_dim) == (True, False, 64)
