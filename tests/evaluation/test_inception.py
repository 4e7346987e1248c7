"""The linen FID InceptionV3 against pytorch-fid's network (same random weights, through
convert_inception), its resize against torch's, and the weight files' checks."""
import jax
import numpy as np
import pytest

from tests.evaluation import inception_fixtures
from unclip_jax import parallel
from unclip_jax.convert import ConversionError
from unclip_jax.convert import inception as convert_inception
from unclip_jax.evaluation import features
from unclip_jax.models import inception

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return inception_fixtures.random_inception_weights(tmp_path_factory)


@pytest.mark.slow  # 7-12 s on the shared 2-core CPU (the torch forward and one compile).
def test_pool3_features_match_the_torch_network_preprocessing_included(reference):
    net, weights = reference
    # Not 299 px: the bilinear resize is part of what is compared.
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    want = inception_fixtures.torch_features(net, images)
    mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    got = features.InceptionFeatures(weights, mesh=mesh, batch_size=2).images(images)
    assert got.shape == (2, inception.FEATURE_DIM) and got.dtype == np.float32
    assert want.std() > 0.3  # Activations kept their scale through the network.
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(37, 50), (512, 400)])
def test_resize_is_torch_bilinear_without_antialiasing(shape):
    x = np.random.default_rng(1).random((2, *shape, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                           mode="bilinear", align_corners=False)
    got = np.asarray(inception.preprocess(x))
    np.testing.assert_allclose(got, 2 * want.permute(0, 2, 3, 1).numpy() - 1, atol=1e-6)


def test_converter_lists_every_problem_of_a_state_dict():
    shapes = inception.param_shapes()
    state = {}
    for name, shape in shapes.items():
        *path, leaf = name.split("/")
        if leaf == "kernel":
            kh, kw, i, o = shape
            state[".".join(path + ["weight"])] = np.zeros((o, i, kh, kw), np.float32)
        else:
            torch_leaf = {v: k for k, v in convert_inception.BN_NAMES.items()}[leaf]
            state[".".join(path + [torch_leaf])] = np.zeros(shape, np.float32)
    state["fc.weight"] = np.zeros((1008, 2048), np.float32)  # Dropped, as num_batches_tracked.
    state["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)
    assert set(convert_inception.convert_state_dict(state)) == set(shapes)

    del state["Mixed_7c.branch_pool.conv.weight"]
    state["Mixed_6a.branch3x3.bn.running_var"] = np.zeros((3,), np.float32)
    state["Mixed_9z.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_inception.convert_state_dict(state)
    text = str(e.value)
    assert "3 problems" in text and "missing weight for Mixed_7c/branch_pool/conv/kernel" in text
    assert "Mixed_6a/branch3x3/bn/var: shape [3]" in text and "Mixed_9z/conv/kernel" in text
    with pytest.raises(ConversionError, match="InceptionV3 wrapper"):
        convert_inception.convert_state_dict({"blocks.0.0.conv.weight": np.zeros((32, 3, 3, 3))})


def test_weight_files_are_checked(reference, tmp_path):
    _, weights = reference
    with pytest.raises(FileExistsError, match="never overwrites"):
        convert_inception.convert(weights, weights)
    with pytest.raises(FileNotFoundError, match="local copy"):
        convert_inception.convert(str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors"))
    with pytest.raises(features.WeightsError, match="convert_inception.py"):
        features.InceptionFeatures(str(tmp_path / "missing.safetensors"))
    from safetensors.numpy import load_file, save_file

    flat = load_file(weights)
    del flat["Mixed_5b/branch1x1/conv/kernel"]
    save_file(flat, str(tmp_path / "partial.safetensors"))
    with pytest.raises(features.WeightsError, match="missing Mixed_5b/branch1x1/conv/kernel"):
        features.read_inception_weights(str(tmp_path / "partial.safetensors"))
