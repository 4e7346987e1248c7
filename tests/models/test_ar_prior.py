"""The AR prior: KV-cached decoding against the full sequence, guidance, logit filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes as shapes_config
from unclip_jax import parallel
from unclip_jax.data import pca_codes
from unclip_jax.stages import ar_prior as ar_stage

D, L, W, EOT = 16, 6, 12, 99


@pytest.fixture(scope="module")
def setup():
    """A tiny AR prior stage (random params; a codebook fitted on random embeddings) and captions."""
    config = shapes_config.get_config("ar_prior,tiny")
    with config.unlocked():
        config.model.remat_policy = "none"  # Inference only: no backward pass to save memory for.
        config.codes.num_components, config.codes.num_buckets = 6, 8
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    z = unit(rng.normal(size=(256, D)) * np.linspace(2, 0.1, D))
    codebook = pca_codes.fit([(z, unit(z + rng.normal(size=z.shape)))], num_components=6, num_buckets=8)
    stage = ar_stage.ARPriorStage(config, embed_dim=D, text_length=L, text_width=W, eot_token_id=EOT)
    stage.set_codebook(codebook)
    params = jax.jit(lambda r: parallel.unbox(stage.init_params(r)))(jax.random.key(1))
    b = 3
    tokens = rng.integers(1, 50, size=(b, L)).astype(np.int32)
    tokens[0, 4:] = EOT  # A short caption: the padding mask matters.
    inputs = (jnp.asarray(unit(rng.normal(size=(b, D))), jnp.float32),
              jnp.asarray(rng.normal(size=(b, L, W)), jnp.float32), jnp.asarray(tokens))
    return stage, params, inputs


def greedy_full_sequence(stage, params, z_t, hidden, tokens, dot_percentile):
    """Greedy decoding by re-running the whole teacher-forced sequence for every token (no cache)."""
    model, k = stage.model, stage.num_components
    mask = ar_stage.text_mask(tokens, stage.eot_token_id)
    seq = jnp.zeros((z_t.shape[0], k + 1), jnp.int32)
    apply = jax.jit(lambda seq: model.apply({"params": params}, z_t, hidden, mask, seq))
    for i in range(k + 1):
        logits = apply(seq)[:, i]
        if i == 0:
            logits = ar_stage.restrict_to_percentile(logits, dot_percentile)
        seq = seq.at[:, i].set(jnp.argmax(logits, -1))
    return seq


def test_kv_cached_sampler_equals_full_sequence_greedy_decoding(setup):
    stage, params, (z_t, hidden, tokens) = setup
    dot_percentile = 0.5
    body = stage.sample_body(guidance_scale=1.0, temperature=0.0, dot_percentile=dot_percentile,
                             return_tokens=True)
    z_i, got = jax.jit(body)(params, z_t, hidden, tokens, jax.random.key(0))
    want = greedy_full_sequence(stage, params, z_t, hidden, tokens, dot_percentile)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(z_i, stage.decode_codes(want[:, 1:]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z_i, axis=-1), 1.0, rtol=1e-5)


def test_decode_steps_give_the_teacher_forced_logits(setup):
    """Every cached step's logits equal the full sequence's at that position (random tokens)."""
    stage, params, (z_t, hidden, tokens) = setup
    model, k = stage.model, stage.num_components
    mask = ar_stage.text_mask(tokens, EOT)
    seq = jax.random.randint(jax.random.key(3), (z_t.shape[0], k + 1), 0, stage.num_buckets)
    full = jax.jit(model.apply)({"params": params}, z_t, hidden, mask, seq)
    cache = jax.jit(lambda: model.apply({"params": params}, z_t, hidden, mask, method=model.encode_prefix))()
    np.testing.assert_allclose(cache.pop("logits"), full[:, 0], atol=2e-5)
    step = jax.jit(lambda cache, token, i: model.apply({"params": params}, cache, token, i,
                                                       method=model.decode_step))
    for i in range(k):
        logits, cache = step(cache, seq[:, i], jnp.int32(i))
        np.testing.assert_allclose(logits, full[:, i + 1], atol=2e-5, err_msg=f"step {i}")


def test_guidance_scale_one_is_the_conditional_model(setup):
    stage, params, inputs = setup
    key = jax.random.key(5)
    outs = [jax.jit(stage.sample_body(guidance_scale=1.0, temperature=1.0, return_tokens=True,
                                      always_guide=guide))(params, *inputs, key)[1]
            for guide in (False, True)]
    np.testing.assert_array_equal(outs[0], outs[1])
    # Another scale does change the draw (so the comparison above can fail).
    other = jax.jit(stage.sample_body(guidance_scale=4.0, temperature=1.0, return_tokens=True))(
        params, *inputs, key)[1]
    assert not np.array_equal(other, outs[0])


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 10)).astype(np.float32)
    neg = np.finfo(np.float32).min
    out = np.asarray(ar_stage.filter_logits(jnp.asarray(logits), top_k=3))
    kth = np.sort(logits, -1)[:, -3][:, None]
    np.testing.assert_array_equal(out, np.where(logits >= kth, logits, neg))
    out = np.asarray(ar_stage.filter_logits(jnp.asarray(logits), top_p=0.6))
    for row, got in zip(logits, out):
        p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        order = np.argsort(-p)
        n = int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)  # Smallest set with >= 0.6.
        keep = np.zeros(10, bool)
        keep[order[:n]] = True
        np.testing.assert_array_equal(got, np.where(keep, row, neg))


def test_dot_token_is_drawn_above_the_percentile():
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.6, 0.1, 0.1, 0.2]]))
    out = np.asarray(ar_stage.restrict_to_percentile(logits, 0.5))
    kept = out > np.finfo(np.float32).min
    # cdf rows: (0.1, 0.3, 0.6, 1.0) and (0.6, 0.7, 0.8, 1.0): keep where cdf > 0.5.
    np.testing.assert_array_equal(kept, [[False, False, True, True], [True, True, True, True]])
    draws = jax.vmap(lambda k: ar_stage.draw(jnp.asarray(out), k, temperature=1.0, top_k=0, top_p=1.0))(
        jax.random.split(jax.random.key(0), 200))
    assert np.all(draws[:, 0] >= 2)
