"""sample.py: files written per mode, jsonl records, clear errors for bad inputs and stages."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import pipeline_stages
from unclip_jax import sampling as sample
from unclip_jax.data import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "a large red circle in the center on a white background"
LONG = " and ".join([CAPTION] * 5)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    return pipeline_stages.tiny_stage_workdirs(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return pipeline_stages.tiny_pipeline(tmp_path_factory)


def stage_flags(w, upsampler=None):
    ups = f"('{upsampler or w['upsampler']}',)"
    fast = pipeline_stages.FAST_SETTINGS
    return [f"--config.clip_workdir={w['clip']}", f"--config.prior_workdir={w['prior']}",
            f"--config.decoder_workdir={w['decoder']}", f"--config.upsampler_workdirs={ups}",
            f"--config.prior.steps={fast['prior']['steps']}", f"--config.decoder.steps={fast['decoder']['steps']}",
            f"--config.upsampler.steps={fast['upsampler']['steps']}"]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_text_mode_writes_pngs_grids_and_jsonl(workdirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"\n{LONG}\n\n")
    out = tmp_path / "out"
    proc = run_cli(*stage_flags(workdirs), "--prompt", CAPTION, "--prompts_file", str(prompts),
                   "--num_per_prompt", "2", "--batch_size", "3", "--seed", "5", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "truncated" in proc.stderr  # The over-long prompt of the file.
    assert "batches" in proc.stderr  # The progress bar.
    files = sorted(os.listdir(out))
    assert files == ["0000_00.png", "0000_01.png", "0001_00.png", "0001_01.png", "grid_0000.png",
                     "grid_0001.png", "samples.jsonl"]
    image = np.asarray(Image.open(out / "0001_01.png"))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    records = read_jsonl(out / "samples.jsonl")
    assert [r["file"] for r in records] == files[:4]
    assert [r["caption"] for r in records] == [CAPTION, CAPTION, LONG, LONG]
    first = records[0]
    assert first["seed"] == 5 and first["mode"] == "text" and first["prompt_index"] == 0
    assert first["settings"]["decoder"] == {"guidance_scale": pipeline_stages.DECODER_GUIDANCE,
                                            "sampler": "ddim", "steps": 4, "eta": 0.0}
    assert first["settings"]["stages"]["prior"]["workdir"] == workdirs["prior"]


def test_same_seed_gives_the_same_files_whatever_the_batch_size(pipe, tmp_path):
    """In-process (sample.run_text on the shared pipeline): batch sizes 1 and 3."""
    prompts = [CAPTION, "a blue triangle above a yellow cross on a gray background"]
    outs = []
    for batch_size in (1, 3):
        writer = sample.Writer(str(tmp_path / f"b{batch_size}"), pipe.resolved_settings(), 7, "text")
        sample.run_text(pipe, writer, prompts, seed=7, num_per_prompt=2, batch_size=batch_size, progress=False)
        writer.close()
        outs.append(np.stack([np.asarray(Image.open(tmp_path / f"b{batch_size}" / r["file"])) for r in writer.records]))
    assert np.abs(outs[0].astype(int) - outs[1]).max() <= 1


def test_manipulation_modes_write_their_files(pipe, tmp_path):
    rng = np.random.default_rng(0)
    images = np.stack([shapes.render(shapes.layout(c, rng), 64) for c in
                       (CAPTION, "a small blue square on the left on a black background")])
    names = ["a.png", "b.png"]
    settings = pipe.resolved_settings()

    def writer(mode):
        return sample.Writer(str(tmp_path / mode), settings, 0, mode)

    w = writer("variations")
    sample.run_variations(pipe, w, images, names, seed=0, num_per_image=2, batch_size=2, eta=1.0, progress=False)
    w.close()
    assert sorted(os.listdir(tmp_path / "variations")) == [
        "grid_000.png", "grid_001.png", "samples.jsonl", "variation_000_00.png", "variation_000_01.png",
        "variation_001_00.png", "variation_001_01.png"]
    assert read_jsonl(tmp_path / "variations" / "samples.jsonl")[3]["source"] == "b.png"

    w = writer("interpolate")
    sample.run_interpolate(pipe, w, images, names, seed=0, num_frames=3, noise="inverted", progress=False)
    w.close()
    records = read_jsonl(tmp_path / "interpolate" / "samples.jsonl")
    assert [r["theta"] for r in records] == [0.0, 0.5, 1.0]
    assert os.path.exists(tmp_path / "interpolate" / "grid.png")

    w = writer("textdiff")
    sample.run_textdiff(pipe, w, images, names, seed=0, caption_from=CAPTION,
                        caption_to=CAPTION.replace("red", "blue"), thetas=[0.0, 0.3], batch_size=4,
                        progress=False)
    w.close()
    assert len(read_jsonl(tmp_path / "textdiff" / "samples.jsonl")) == 4

    w = writer("inpaint")
    masks = np.zeros((2, 64, 64), bool)
    masks[:, 16:48, 16:48] = True
    sample.run_inpaint(pipe, w, images, masks, names, [CAPTION, CAPTION], seed=0, num_per_image=1,
                       batch_size=2, num_resample=2, progress=False)
    w.close()
    out = np.asarray(Image.open(tmp_path / "inpaint" / "inpaint_001_00.png"))
    np.testing.assert_array_equal(out[:16], images[1][:16])  # Outside the mask: the input.


def test_empty_prompt_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        sample.read_prompts([], str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        sample.read_prompts([], str(tmp_path / "nope.txt"))
    assert sample.read_prompts(["a", " "], None) == ["a"]
    proc = run_cli("--prompts_file", str(empty), "--output_dir", str(tmp_path / "o"), timeout=120)
    assert proc.returncode != 0 and "holds no prompt" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_missing_or_wrong_stage_is_named(workdirs, tmp_path):
    missing = str(tmp_path / "no_upsampler")
    proc = run_cli(*stage_flags(workdirs, upsampler=missing), "--prompt", CAPTION,
                   "--output_dir", str(tmp_path / "o1"), timeout=300)
    assert proc.returncode != 0
    assert "stage 'upsampler0'" in proc.stderr and missing in proc.stderr
    assert "Traceback" not in proc.stderr
    flags = [f for f in stage_flags(workdirs) if not f.startswith("--config.decoder_workdir")]
    proc = run_cli(*flags, f"--config.decoder_workdir={workdirs['prior']}", "--prompt", CAPTION,
                   "--output_dir", str(tmp_path / "o2"), timeout=300)
    assert proc.returncode != 0
    assert "stage 'decoder'" in proc.stderr and "holds a trained 'prior' stage" in proc.stderr
