"""Manipulations over tiny random stages: inversion, variations, interpolation, text diffs, inpainting."""
import copy
import dataclasses

import jax
import numpy as np
import pytest

from tests import numerics, pipeline_stages
from unclip_jax import manipulations
from unclip_jax.data import shapes

CAPTIONS = ["a large red circle in the center on a white background",
            "a small blue square on the left on a black background"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return pipeline_stages.tiny_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def images():
    """Renders of the two captions at the pipeline's output size (64 px)."""
    rng = np.random.default_rng(0)
    return np.stack([shapes.render(shapes.layout(c, rng), 64) for c in CAPTIONS])


@pytest.fixture(scope="module")
def encoded(pipe, images):
    return manipulations.encode(pipe, images)


@pytest.fixture(scope="module")
def zero_output_pipe(pipe):
    """The pipeline with the decoder's output convolution zeroed (its initial state): eps = 0 makes
    the DDIM ODE exact, so inversion then regeneration must give the images back. It shares the
    compiled programs (params are arguments)."""
    params = dict(pipe.decoder.params)
    params["out_conv"] = jax.tree.map(lambda x: x * 0, params["out_conv"])
    other = copy.copy(pipe)
    other.decoder = dataclasses.replace(pipe.decoder, params=params)
    return other


@pytest.mark.slow
def test_encode_gives_z_i_and_x_T(pipe, images, encoded):
    assert encoded.z_i.shape == (2, 32) and encoded.x_T.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(np.linalg.norm(encoded.z_i, axis=-1), 1.0, rtol=1e-5)
    numerics.assert_close(encoded.z_i, pipe.encode_image(images))
    assert encoded.images.shape == (2, 16, 16, 3) and encoded.tokens is None
    assert np.isfinite(encoded.x_T).all() and encoded.x_T.std() > 0.1


def test_inversion_then_ddim_reconstructs_when_the_ode_is_exact(zero_output_pipe, images):
    enc = manipulations.encode(zero_output_pipe, images)
    rec = manipulations.reconstruct(zero_output_pipe, enc)
    assert rec.shape == (2, 16, 16, 3) and rec.dtype == np.uint8
    assert np.abs(rec.astype(int) - enc.images).max() <= 1


def test_variations_differ_and_are_reproducible(pipe, images, encoded):
    out = manipulations.variations(pipe, images, num_variations=2, eta=1.0, seed=0, encoded=encoded)
    assert out.shape == (2, 2, 64, 64, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[0, 1])
    again = manipulations.variations(pipe, images, num_variations=2, eta=1.0, seed=0, encoded=encoded)
    np.testing.assert_array_equal(out, again)
    # The second image's variations do not depend on the first image being in the batch.
    alone = manipulations.variations(pipe, images[1:], num_variations=2, eta=1.0, seed=0, first_index=1,
                                     encoded=manipulations.Encoded(encoded.z_i[1:], encoded.x_T[1:], None,
                                                                   encoded.images[1:]))
    assert np.abs(alone[0].astype(int) - out[1]).max() <= 1
    with pytest.raises(ValueError, match="eta > 0"):
        manipulations.variations(pipe, images, eta=0.0, encoded=encoded)


def test_interpolation_ends_reconstruct_the_inputs(pipe, images, encoded):
    frames = manipulations.interpolate(pipe, images[0], images[1], num_frames=3, upsample=False)
    assert frames.shape == (3, 16, 16, 3)
    rec = manipulations.reconstruct(pipe, encoded)
    assert np.abs(frames[0].astype(int) - rec[0]).max() <= 1
    assert np.abs(frames[-1].astype(int) - rec[1]).max() <= 1
    fixed = manipulations.interpolate(pipe, images[0], images[1], num_frames=3, noise="fixed", seed=3)
    assert fixed.shape == (3, 64, 64, 3)
    with pytest.raises(ValueError, match="num_frames"):
        manipulations.interpolate(pipe, images[0], images[1], num_frames=1)
    with pytest.raises(ValueError, match="noise="):
        manipulations.interpolate(pipe, images[0], images[1], noise="random")


def test_text_diff_starts_from_the_reconstruction(pipe, images, encoded):
    out = manipulations.text_diff(pipe, images, CAPTIONS[0], CAPTIONS[0].replace("red", "blue"),
                                  thetas=(0.0, 0.5), encoded=encoded, upsample=False)
    assert out.shape == (2, 2, 16, 16, 3)
    rec = manipulations.reconstruct(pipe, encoded)
    assert np.abs(out[:, 0].astype(int) - rec).max() <= 1
    assert not np.array_equal(out[:, 1], out[:, 0])
    z_d = manipulations.text_diff_direction(pipe, CAPTIONS, [c.replace("a ", "the ", 1) for c in CAPTIONS])
    np.testing.assert_allclose(np.linalg.norm(z_d, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="same text embedding"):
        manipulations.text_diff_direction(pipe, CAPTIONS[0], CAPTIONS[0])
    with pytest.raises(ValueError, match="thetas"):
        manipulations.text_diff(pipe, images, "a", "b", thetas=(0.0, 2.0), encoded=encoded)


def test_inpainting_keeps_the_known_pixels(pipe, images):
    masks = np.zeros((2, 64, 64), bool)
    masks[:, :, 32:] = True  # Regenerate the right half.
    out = manipulations.inpaint(pipe, images, masks, CAPTIONS, num_per_image=1, num_resample=2, seed=0)
    assert out.shape == (2, 1, 64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 0, :, :32], images[:, :, :32])
    assert not np.array_equal(out[:, 0, :, 32:], images[:, :, 32:])
    again = manipulations.inpaint(pipe, images, masks, CAPTIONS, num_per_image=1, num_resample=2, seed=0)
    np.testing.assert_array_equal(out, again)
    with pytest.raises(ValueError, match="masks must be"):
        manipulations.inpaint(pipe, images, masks[:, :32], CAPTIONS)
    with pytest.raises(ValueError, match="captions"):
        manipulations.inpaint(pipe, images, masks, CAPTIONS[:1])
