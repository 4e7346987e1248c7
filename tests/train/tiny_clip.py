"""A tiny CLIP trained for 2 steps, shared by the tests that need a trained stage (one per session)."""
import os

from configs import shapes as shapes_config
from unclip_jax.train import loop

_WORKDIRS = {}


def tiny_clip_config():
    """configs/shapes.py:clip,tiny with 2 steps and no end-of-run evaluation (it is not tested here)."""
    config = shapes_config.get_config("clip,tiny")
    with config.unlocked():
        config.train.num_steps = 2
        config.eval.splits = ()
    return config


def trained_tiny_clip(tmp_path_factory) -> str:
    """The workdir of a tiny CLIP trained by `loop.train_and_evaluate` (trained once per session).

    Tests must not write into it (copy it first).
    """
    if "clip" not in _WORKDIRS:
        workdir = str(tmp_path_factory.mktemp("tiny_clip"))
        result = loop.train_and_evaluate(tiny_clip_config(), workdir)
        assert result["step"] == 2 and os.path.exists(os.path.join(workdir, "config.json"))
        _WORKDIRS["clip"] = workdir
    return _WORKDIRS["clip"]


def tiny_clip_with_cache(tmp_path_factory) -> tuple[str, str]:
    """The tiny CLIP's workdir and its embedding cache (64 examples per split), built once per session."""
    if "cache" not in _WORKDIRS:
        from unclip_jax.data import embed

        workdir = trained_tiny_clip(tmp_path_factory)
        cache = str(tmp_path_factory.mktemp("tiny_clip_cache"))
        embed.build_clip_cache(workdir, cache, num_examples=64, batch_size=32, chunk_size=32)
        _WORKDIRS["cache"] = cache
    return _WORKDIRS["clip"], _WORKDIRS["cache"]
