"""The manipulations (variations, interpolations, text diffs) on an imported Karlo stack.

Karlo publishes a text encoder only; the CLIP it was trained with (ViT-L/14) is imported beside it
with `convert_karlo.py --clip_dir`, whose text tower must be Karlo's encoder. Here: a tiny
transformers `CLIPModel` whose text tower is the tiny directory's text encoder and whose image
tower is random. DDIM runs over Karlo's decoder (its guidance, its learned-variance eps model).
"""
import os

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from tests.convert import karlo_tiny  # noqa: E402
from unclip_jax import manipulations, pipeline as pipeline_lib  # noqa: E402
from unclip_jax.convert import karlo  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe(karlo_dir, tmp_path_factory):
    from configs import clip_vit_l14, karlo as karlo_config

    tmp = tmp_path_factory.mktemp("karlo_full_clip")
    root = tmp / "karlo"
    written = karlo.write_workdirs(karlo_dir, str(root), clip_template=clip_vit_l14.get_config("clip"),
                                   clip_dir=karlo_tiny.full_clip(karlo_dir, tmp / "clip"))
    assert sorted(written) == ["clip", "decoder", "prior", "upsampler"]
    return pipeline_lib.UnCLIPPipeline.from_config(karlo_config.get_config(str(root)), batch_size=4)


def _images(n, side=8, seed=0):
    """Smooth random uint8 images (a random-weights decoder inverts smooth images better)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 2, 2, 3)).astype(np.float64)
    return pipeline_lib.resize(low.astype(np.uint8), side)


def test_the_image_tower_embeds_as_hf_get_image_features(pipe, karlo_dir, tmp_path):
    """z_i of the imported CLIP is the unnormalised image projection (what Karlo's decoder takes)."""
    from transformers import CLIPModel

    images = _images(2, side=32)
    z_i = pipe.encode_image(images)
    reference = CLIPModel.from_pretrained(karlo_tiny.full_clip(karlo_dir, tmp_path / "again")).eval()
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])  # write_preprocessor's
    x = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        theirs = reference.get_image_features(pixel_values=torch.as_tensor(x, dtype=torch.float32))
    theirs = theirs.pooler_output if hasattr(theirs, "pooler_output") else theirs
    np.testing.assert_allclose(z_i, theirs.numpy(), atol=1e-4)
    assert np.all(np.abs(np.linalg.norm(z_i, axis=-1) - 1.0) > 1e-3)  # not normalised


def test_inversion_reconstructs_when_the_ode_is_exact(pipe):
    """With the decoder's output convolution zeroed (eps = 0, the DDIM ODE exact), inversion
    through Karlo's decoder then DDIM gives the images back."""
    import copy
    import dataclasses

    import jax

    params = dict(pipe.decoder.params)
    params["out_conv"] = jax.tree.map(lambda x: x * 0, params["out_conv"])
    zero = copy.copy(pipe)
    zero.decoder = dataclasses.replace(pipe.decoder, params=params)
    images = _images(2, pipe.base_size)
    enc = manipulations.encode(zero, images)
    rebuilt = manipulations.reconstruct(zero, enc)
    assert np.abs(rebuilt.astype(int) - images).max() <= 1


def test_the_manipulations_run_on_the_imported_stack(pipe):
    side = pipe.base_size
    images = _images(2, side)
    enc = manipulations.encode(pipe, images)
    assert np.isfinite(enc.x_T).all() and enc.x_T.std() > 0.1
    rebuilt = manipulations.reconstruct(pipe, enc)
    var = manipulations.variations(pipe, images, num_variations=2, eta=1.0, encoded=enc)
    assert var.shape == (2, 2, pipe.image_size, pipe.image_size, 3)
    assert np.abs(var[:, 0].astype(int) - var[:, 1]).max() > 0  # each its own noise

    frames = manipulations.interpolate(pipe, images[0], images[1], num_frames=3, upsample=False)
    assert frames.shape == (3, side, side, 3)
    assert np.abs(frames[0].astype(int) - rebuilt[0]).max() <= 1  # the ends reconstruct
    assert np.abs(frames[-1].astype(int) - rebuilt[1]).max() <= 1

    moved = manipulations.text_diff(pipe, images, "a red circle", "a blue star", thetas=(0.0, 0.5),
                                    encoded=enc, upsample=False)
    assert moved.shape == (2, 2, side, side, 3)
    assert np.abs(moved[:, 0].astype(int) - rebuilt).max() <= 1  # theta = 0 reconstructs
    assert np.abs(moved[:, 1].astype(int) - moved[:, 0]).max() > 0
    with pytest.raises(ValueError, match="inpainting is not supported"):
        manipulations.inpaint(pipe, images, np.ones(images.shape[:3], bool), ["a", "b"])


def test_sample_py_runs_a_variation_and_an_interpolation(pipe, tmp_path):
    from PIL import Image

    from unclip_jax import sampling

    paths = []
    for i, image in enumerate(_images(2, 8, seed=3)):
        paths.append(str(tmp_path / f"in{i}.png"))
        Image.fromarray(image).save(paths[-1])
    config = pipe_config(pipe)
    for mode, kwargs in (("variations", dict(num_per_prompt=2)), ("interpolate", dict(num_frames=3))):
        out = tmp_path / mode
        records = sampling.run(config, str(out), mode=mode, image_paths=paths[:1 if mode == "variations" else 2],
                               batch_size=4, **kwargs)
        assert records and "samples.jsonl" in os.listdir(out)
        assert sum(f.endswith(".png") for f in os.listdir(out)) >= len(records)


def pipe_config(pipe):
    from configs import karlo as karlo_config

    return karlo_config.get_config(os.path.dirname(pipe.clip.workdir))


def test_a_clip_with_another_text_tower_is_refused(karlo_dir, tmp_path):
    from configs import clip_vit_l14

    other = karlo_tiny.full_clip(karlo_dir, tmp_path / "other", text_from_karlo=False)
    with pytest.raises(karlo.KarloImportError, match=r"not Karlo's text encoder(.|\n)*text_model\."):
        karlo.write_workdirs(karlo_dir, str(tmp_path / "out"), clip_template=clip_vit_l14.get_config("clip"),
                             clip_dir=other)
    assert not (tmp_path / "out").exists()


def test_a_text_encoder_alone_cannot_embed_images(karlo_dir, tmp_path):
    from configs import clip_vit_l14, karlo as karlo_config

    root = tmp_path / "karlo"
    karlo.write_workdirs(karlo_dir, str(root), clip_template=clip_vit_l14.get_config("clip"))
    text_only = pipeline_lib.UnCLIPPipeline.from_config(karlo_config.get_config(str(root)))
    with pytest.raises(pipeline_lib.StageError, match="text encoder alone(.|\n)*--clip_dir"):
        manipulations.variations(text_only, _images(1), num_variations=1)
