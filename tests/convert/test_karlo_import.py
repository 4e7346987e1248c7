"""Importing a Karlo directory (diffusers layout) as stage workdirs: round trip, refusals, errors.

The directory is written by the test with diffusers' own `save_pretrained` from the tiny random
components of the pipeline parity test (test_karlo_pipeline.py), so the workdirs loaded back here
hold the params whose sampling that test compares with diffusers' `UnCLIPPipeline`.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from tests.convert import test_karlo_pipeline as tiny  # noqa: E402
from unclip_jax.convert import karlo  # noqa: E402
from unclip_jax.stages import load  # noqa: E402
from unclip_jax.stages.decoder import DecoderStage  # noqa: E402
from unclip_jax.stages.prior import PriorStage  # noqa: E402
from unclip_jax.stages.upsampler import UpsamplerStage  # noqa: E402


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_workdirs_load_back_as_karlo_stages_with_the_converted_params(karlo_dir, tmp_path):
    written = karlo.write_workdirs(karlo_dir, str(tmp_path / "karlo"))
    assert sorted(written) == ["decoder", "prior", "upsampler"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left
    converted = karlo.convert(karlo_dir)
    for name, kind in (("prior", PriorStage), ("decoder", DecoderStage), ("upsampler", UpsamplerStage)):
        loaded = load.load_stage(written[name])
        assert isinstance(loaded.stage, kind) and loaded.stage.karlo and loaded.step == 0
        assert_trees_equal(loaded.params, converted[name][2])
        assert sorted(os.listdir(written[name])) == ["checkpoints", "config.json", "stage.json"]
    up = load.load_stage(written["upsampler"]).stage
    assert (up.side, up.scale) == (tiny.SUPER_RES_TINY["sample_size"],
                                   tiny.SUPER_RES_TINY["sample_size"] // tiny.DECODER_TINY["sample_size"])
    record = json.loads(open(os.path.join(written["decoder"], "stage.json")).read())
    from transformers import CLIPTokenizer

    eot = CLIPTokenizer.from_pretrained(os.path.join(karlo_dir, "tokenizer")).eos_token_id
    assert record["sizes"]["eot_token_id"] == eot and record["sizes"]["text_length"] == tiny.L
    with pytest.raises(FileExistsError, match="not empty"):
        karlo.write_workdirs(karlo_dir, str(tmp_path / "karlo"))


@pytest.fixture(scope="module")
def karlo_root(karlo_dir, tmp_path_factory):
    """The tiny directory imported with its text encoder, as convert_karlo.py does."""
    from configs import clip_vit_l14

    root = tmp_path_factory.mktemp("karlo_import") / "karlo"
    written = karlo.write_workdirs(karlo_dir, str(root), clip_template=clip_vit_l14.get_config("clip"))
    assert sorted(written) == ["clip", "decoder", "prior", "upsampler"]
    return str(root)


def test_the_text_encoder_imports_as_a_clip_without_image_tower(karlo_dir, karlo_root):
    from transformers import CLIPTextModelWithProjection

    clip = load.load_stage(os.path.join(karlo_root, "clip"))
    model = clip.stage.model
    assert not model.has_vision and "vision_model" not in clip.params
    tokens = clip.stage.tokenizer(["a red circle", "blue star", ""])
    eot = clip.stage.sizes["eot_token_id"]
    z_t, hidden = model.apply({"params": clip.params}, tokens, return_hidden=True, normalize=False,
                              method=model.encode_text)
    reference = CLIPTextModelWithProjection.from_pretrained(os.path.join(karlo_dir, "text_encoder")).eval()
    mask = (np.cumsum(tokens == eot, axis=-1) - (tokens == eot)) == 0  # up to and including the end
    with torch.no_grad():
        out = reference(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                        attention_mask=torch.from_numpy(mask.astype(np.int64)))
    np.testing.assert_allclose(np.asarray(z_t), out.text_embeds.numpy(), atol=1e-4)
    theirs = out.last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden)[mask], theirs[mask], atol=1e-4)  # real tokens
    with pytest.raises(ValueError, match="text encoder alone"):
        model.apply({"params": clip.params}, np.zeros((1, 224, 224, 3), np.float32),
                    method=model.encode_image)


@pytest.mark.slow
def test_sample_py_samples_the_imported_stack(karlo_root, tmp_path):
    from configs import karlo as karlo_config
    from unclip_jax import sampling

    records = sampling.run(karlo_config.get_config(karlo_root), str(tmp_path / "out"),
                           prompts=["a b", "b"], num_per_prompt=2, batch_size=8, seed=0)
    side = tiny.SUPER_RES_TINY["sample_size"]
    assert len(records) == 4
    files = sorted(os.listdir(tmp_path / "out"))
    assert "samples.jsonl" in files and sum(f.endswith(".png") for f in files) >= 4
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "out" / "0000_00.png"))
    assert image.shape == (side, side, 3) and image.std() > 0


def test_the_imported_pipeline_samples_as_unclip_pipeline(karlo_dir, karlo_root, monkeypatch):
    """Text -> 16 px ("256 px") through `UnCLIPPipeline.generate_rows` on the imported workdirs
    (its own tokenizer and text encoder) equals diffusers' `UnCLIPPipeline` run on the directory
    that was imported, given its noise: the prior's z_i to 1e-4, and every pixel of the decoder's
    and the final images the rounding of a value within 1e-3 of diffusers' float image."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from configs import karlo as karlo_config
    from unclip_jax import pipeline as pipeline_lib

    classes = {"prior": PriorTransformer, "decoder": UNet2DConditionModel, "text_proj": UnCLIPTextProjModel,
               "super_res_first": UNet2DModel, "super_res_last": UNet2DModel,
               "text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer}
    c = {name: cls.from_pretrained(os.path.join(karlo_dir, name)) for name, cls in classes.items()}
    prompts = ["a red circle", "blue star", "a small green square"]
    z_i, decoded, final, draws = tiny._run_pipeline(c, prompts, monkeypatch, exact=True)
    noise = {stage: (x_T, np.swapaxes(steps, 0, 1))
             for stage, (x_T, steps) in tiny._stage_noise(draws).items()}
    noise["upsampler"] = noise.pop("super_res")

    pipe = pipeline_lib.UnCLIPPipeline.from_config(karlo_config.get_config(karlo_root), batch_size=2)
    keys = pipeline_lib.row_keys(0, np.arange(len(prompts)), np.zeros(len(prompts), int))
    out = pipe.generate_rows(prompts, keys, noise=noise)
    np.testing.assert_allclose(out.z_i, z_i, rtol=0, atol=1e-4)
    for ours, theirs in ((out.base_images, decoded), (out.images, final)):
        assert ours.dtype == np.uint8 and ours.shape == theirs.shape
        assert np.abs(theirs).max() > 0.5  # not degenerate
        np.testing.assert_array_less(np.abs(ours / 127.5 - 1.0 - theirs), 1.0 / 255 + 1e-3)
    # The noise is what made them equal: the pipeline's own draws give other images.
    own = pipe.generate_rows(prompts, keys)
    assert np.abs(own.z_i - z_i).max() > 1e-2
    with pytest.raises(ValueError, match="unknown stages"):
        pipe.generate_rows(prompts, keys, noise={"super_res": noise["upsampler"]})


def test_convert_karlo_py_imports_and_refuses_with_one_message(karlo_dir, tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(root, "convert_karlo.py"), *args],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)

    ok = run(f"--karlo_dir={karlo_dir}", f"--out={tmp_path / 'out'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "Next: python sample.py --config configs/karlo.py:" in ok.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["clip", "decoder", "prior", "upsampler"]
    again = run(f"--karlo_dir={karlo_dir}", f"--out={tmp_path / 'out'}")
    assert again.returncode != 0 and "convert_karlo.py:" in again.stderr and "not empty" in again.stderr


def test_karlo_and_project_stages_do_not_mix(karlo_root, tmp_path_factory):
    from tests import pipeline_stages
    from unclip_jax import pipeline as pipeline_lib

    pipe = pipeline_stages.tiny_pipeline(tmp_path_factory)
    prior = load.load_stage(os.path.join(karlo_root, "prior"), mesh=pipe.mesh)
    with pytest.raises(pipeline_lib.StageError, match=r"stage 'decoder'.*mixes imported Karlo stages"):
        pipeline_lib.UnCLIPPipeline(pipe.clip, prior, pipe.decoder, mesh=pipe.mesh)


def test_pickle_only_weights_are_refused_before_anything_is_written(karlo_dir, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(karlo_dir, bad)
    for f in os.listdir(bad / "decoder"):
        if f.endswith(".safetensors"):
            os.remove(bad / "decoder" / f)
    (bad / "decoder" / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    shutil.rmtree(bad / "super_res_last")
    with pytest.raises(karlo.KarloImportError, match=r"2 problems(.|\n)*decoder/: only pickle weights"
                                                     r"(.|\n)*super_res_last/: missing"):
        karlo.write_workdirs(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_mismatched_checkpoint_lists_every_difference(karlo_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "mismatched"
    shutil.copytree(karlo_dir, bad)
    [name] = [f for f in os.listdir(bad / "prior") if f.endswith(".safetensors")]
    tensors = load_file(str(bad / "prior" / name))
    del tensors["proj_in.bias"]
    tensors["surprise.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(bad / "prior" / name))
    with pytest.raises(karlo.KarloImportError, match=r"prior: (.|\n)*proj_in\.bias(.|\n)*surprise\.weight"):
        karlo.write_workdirs(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
