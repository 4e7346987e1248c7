"""train_stack.py: the whole tiny stack trains once, samples, judges; a second run retrains nothing."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from unclip_jax.train import stack as train_stack


@pytest.mark.slow
def test_tiny_stack_trains_every_stage_once_then_judges_samples(tmp_path):
    root = str(tmp_path / "runs")
    timings = {}
    first = train_stack.train_stages(root, "tiny", timings)
    assert set(timings) == set(train_stack.STAGES) | {"embed"}
    assert set(first) == set(train_stack.STAGES)
    assert all(np.isfinite(first[s]["train/loss"]) for s in train_stack.STAGES)
    assert os.path.isdir(os.path.join(root, "shapes_clip", "cache", "train"))

    assert train_stack.train_stages(root, "tiny") == {}  # Complete stages are not retrained.
    with pytest.raises(ValueError, match="holds the 'tiny' stack"):  # Another preset's root.
        train_stack.train_stages(root, "fast")

    scores = train_stack.judge_stack(root, num_captions=2, columns=2, seed=0)
    for split in ("train", "heldout"):
        for kind in ("single", "pair"):
            assert 0.0 <= scores[f"{split}/{kind}/exact"] <= 1.0
            assert scores[f"{split}/{kind}/count"] == 2
    grid = np.asarray(Image.open(os.path.join(root, "stack_samples.png")))
    assert grid.ndim == 3 and grid.shape[0] > 4 * 64  # 4 rows of 64 px samples (the tiny upsampler's)
    json.dumps(scores)  # The settings and scores serialise.
