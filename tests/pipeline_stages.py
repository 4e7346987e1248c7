"""Tiny random unCLIP stages (CLIP, prior, decoder, upsampler) in train.py workdirs, for the
pipeline, manipulation and sample.py tests.

Each workdir holds what `train.py` writes (config.json and an orbax checkpoint) for
`configs/shapes.py:<variant>,tiny`, but the checkpoint holds random params drawn on the host instead of
trained (or even initialised) weights: compiling a train step, or the init, of each stage costs
minutes on a busy 2-core CPU, and the pipeline does not care what the weights learned (random
output layers also keep every stage from being trivially zero). The CLIP's embedding cache (which the decoder and prior
read their sizes from) is built from the random CLIP. Everything is written once per test session;
tests must not write into these workdirs (copy them first).
"""
import os

import jax
import numpy as np
from flax import linen as nn

from tests import helpers
from unclip_jax import parallel
from unclip_jax.data import embed
from unclip_jax import tasks
from unclip_jax.stages import load
from unclip_jax.train import checkpointing
from unclip_jax.train import state as state_lib

_WORKDIRS: dict[str, str] = {}
# The tiny decoder's default guidance scale (what a pipeline resolves when none is given).
DECODER_GUIDANCE = helpers.tiny_config("decoder").diffusion.guidance_scale


def random_leaf(path, leaf, rng: np.random.Generator) -> np.ndarray:
    """Random values for one param: norm scales near 1, kernels ~ N(0, 1/fan_in), the rest small."""
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    shape = tuple(leaf.shape)
    noise = rng.standard_normal(shape).astype(leaf.dtype)
    if name == "scale":
        return 1 + 0.02 * noise
    if name == "kernel" and len(shape) >= 2:
        return noise / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    return 0.02 * noise


def write_random_stage(config, workdir: str, *, seed: int = 0) -> str:
    """Writes `config`, the stage record and a step-1 checkpoint whose params are random (host
    numpy, nothing compiled).

    The optimizer state is zeros; `params` and `ema_params` are the same random tree.
    """
    checkpointing.save_config(config, workdir)
    task = tasks.get_task(config, workdir)
    described = task.describe()
    load.write_record(workdir, config.stage, described["sizes"], described["depends_on"])
    mesh = parallel.mesh_from_config(config.mesh)
    rules = parallel.rules_from_config(config.mesh.rules)
    tx = state_lib.make_optimizer(config.train)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = state_lib.abstract_train_state(task, tx, jax.random.key(seed), mesh, rules)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(lambda p, x: random_leaf(p, x, rng), abstract.params)
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    state = state.replace(params=params, ema_params=params)
    state = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), state, abstract)
    with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(1, state, config=config)
    return workdir


def tiny_stage_workdirs(tmp_path_factory) -> dict[str, str]:
    """{"clip", "prior", "decoder", "upsampler"} -> workdir of each tiny random stage.

    The CLIP sees 32 px images, the decoder samples 16 px images and the upsampler takes them to
    64 px. The CLIP's embedding cache is `<clip>/cache` (16 examples per split).
    """
    if not _WORKDIRS:
        root = tmp_path_factory.mktemp("tiny_stages")
        clip = write_random_stage(helpers.tiny_config("clip"), str(root / "clip"))
        cache = os.path.join(clip, "cache")
        embed.build_clip_cache(clip, cache, num_examples=16, batch_size=16, chunk_size=16)
        for name in ("prior", "decoder"):
            config = helpers.tiny_config(name, (clip, cache))
            if name == "decoder":
                # Epsilon prediction: with a zeroed output conv (eps = 0) the DDIM ODE is an exact
                # per-step scaling, which the inversion round-trip test relies on (with v = 0 the
                # implied eps depends on x_t and inversion is only approximate).
                with config.unlocked():
                    config.diffusion.param = "eps"
            write_random_stage(config, str(root / name))
        write_random_stage(helpers.tiny_config("upsampler"), str(root / "upsampler"))
        _WORKDIRS.update({name: str(root / name) for name in ("clip", "prior", "decoder", "upsampler")})
    return dict(_WORKDIRS)


# Few sampling steps keep the tests fast (the programs' compile time does not depend on them).
FAST_SETTINGS = dict(prior=dict(steps=4), decoder=dict(steps=4), upsampler=dict(steps=2))
_PIPELINES: dict[str, object] = {}


def fast_settings():
    """Pipeline settings with 4 prior, 4 decoder and 2 upsampler steps (stage defaults otherwise)."""
    from unclip_jax import pipeline as pipeline_lib

    return pipeline_lib.Settings(pipeline_lib.PriorSettings(**FAST_SETTINGS["prior"]),
                                 pipeline_lib.DecoderSettings(**FAST_SETTINGS["decoder"]),
                                 pipeline_lib.UpsamplerSettings(**FAST_SETTINGS["upsampler"]))


def tiny_pipeline(tmp_path_factory):
    """One `UnCLIPPipeline` over the tiny random stages (8 devices, batch 8, `fast_settings`), shared
    by the session so that its compiled programs are reused."""
    if "pipe" not in _PIPELINES:
        from unclip_jax import pipeline as pipeline_lib

        w = tiny_stage_workdirs(tmp_path_factory)
        _PIPELINES["pipe"] = pipeline_lib.UnCLIPPipeline.from_workdirs(
            w["clip"], w["prior"], w["decoder"], [w["upsampler"]], batch_size=8, settings=fast_settings())
    return _PIPELINES["pipe"]
