"""Fine-tuning an imported Karlo decoder with train.py (`configs/karlo.py:decoder`).

A tiny diffusers-layout Karlo and a tiny full CLIP (Karlo's text encoder + a random image tower)
-> convert_karlo (with --clip_dir) -> WebDataset shards -> embed.py's cache (with norms) -> a few
training steps from the import. Training must condition the UNet exactly as Karlo's sampling does:
a kept example as guidance's conditional half, a dropped one as its unconditional half (the learned
null z_i, the empty caption's encodings).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tests.convert import karlo_tiny  # noqa: E402
from unclip_jax.convert import karlo  # noqa: E402
from unclip_jax.data import embed  # noqa: E402
from unclip_jax.data import embedding_cache  # noqa: E402
from unclip_jax.data import webdataset as wds  # noqa: E402
from unclip_jax.stages import load  # noqa: E402
from unclip_jax.stages.decoder import DecoderStage  # noqa: E402
from unclip_jax.tasks.decoder import DecoderTask  # noqa: E402
from unclip_jax.train import checkpointing, loop  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPTIONS = ["a red circle", "two green triangles on the left", "a photo of a cat", "a small yellow star"]


def _shards(directory, name, n, seed):
    """One shard of n smooth random 32 px images with captions; returns its path."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        low = rng.integers(0, 256, (2, 2, 3)).astype(np.float64)
        image = np.kron(low, np.ones((16, 16, 1))).astype(np.uint8)
        samples.append((f"{seed:02d}{i:03d}", image, CAPTIONS[i % len(CAPTIONS)]))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(str(directory), f"{name}.tar")
    wds.write_shard(path, samples)
    return path


def _clip_template(tmp):
    from configs import clip_vit_l14

    template = clip_vit_l14.get_config("clip")
    template.data.shards = _shards(tmp / "shards", "train", 8, seed=1)
    template.data.validation_shards = _shards(tmp / "shards", "validation", 4, seed=2)
    template.data.num_threads = 2
    return template


def _train_config(root, **train):
    from configs import karlo as karlo_config

    config = karlo_config.get_config(f"decoder,{root}")
    config.model.dtype, config.model.remat = "float32", False  # Exact comparisons on the CPU.
    config.data.num_threads = 2
    config.diffusion.sample_steps = 2
    config.eval.num_examples, config.eval.batch_size = 4, 4
    settings = dict(batch_size=8, num_steps=2, learning_rate=1e-3, warmup_steps=1, log_every=1,
                    checkpoint_every=2)
    for key, value in {**settings, **train}.items():
        config.train[key] = value
    return config


@pytest.fixture(scope="module")
def imported(karlo_dir, tmp_path_factory):
    """(root, cache_dir): the tiny Karlo imported with its full CLIP, and that CLIP's cache."""
    tmp = tmp_path_factory.mktemp("karlo_finetune")
    root = str(tmp / "karlo")
    karlo.write_workdirs(karlo_dir, root, clip_template=_clip_template(tmp),
                         clip_dir=karlo_tiny.full_clip(karlo_dir, tmp / "hf_clip"))
    cache = os.path.join(root, "clip", "cache")
    embed.build_clip_cache(os.path.join(root, "clip"), cache, ("train", "validation"), batch_size=4, chunk_size=4)
    return root, cache


@pytest.fixture(scope="module")
def task(imported, tmp_path_factory):
    root, _ = imported
    config = checkpointing.with_init_sections(_train_config(root))
    return DecoderTask(config, str(tmp_path_factory.mktemp("task")))


def _batch(task, n=4):
    source = task.source("train")
    examples = [task.map_example(source[i]) for i in range(n)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _Recorder:
    """Stands in for the stage's UNet and records the conditioning of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply(self, variables, x, t, **kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if k in ("z_i", "drop_z_i", "z_t", "text_hidden",
                                                                     "text_mask")})
        return self.model.apply(variables, x, t, **kwargs)


def _stage_with(task, **drops):
    config = task.config.copy_and_resolve_references()
    with config.unlocked():
        for k, v in drops.items():
            config.diffusion[k] = v
    stage = DecoderStage(config, **task.stage.sizes)
    stage.model = _Recorder(stage.model)
    return stage


def test_the_cache_stores_the_norms_of_the_unnormalised_projections(imported, task):
    root, cache = imported
    source = embedding_cache.CacheSource(cache, "train")
    assert source.norms and source.metadata["format_version"] == embedding_cache.FORMAT_VERSION
    record = source[0]
    np.testing.assert_allclose(np.linalg.norm(record["z_i"]), 1.0, atol=1e-5)
    clip = load.load_stage(os.path.join(root, "clip"))
    z_t, hidden, mask = embed.encode_captions(clip, [record["caption"]])
    np.testing.assert_allclose(record["z_t"] * record["z_t_norm"], z_t[0], rtol=1e-5, atol=1e-6)
    # The batch carries the projections as they are, the states sampling computes and its mask.
    example = task.source("train")[0]
    np.testing.assert_allclose(example["z_t"], z_t[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(example["text_hidden"], hidden[0], atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(example["text_mask"], mask[0])
    assert abs(float(np.linalg.norm(example["z_i"])) - 1.0) > 1e-3  # not unit


def test_training_conditions_as_karlo_sampling_guides(imported, task):
    """(a) A kept example sees what karlo_model_fn's conditional half sees; a dropped one (caption
    and z_i) what its unconditional half sees; a caption-only drop the empty caption with z_i."""
    params = load.load_stage(os.path.join(imported[0], "decoder")).params
    batch = _batch(task, 8)
    b = len(batch["z_i"])
    stage = _stage_with(task, z_i_drop_prob=0.5, text_drop_prob=0.5)
    x = jnp.zeros((b, stage.side, stage.side, 3))
    stage.karlo_model_fn(params, batch["z_i"], (batch["z_t"], batch["text_hidden"], batch["text_mask"]),
                         task.empty_caption, guidance_scale=8.0)(x, jnp.full((b,), 10))
    guided = {k: np.asarray(v) for k, v in stage.model.calls[-1].items()}
    cond = {k: v[:b] for k, v in guided.items()}
    uncond = {k: v[b:] for k, v in guided.items()}
    assert not cond["drop_z_i"].any() and uncond["drop_z_i"].all()

    def drops(seed):  # The loss's draws: jax.random.split(rng, 4)[1:3].
        _, z_rng, text_rng, _ = jax.random.split(jax.random.key(seed), 4)
        return (np.asarray(jax.random.bernoulli(z_rng, 0.5, (b,))),
                np.asarray(jax.random.bernoulli(text_rng, 0.5, (b,))))

    seed = next(s for s in range(100) if len({(z, t) for z, t in zip(*drops(s))}) == 4)
    drop_z, drop_text = drops(seed)
    stage.loss(params, batch, jax.random.key(seed), empty_caption=task.empty_caption)
    seen = {k: np.asarray(v) for k, v in stage.model.calls[-1].items()}
    assert sorted(seen) == sorted(cond)
    for row in range(b):
        z_from = uncond if drop_z[row] else cond
        text_from = uncond if drop_text[row] else cond
        for name, value in seen.items():
            want = (z_from if name in ("z_i", "drop_z_i") else text_from)[name][row]
            np.testing.assert_array_equal(value[row], want, err_msg=f"row {row}: {name}")


def test_the_step_0_loss_is_karlos_hybrid_loss(imported, task):
    """(b) The loss of the import at step 0 with a fixed rng, computed directly: Karlo's
    squaredcos_cap_v2 schedule (diffusers'), the drops, the hybrid loss on eps and learned range."""
    from diffusers import UnCLIPScheduler

    from unclip_jax.diffusion import gaussian

    params = load.load_stage(os.path.join(imported[0], "decoder")).params
    batch = _batch(task)
    rng = jax.random.key(7)
    loss, metrics = task.loss_fn(params, batch, rng, 0)

    noise_rng, z_rng, text_rng, _ = jax.random.split(rng, 4)
    t_rng, n_rng = jax.random.split(noise_rng)
    b = len(batch["z_i"])
    x0 = batch["image"].astype(np.float32) / 127.5 - 1.0
    t = np.asarray(jax.random.randint(t_rng, (b,), 0, 1000))
    noise = np.asarray(jax.random.normal(n_rng, x0.shape, jnp.float32))
    abar = UnCLIPScheduler(variance_type="learned_range").alphas_cumprod.numpy()[t][:, None, None, None]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    drop_z = np.asarray(jax.random.bernoulli(z_rng, 0.1, (b,)))
    drop_text = np.asarray(jax.random.bernoulli(text_rng, 0.5, (b,)))
    empty = [np.broadcast_to(e, batch[k].shape) for e, k in zip(task.empty_caption, ("z_t", "text_hidden", "text_mask"))]
    pick = lambda e, v: np.where(drop_text.reshape((-1,) + (1,) * (v.ndim - 1)), e, v)  # noqa: E731
    out = task.stage.model.apply({"params": params}, jnp.asarray(x_t), jnp.asarray(t), z_i=batch["z_i"],
                                 drop_z_i=drop_z, z_t=pick(empty[0], batch["z_t"]),
                                 text_hidden=pick(empty[1], batch["text_hidden"]),
                                 text_mask=pick(empty[2], batch["text_mask"]))
    eps = np.asarray(out)[..., :3]
    np.testing.assert_allclose(float(metrics["mse"]), np.mean((eps - noise) ** 2), rtol=1e-4)
    direct, _ = gaussian.hybrid_loss("eps", task.stage.schedule, out, x0, x_t.astype(np.float32), t, noise)
    np.testing.assert_allclose(float(loss), float(direct.mean()), rtol=1e-4)
    np.testing.assert_allclose(task.stage.schedule.alphas_cumprod[t], abar[:, 0, 0, 0], rtol=1e-5)


def test_train_py_fine_tunes_the_import_and_sample_py_samples_it(imported, tmp_path):
    """(c) train.py's loop from init_from: other params than the import, the workdir reloads, and
    sample.py samples the Karlo stack with the fine-tuned decoder."""
    root, _ = imported
    workdir = str(tmp_path / "finetuned")
    result = loop.train_and_evaluate(_train_config(root), workdir)
    assert result["step"] == 2 and np.isfinite(result["train/loss"])
    assert {"eval/validation/fd_clip", "eval/validation/clip_score"} <= set(result)
    with open(os.path.join(workdir, "config.json")) as f:
        stored = json.load(f)
    assert stored["diffusion"]["sampler"] == "karlo" and stored["model"]["clip_text_width"] > 0

    imported_params = load.load_stage(os.path.join(root, "decoder"), "params").params
    tuned = load.load_stage(workdir, "params")
    differ = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), imported_params,
                          tuned.params)
    assert any(jax.tree.leaves(differ))
    assert tuned.stage.karlo

    out = tmp_path / "samples"
    run = subprocess.run(
        [sys.executable, "sample.py", f"--config=configs/karlo.py:{root}", f"--config.decoder_workdir={workdir}",
         "--config.prior.steps=2", "--config.decoder.steps=2", "--config.upsampler.steps=2",
         "--prompt", "a red circle", "--num_per_prompt=1", f"--output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(name.endswith(".png") for name in os.listdir(out))


def test_a_cache_without_norms_and_a_text_encoder_alone_are_refused(imported, karlo_dir, tmp_path):
    """(d) One clear message each: an old (format 1) cache has no norms to give the unnormalised
    embeddings; a CLIP imported without --clip_dir has no image tower for the cache."""
    root, cache = imported
    old = str(tmp_path / "old_cache")
    shutil.copytree(cache, old)
    for split in ("train", "validation"):
        path = os.path.join(old, split, embedding_cache.METADATA_FILENAME)
        with open(path) as f:
            metadata = json.load(f)
        metadata.pop("norms")
        metadata["format_version"] = 1
        with open(path, "w") as f:
            json.dump(metadata, f)
    config = _train_config(root)
    config.cache_dir = old
    with pytest.raises(ValueError, match="without their norms.*embed.py"):
        DecoderTask(checkpointing.with_init_sections(config), str(tmp_path / "w"))

    text_only = str(tmp_path / "text_only")
    karlo.write_workdirs(karlo_dir, text_only, clip_template=_clip_template(tmp_path))
    with pytest.raises(embed.NoImageTowerError, match="text encoder alone.*--clip_dir"):
        embed.build_clip_cache(os.path.join(text_only, "clip"), str(tmp_path / "c"), ("train",))
    config = _train_config(text_only)
    with pytest.raises(embed.NoImageTowerError, match="text encoder alone.*--clip_dir"):
        DecoderTask(checkpointing.with_init_sections(config), str(tmp_path / "w2"))
