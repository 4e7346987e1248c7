"""Tests of the transformer building blocks in unclip_jax.models.layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from tests import numerics
from unclip_jax import parallel
from unclip_jax.models import layers

WIDTH, HEADS, LENGTH, BATCH = 32, 4, 6, 2


def _x(seed=0, length=LENGTH, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (BATCH, length, WIDTH), dtype)


def _all_leaves_named(variables):
    """Every param >1-D has at least one logical name (None entries alone do not count)."""
    specs = nn.get_partition_spec(variables)
    shapes = jax.tree.map(jnp.shape, nn.meta.unbox(variables))
    bad = []
    for (path, spec), shape in zip(jax.tree_util.tree_leaves_with_path(specs),
                                   jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple))):
        if len(shape) > 1 and not any(name is not None for name in spec):
            bad.append(jax.tree_util.keystr(path))
    return bad


def _boxes(variables):
    return jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


# ---------------------------------------------------------------------------------------------
# Activations, LayerNorm, MLP
# ---------------------------------------------------------------------------------------------

def test_activations_match_their_formulas():
    x = jnp.linspace(-4.0, 4.0, 17)
    np.testing.assert_allclose(layers.get_activation("quick_gelu")(x),
                               x * jax.nn.sigmoid(1.702 * x), rtol=1e-6)
    exact = 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2.0)))
    np.testing.assert_allclose(layers.get_activation("gelu")(x), exact, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers.get_activation("gelu_tanh")(x),
                               jax.nn.gelu(x, approximate=True), rtol=1e-6)
    with pytest.raises(ValueError, match="relu6"):
        layers.get_activation("relu6")
    with pytest.raises(ValueError, match="relu6"):
        layers.Mlp(hidden_dim=8, activation="relu6").init(jax.random.key(0), _x())


def test_layernorm_computes_in_fp32_and_returns_dtype():
    x = _x(dtype=jnp.bfloat16) * 100 + 3
    ln = layers.LayerNorm(dtype=jnp.bfloat16)
    variables = ln.init(jax.random.key(0), x)
    y = ln.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    xf = x.astype(jnp.float32)
    ref = (xf - xf.mean(-1, keepdims=True)) / jnp.sqrt(xf.var(-1, keepdims=True) + 1e-5)
    # Statistics in float32 from the same bfloat16 input: only the output's rounding to bfloat16.
    numerics.assert_close(np.asarray(y, np.float32), ref, ulps=2, dtype=jnp.bfloat16)
    assert nn.get_partition_spec(variables)["params"]["scale"] == P("norm")


def test_mlp_shapes_and_names():
    mlp = layers.Mlp(hidden_dim=4 * WIDTH, activation="gelu")
    variables = mlp.init(jax.random.key(0), _x())
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["fc1"]["kernel"] == P("embed", "mlp")
    assert specs["fc2"]["kernel"] == P("mlp", "embed")
    assert specs["fc1"]["bias"] == P("mlp")
    assert mlp.apply(variables, _x()).shape == (BATCH, LENGTH, WIDTH)


def test_count_params_of_boxed_unboxed_and_abstract_trees():
    mlp = layers.Mlp(hidden_dim=4 * WIDTH)
    expected = 2 * WIDTH * 4 * WIDTH + 4 * WIDTH + WIDTH  # two kernels, two biases
    boxed = mlp.init(jax.random.key(0), _x())
    abstract = jax.eval_shape(mlp.init, jax.random.key(0), _x())
    assert layers.count_params(boxed) == layers.count_params(nn.meta.unbox(boxed)) == expected
    assert layers.count_params(abstract) == expected


def test_as_dtype_converts_names_and_keeps_dtypes():
    assert layers.as_dtype("bfloat16") == jnp.bfloat16
    assert layers.as_dtype(jnp.float32) is jnp.float32


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_shapes_dtypes_and_param_layout(dtype):
    attn = layers.MultiHeadAttention(num_heads=HEADS, dtype=dtype, param_dtype=jnp.float32)
    variables = attn.init(jax.random.key(0), _x())
    params = nn.meta.unbox(variables)["params"]
    assert params["q_proj"]["kernel"].shape == (WIDTH, HEADS, WIDTH // HEADS)
    assert params["q_proj"]["bias"].shape == (HEADS, WIDTH // HEADS)
    assert params["out_proj"]["kernel"].shape == (HEADS, WIDTH // HEADS, WIDTH)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    y = attn.apply(variables, _x())
    assert y.shape == (BATCH, LENGTH, WIDTH) and y.dtype == dtype
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["k_proj"]["kernel"] == P("embed", "heads", "kv")
    assert specs["out_proj"]["kernel"] == P("heads", "kv", "embed")


def _reference_attention(params, x, mask):
    q = jnp.einsum("ble,ehd->blhd", x, params["q_proj"]["kernel"]) + params["q_proj"]["bias"]
    k = jnp.einsum("ble,ehd->blhd", x, params["k_proj"]["kernel"]) + params["k_proj"]["bias"]
    v = jnp.einsum("ble,ehd->blhd", x, params["v_proj"]["kernel"]) + params["v_proj"]["bias"]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, -1e30)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
    return jnp.einsum("bqhd,hde->bqe", out, params["out_proj"]["kernel"]) + params["out_proj"]["bias"]


def test_attention_matches_reference_with_causal_and_padding_masks():
    attn = layers.MultiHeadAttention(num_heads=HEADS)
    x = _x()
    variables = attn.init(jax.random.key(1), x)
    params = nn.meta.unbox(variables)["params"]
    keep = jnp.array([[True] * LENGTH, [True] * (LENGTH - 2) + [False] * 2])
    causal = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
    mask = causal[None, None] & keep[:, None, None, :]
    y = attn.apply(variables, x, causal=True, key_padding_mask=keep)
    numerics.assert_close(y, _reference_attention(params, x, mask))


def test_causal_attention_ignores_later_positions():
    attn = layers.MultiHeadAttention(num_heads=HEADS)
    x = _x()
    variables = attn.init(jax.random.key(0), x)
    x2 = x.at[:, -1].set(7.0)
    y, y2 = attn.apply(variables, x, causal=True), attn.apply(variables, x2, causal=True)
    np.testing.assert_allclose(y[:, :-1], y2[:, :-1], atol=1e-6)
    assert not np.allclose(y[:, -1], y2[:, -1])
    # Without the mask the earlier positions do see the change.
    assert not np.allclose(attn.apply(variables, x)[:, 0], attn.apply(variables, x2)[:, 0])


def test_key_padding_mask_hides_padded_keys():
    attn = layers.MultiHeadAttention(num_heads=HEADS)
    x = _x()
    variables = attn.init(jax.random.key(0), x)
    keep = jnp.array([True] * (LENGTH - 2) + [False] * 2)[None].repeat(BATCH, 0)
    x2 = x.at[:, -2:].set(-5.0)
    y = attn.apply(variables, x, key_padding_mask=keep)
    y2 = attn.apply(variables, x2, key_padding_mask=keep)
    np.testing.assert_allclose(y[:, :-2], y2[:, :-2], atol=1e-6)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn.apply(variables, x, key_padding_mask=keep[:, :3])


# ---------------------------------------------------------------------------------------------
# Transformer stack: scan, remat, partitioning
# ---------------------------------------------------------------------------------------------

def _stack(**kw):
    return layers.Transformer(depth=2, num_heads=HEADS, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transformer_shapes_dtypes(dtype):
    model = _stack(dtype=dtype, param_dtype=jnp.float32, causal=True)
    variables = model.init(jax.random.key(0), _x())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables)))
    y = model.apply(variables, _x())
    assert y.shape == (BATCH, LENGTH, WIDTH) and y.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_scan_and_unrolled_layouts_agree_through_restack():
    x = _x()
    unrolled, scanned = _stack(causal=True), _stack(causal=True, scan_layers=True)
    v_unrolled = unrolled.init(jax.random.key(0), x)
    v_scanned = scanned.init(jax.random.key(0), x)
    assert set(v_unrolled["params"]) == {"layers_0", "layers_1"}
    assert set(v_scanned["params"]) == {"layers"}

    stacked = layers.stack_layer_params(v_unrolled)
    assert (jax.tree.map(jnp.shape, nn.meta.unbox(stacked))
            == jax.tree.map(jnp.shape, nn.meta.unbox(v_scanned)))
    assert nn.get_partition_spec(stacked) == nn.get_partition_spec(v_scanned)
    numerics.assert_close(scanned.apply(stacked, x), unrolled.apply(v_unrolled, x))

    back = layers.unstack_layer_params(v_scanned)
    assert nn.get_partition_spec(back) == nn.get_partition_spec(v_unrolled)
    numerics.assert_close(unrolled.apply(back, x), scanned.apply(v_scanned, x))
    # Plain (unboxed) trees convert too.
    plain = layers.stack_layer_params(nn.meta.unbox(v_unrolled))
    numerics.assert_close(scanned.apply(plain, x), unrolled.apply(v_unrolled, x))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_policies_give_the_same_gradients(scan_layers):
    x = _x()
    keep = jnp.ones((BATCH, LENGTH), bool).at[1, -1].set(False)
    variables = nn.meta.unbox(_stack(scan_layers=scan_layers).init(jax.random.key(0), x))

    def grads(policy):
        model = _stack(scan_layers=scan_layers, remat_policy=policy)
        loss = lambda v: jnp.sum(jnp.square(model.apply(v, x, keep)))
        return jax.jit(jax.grad(loss))(variables)

    reference = grads("none")
    for policy in ("full", "dots_saveable", "nothing_saveable"):
        numerics.assert_trees_close(grads(policy), reference)


def test_bad_config_names_fail_clearly():
    with pytest.raises(ValueError, match="remat_policy"):
        _stack(remat_policy="sometimes").init(jax.random.key(0), _x())
    with pytest.raises(ValueError, match="divisible"):
        layers.MultiHeadAttention(num_heads=5).init(jax.random.key(0), _x())


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_has_logical_names(scan_layers):
    variables = _stack(scan_layers=scan_layers).init(jax.random.key(0), _x())
    assert len(_boxes(variables)) == len(jax.tree.leaves(nn.meta.unbox(variables)))
    assert _all_leaves_named(variables) == []


def test_sharded_init_follows_the_rules_and_boxed_apply_works():
    mesh = parallel.make_mesh((2, 2, 2))
    rules = parallel.DEFAULT_RULES
    x = _x(length=8)
    model = _stack(scan_layers=True, causal=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), x)
        shardings = parallel.logical_shardings(abstract, mesh, rules)
        variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x)
        params = variables["params"]["layers"]
        assert params["mlp"]["fc1"]["kernel"].value.sharding.spec == P(None, "fsdp", "tensor")
        assert params["mlp"]["fc2"]["kernel"].value.sharding.spec == P(None, "tensor", "fsdp")
        assert params["self_attn"]["q_proj"]["kernel"].value.sharding.spec == P(
            None, "fsdp", "tensor", None)
        assert params["self_attn"]["out_proj"]["kernel"].value.sharding.spec == P(
            None, "tensor", None, "fsdp")
        y = jax.jit(model.apply)(variables, x)  # boxed tree straight into apply
    numerics.assert_close(y, model.apply(nn.meta.unbox(variables), x))


# ---------------------------------------------------------------------------------------------
# Attention implementations and mixed-precision matmuls
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_einsum_attention_matches_jax_attention_values_and_gradients(causal):
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (BATCH, LENGTH, HEADS, 8)) for key in keys)
    keep = jnp.array([[True] * LENGTH, [True] * (LENGTH - 2) + [False] * 2])[:, None, None, :]

    def loss(impl, q, k, v):
        out = layers.dot_product_attention(q, k, v, mask=keep, is_causal=causal, implementation=impl)
        return jnp.sum(jnp.sin(out)), out

    (_, ours), ours_grads = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)("einsum", q, k, v)
    (_, ref), ref_grads = jax.value_and_grad(loss, (1, 2, 3), has_aux=True)("xla", q, k, v)
    numerics.assert_close(ours, ref)
    numerics.assert_trees_close(ours_grads, ref_grads)


def _rounded(x, dtype=jnp.bfloat16):
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("k_dim, n_dim", [(16, 48), (48, 16)])  # both backward layouts of dw
def test_low_precision_matmul_rounds_operands_forward_and_backward(k_dim, n_dim):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, k_dim))
    w = jax.random.normal(kw, (k_dim, n_dim))
    g = jax.random.normal(kg, (3, 5, n_dim))
    y, vjp = jax.vjp(lambda x, w: layers.matmul(x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    assert y.shape == (3, 5, n_dim) and dx.shape == x.shape and dw.shape == w.shape
    xr, wr, gr = _rounded(x), _rounded(w), _rounded(g)
    # Exactly the products of the bfloat16-rounded operands (float32 accumulation), also backward.
    # The products of bfloat16 values are exact in float32; only the float32 sums round.
    numerics.assert_close(y, xr @ wr)
    numerics.assert_close(dx, gr @ wr.T)
    numerics.assert_close(dw, xr.reshape(-1, k_dim).T @ gr.reshape(-1, n_dim))
    # ... and not the float32 products (the rounding is really there).
    assert np.abs(np.asarray(dw) - np.asarray(x).reshape(-1, k_dim).T @ np.asarray(g).reshape(
        -1, n_dim)).max() > 1e-3
    # No matmul_dtype, or the activations' own dtype: the plain product.
    np.testing.assert_allclose(layers.matmul(x, w), x @ w, rtol=1e-6)
    np.testing.assert_allclose(layers.matmul(x, w, jnp.float32), x @ w, rtol=1e-6)


def test_transformer_with_bfloat16_matmuls_tracks_float32():
    x = _x()
    kwargs = dict(depth=2, num_heads=HEADS, causal=True, scan_layers=True,
                  remat_policy="nothing_saveable")
    ref, mixed = layers.Transformer(**kwargs), layers.Transformer(matmul_dtype=jnp.bfloat16, **kwargs)
    variables = ref.init(jax.random.key(0), x)  # Same param tree: matmul_dtype adds no params.
    assert jax.tree.structure(variables) == jax.tree.structure(mixed.init(jax.random.key(0), x))

    def loss(model, params):
        return jnp.mean(model.apply(params, x) ** 2)

    l_ref, g_ref = jax.value_and_grad(loss, 1)(ref, variables)
    l_mix, g_mix = jax.value_and_grad(loss, 1)(mixed, variables)
    assert abs(float(l_mix) - float(l_ref)) < 2e-2 * abs(float(l_ref))
    for a, b in zip(jax.tree.leaves(nn.meta.unbox(g_mix)), jax.tree.leaves(nn.meta.unbox(g_ref))):
        assert a.dtype == jnp.float32
        scale = float(jnp.abs(b).max()) + 1e-6
        assert float(jnp.abs(a - b).max()) < 0.05 * scale
