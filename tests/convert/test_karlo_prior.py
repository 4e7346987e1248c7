"""Parity with diffusers' `PriorTransformer` (Karlo's prior): a converted random prior predicts the
same image embedding, through the full forward and through the KV-cached sampling path.

A tiny `PriorTransformer` with every parameter randomised (positions, prd query and non-trivial
clip_mean / clip_std included) is converted with `convert.karlo_prior` and both run on the same
inputs. Needs CPU torch and diffusers (the `[parity]` extra); skipped without them.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests import numerics  # noqa: E402
from tests.convert import karlo_tiny as karlo_tiny_models  # noqa: E402
from tests.models.param_checks import assert_every_param_named  # noqa: E402
from unclip_jax.convert import karlo_prior  # noqa: E402
from unclip_jax.models.prior import prior_from_config  # noqa: E402

D, L, HEADS, HEAD_DIM = 16, 6, 2, 8
TINY = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2, embedding_dim=D,
            num_embeddings=L, additional_embeddings=4)
# The diffusers version of Karlo's published prior/config.json: the rest are defaults.
KARLO_CONFIG = {"_class_name": "PriorTransformer", "_diffusers_version": "0.12.0.dev0",
                "attention_head_dim": 64, "embedding_dim": 768, "num_attention_heads": 32,
                "num_embeddings": 77, "num_layers": 20}
BATCH = 5
LENGTHS = [6, 2, 4, 1, 5]  # real text tokens per row (the first is BOS: always real)
STEPS = [0, 17, 250, 640, 999]


def _random_prior(seed, **overrides):
    return karlo_tiny_models.random_prior(seed, {**TINY, **overrides})


def _inputs(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    z_i_t = rng.normal(size=(b, D)).astype(np.float32)
    z_t = rng.normal(size=(b, D)).astype(np.float32)
    hidden = rng.normal(size=(b, L, D)).astype(np.float32)
    mask = np.arange(L)[None] < np.asarray(lengths)[:, None]
    return z_i_t, z_t, hidden, mask


def _theirs(model, z_i_t, t, z_t, hidden, mask):
    with torch.no_grad():
        out = model(torch.from_numpy(z_i_t), timestep=torch.as_tensor(np.asarray(t, np.int64)),
                    proj_embedding=torch.from_numpy(z_t),
                    encoder_hidden_states=torch.from_numpy(hidden),
                    attention_mask=torch.from_numpy(mask))
    return out.predicted_image_embedding.numpy()


def _ours(config, state, scan_layers=True):
    block = karlo_prior.prior_config(config)
    model = prior_from_config({**block, "scan_layers": scan_layers, "remat_policy": "none"},
                              **karlo_prior.prior_sizes(config))
    params = karlo_prior.convert_prior(state, config, scan_layers=scan_layers)
    return model, {"params": jax.tree.map(jnp.asarray, params)}


def _assert_parity(actual, desired):
    # Two libraries in float32 (oneDNN vs XLA kernels): round-off apart, and within 1e-4.
    numerics.assert_close(actual, desired)
    assert np.max(np.abs(np.asarray(actual) - desired)) < 1e-4


@pytest.fixture(scope="module")
def karlo_tiny():
    model, config, state = _random_prior(0)
    ours, variables = _ours(config, state)
    return model, config, state, ours, variables


def test_full_forward_matches_diffusers(karlo_tiny):
    theirs_model, _, _, model, variables = karlo_tiny
    z_i_t, z_t, hidden, mask = _inputs()
    apply = jax.jit(model.apply)
    for shift in (0, 1, 2):  # several timesteps per row
        t = np.roll(np.asarray(STEPS), shift)
        desired = _theirs(theirs_model, z_i_t, t, z_t, hidden, mask)
        _assert_parity(apply(variables, z_i_t, jnp.asarray(t), z_t, hidden, mask), desired)
    # Without padding (diffusers needs the mask for its causal mask: an all-True one here).
    full = np.ones_like(mask)
    t = np.asarray(STEPS)
    _assert_parity(apply(variables, z_i_t, jnp.asarray(t), z_t, hidden, full),
                   _theirs(theirs_model, z_i_t, t, z_t, hidden, full))
    _assert_parity(apply(variables, z_i_t, jnp.asarray(t), z_t, hidden, None),
                   _theirs(theirs_model, z_i_t, t, z_t, hidden, full))


def test_conditioning_and_padding_matter_as_in_diffusers(karlo_tiny):
    """The text conditioning changes the prediction, padded tokens do not (both sides agree)."""
    theirs_model, _, _, model, variables = karlo_tiny
    z_i_t, z_t, hidden, mask = _inputs(seed=1)
    t = np.asarray(STEPS)
    apply = jax.jit(model.apply)
    base = apply(variables, z_i_t, jnp.asarray(t), z_t, hidden, mask)
    padded_changed = np.where(mask[..., None], hidden, hidden + 5.0).astype(np.float32)
    numerics.assert_close(apply(variables, z_i_t, jnp.asarray(t), z_t, padded_changed, mask), base)
    other_text = (hidden + np.where(mask[..., None], 1.0, 0.0)).astype(np.float32)
    moved = apply(variables, z_i_t, jnp.asarray(t), z_t, other_text, mask)
    assert np.all(np.abs(moved - base).max(axis=-1) > 1e-3)
    _assert_parity(moved, _theirs(theirs_model, z_i_t, t, z_t, other_text, mask))
    other_z_t = (z_t + 1.0).astype(np.float32)
    moved = apply(variables, z_i_t, jnp.asarray(t), other_z_t, hidden, mask)
    assert np.all(np.abs(moved - base).max(axis=-1) > 1e-3)
    _assert_parity(moved, _theirs(theirs_model, z_i_t, t, other_z_t, hidden, mask))


def test_cached_sampling_path_matches_the_full_forward_and_diffusers(karlo_tiny):
    theirs_model, _, _, model, variables = karlo_tiny
    z_i_t, z_t, hidden, mask = _inputs(seed=2)
    prefix = jax.jit(lambda v, *a: model.apply(v, *a, method=model.encode_prefix))(
        variables, z_t, hidden, mask)
    assert prefix["kv"][0].shape == (2, BATCH, L + 1, HEADS, HEAD_DIM)
    denoise = jax.jit(lambda v, p, x, t: model.apply(v, p, x, t, method=model.denoise))
    apply = jax.jit(model.apply)
    for step in (999, 500, 3):  # the same caption at several steps, as the sampler runs it
        t = np.full((BATCH,), step)
        cached = denoise(variables, prefix, z_i_t, jnp.asarray(t))
        numerics.assert_close(cached, apply(variables, z_i_t, jnp.asarray(t), z_t, hidden, mask))
        _assert_parity(cached, _theirs(theirs_model, z_i_t, t, z_t, hidden, mask))


def test_denormalize_is_post_process_latents(karlo_tiny):
    theirs_model, _, state, model, variables = karlo_tiny
    x = np.random.default_rng(3).normal(size=(BATCH, D)).astype(np.float32)
    with torch.no_grad():
        desired = theirs_model.post_process_latents(torch.from_numpy(x)).numpy()
    out = model.apply(variables, x, method=model.denormalize_embedding)
    numerics.assert_close(out, desired)
    numerics.assert_close(model.apply(variables, out, method=model.normalize_embedding), x,
                          ulps=256)
    np.testing.assert_array_equal(variables["params"]["clip_mean"], state["clip_mean"][0])
    # No gradient flows into the statistics (training leaves them where the import put them).
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, x, method=model.denormalize_embedding)
                                       + model.apply(v, x, method=model.normalize_embedding)))(variables)
    assert not np.any(grads["params"]["clip_mean"]) and not np.any(grads["params"]["clip_std"])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_converted_tree_is_the_module_tree(karlo_tiny, scan_layers):
    _, config, state, _, _ = karlo_tiny
    model, variables = _ours(config, state, scan_layers=scan_layers)
    z_i_t, z_t, hidden, mask = _inputs()
    abstract = jax.eval_shape(model.init, jax.random.key(0), z_i_t, jnp.zeros((BATCH,), jnp.int32),
                              z_t, hidden, mask)
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(abstract))
            == jax.tree.map(lambda a: (a.shape, a.dtype), variables))
    specs = assert_every_param_named(abstract, unnamed_ok=("bias",))
    assert specs["clip_mean"] == jax.sharding.PartitionSpec("norm")
    assert "null_text_token" not in variables["params"] and "null_z_t" not in variables["params"]


def test_time_embed_dim_option_matches_diffusers():
    theirs_model, config, state = _random_prior(1, time_embed_dim=24)
    model, variables = _ours(config, state, scan_layers=False)
    assert variables["params"]["time_embed_fc1"]["kernel"].shape == (HEADS * HEAD_DIM, 24)
    z_i_t, z_t, hidden, mask = _inputs(seed=4)
    t = np.asarray(STEPS)
    _assert_parity(jax.jit(model.apply)(variables, z_i_t, jnp.asarray(t), z_t, hidden, mask),
                   _theirs(theirs_model, z_i_t, t, z_t, hidden, mask))


def test_karlo_config_and_diffusers_defaults():
    from diffusers import PriorTransformer

    signature = inspect.signature(PriorTransformer.__init__)
    defaults = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert defaults == karlo_prior.DIFFUSERS_DEFAULTS
    block = karlo_prior.prior_config(KARLO_CONFIG)
    assert block == {"width": 2048, "depth": 20, "num_heads": 32, "head_dim": 64, "mlp_ratio": 4.0,
                     "activation": "gelu", "dropout": 0.0, "num_timesteps": 1000,
                     "null_conditioning": False, "embedding_stats": True, "time_embed_dim": 2048}
    assert karlo_prior.prior_config({}) == block
    assert karlo_prior.prior_sizes(KARLO_CONFIG) == {"embed_dim": 768, "text_width": 768,
                                                     "text_length": 77}
    entries = karlo_prior.expected_tensors(KARLO_CONFIG)
    assert entries["positional_embedding"].shape == (1, 81, 2048)
    assert entries["transformer_blocks.19.ff.net.0.proj.weight"].shape == (8192, 2048)


def test_unsupported_config_lists_every_problem():
    bad = {**TINY, "_class_name": "UNet2DModel", "norm_in_type": "layer", "dropout": 0.1,
           "added_emb_type": None, "encoder_hid_proj_type": None, "clip_embed_dim": 8,
           "time_embed_act_fn": "gelu", "additional_embeddings": 3, "some_new_flag": True}
    with pytest.raises(karlo_prior.KarloPriorError) as info:
        karlo_prior.prior_config(bad)
    message = str(info.value)
    for needle in ("_class_name", "norm_in_type", "dropout", "added_emb_type",
                   "encoder_hid_proj_type", "clip_embed_dim", "time_embed_act_fn",
                   "additional_embeddings", "some_new_flag"):
        assert needle in message, needle
    assert len(info.value.problems) == 9


def test_bad_weights_list_every_problem(karlo_tiny):
    _, config, state, _, _ = karlo_tiny
    bad = dict(state)
    del bad["prd_embedding"], bad["transformer_blocks.1.attn1.to_k.bias"]
    bad["proj_in.weight"] = np.zeros((D + 1, D), np.float32)
    bad["transformer_blocks.2.norm1.weight"] = np.ones((D,), np.float32)
    bad["clip_std"] = np.zeros((1, D), np.float32)  # diffusers' init: never set
    bad["causal_attention_mask"] = np.zeros((1, L + 4, L + 4), np.float32)  # a buffer: ignored
    with pytest.raises(karlo_prior.KarloPriorError) as info:
        karlo_prior.convert_prior(bad, config)
    message = str(info.value)
    for needle in ("missing tensor prd_embedding", "missing tensor transformer_blocks.1.attn1.to_k.bias",
                   "proj_in.weight has shape", "unexpected tensor transformer_blocks.2.norm1.weight",
                   "clip_std"):
        assert needle in message, needle
    assert len(info.value.problems) == 5
