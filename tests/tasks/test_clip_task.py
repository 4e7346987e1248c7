"""The CLIP task: the contrastive loss spans the global batch; tokenizer and model wiring."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import shapes as shapes_config
from unclip_jax import parallel
from unclip_jax.stages import clip as clip_stage
from unclip_jax.tasks import clip as clip_task


def reference_loss(z_i, z_t, scale):
    logits = scale * z_i @ z_t.T
    logp_i = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    logp_t = logits.T - np.log(np.exp(logits.T).sum(1, keepdims=True))
    return -0.5 * (np.diag(logp_i).mean() + np.diag(logp_t).mean())


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_over_the_global_batch_when_sharded():
    rng = np.random.default_rng(0)
    z_i, z_t = unit(rng.normal(size=(16, 8))), unit(rng.normal(size=(16, 8)))
    z_t[:8] = z_i[:8]  # Half the pairs match, so the loss is far from log(16).
    mesh = parallel.make_mesh((8, 1, 1))
    sharded = [jax.device_put(jnp.asarray(z, jnp.float32), parallel.batch_sharding(mesh)) for z in (z_i, z_t)]
    loss, metrics = jax.jit(clip_stage.contrastive_loss)(*sharded, jnp.float32(10.0))
    # Per-device losses (2 rows each) would be much smaller: this is the 16 x 16 loss.
    np.testing.assert_allclose(float(loss), reference_loss(z_i, z_t, 10.0), rtol=1e-5)
    assert 0.5 <= float(metrics["image_to_text_acc"]) <= 1.0


def test_task_tokenizes_and_pads_vocab_for_sharding(tmp_path):
    config = shapes_config.get_config("clip,tiny")
    task = clip_task.ClipTask(config, str(tmp_path))
    assert task.stage.model.vocab_size % 128 == 0 and task.stage.model.vocab_size >= task.tokenizer.vocab_size
    ex = task.map_example({"image": np.zeros((40, 48, 3), np.uint8), "caption": b"a red circle"})
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["tokens"].shape == (config.tokenizer.context_length,) and ex["tokens"].dtype == np.int32
    # The tokenizer trained into the workdir is reused by the next task.
    again = clip_task.ClipTask(config, str(tmp_path))
    assert again.tokenizer.vocab_size == task.tokenizer.vocab_size


def test_evaluate_reports_retrieval_and_z_i_probes_on_shapes(tmp_path):
    config = shapes_config.get_config("clip,tiny")
    task = clip_task.ClipTask(config, str(tmp_path))
    rng = np.random.default_rng(0)  # Random params of the right shapes, without the slow init.
    params = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(s.dtype),
                          jax.eval_shape(task.init_params, jax.random.key(0)))
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    results = task.evaluate(params, mesh)
    for split in ("validation", "heldout"):
        assert 0.0 <= results[f"eval/{split}/retrieval_top1_of_8"] <= 1.0
        assert 0 < results[f"eval/{split}/probe_num_examples"] <= config.eval.num_examples
        for name in ("position", "shape", "size", "color", "background"):
            for kind in ("linear", "1nn"):
                assert 0.0 <= results[f"eval/{split}/probe_{name}_{kind}"] <= 1.0
    # Captions outside the shapes grammar (another data set's): no probe, nothing embedded.
    z_i = np.ones((2, config.model.embed_dim), np.float32)
    assert task.probe(params, mesh, z_i, ["a photo of a dog", "a cat"], "validation", {}) == {}
    with config.unlocked():
        config.eval.probe_train_examples = 0
    assert not task.probe_enabled()
    with config.unlocked():
        config.eval.probe_train_examples = 512
        config.data.source, config.data.tfds_name = "tfds", "laion/subset"
    assert not task.probe_enabled()
