"""Importing Hugging Face CLIP directories: the workdir, the tokenizer, and the clear errors."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file, save_file

from configs import clip_vit_l14
from tests.convert import hf_fixtures
from unclip_jax.convert import hf_clip
from unclip_jax.data import images as image_lib
from unclip_jax.data import tokenizer as tokenizer_lib
from unclip_jax.stages import load


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "clip")
    hf_fixtures.write_hf_clip(path, resize=36)
    return path


def _copy(hf_dir, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(hf_dir, out)
    return out


def _edit_config(path, **text_or_vision):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for key, values in text_or_vision.items():
        config[key].update(values)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_workdir_restores_with_the_imported_weights(hf_dir, tmp_path):
    workdir = str(tmp_path / "imported")
    config = hf_clip.write_clip_workdir(hf_dir, workdir, clip_vit_l14.get_config("clip"))
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "stage.json", "tokenizer"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left
    # Params and EMA params, no optimiser state (nothing was trained).
    with ocp.StandardCheckpointer() as ckpt:
        assert sorted(ckpt.metadata(os.path.join(workdir, "checkpoints", "0", "state")).item_metadata.tree) == [
            "ema_params", "params", "step"]
    assert config.model.image_size == 32 and config.model.vision_width == 32
    assert config.preprocess.resize_size == 36 and tuple(config.preprocess.mean) == (0.5, 0.4, 0.3)

    trained = load.load_stage(workdir)
    assert trained.step == 0 and trained.config.imported_from == hf_dir
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    params = jax.device_get(trained.params)
    q = params["text_model"]["encoder"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(
        q, weights["text_model.encoder.layers.1.self_attn.q_proj.weight"].T.reshape(24, 4, 6))
    table = params["text_model"]["token_embedding"]["embedding"]
    vocab = trained.stage.tokenizer.vocab_size
    assert table.shape[0] == hf_clip.padded_vocab_rows(vocab) > vocab
    np.testing.assert_array_equal(table[:vocab], weights["text_model.embeddings.token_embedding.weight"])
    assert not table[vocab:].any()
    np.testing.assert_array_equal(
        params["vision_model"]["patch_embedding"]["kernel"],
        weights["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    # The imported tokenizer directory loads with the checkpoint's context length.
    assert trained.stage.tokenizer.context_length == 16
    assert trained.stage.tokenizer(["a photo of a cat"]).shape == (1, 16)

    with pytest.raises(FileExistsError, match="not empty"):
        hf_clip.write_clip_workdir(hf_dir, workdir, clip_vit_l14.get_config("clip"))


def test_scanned_layers_import_too(hf_dir, tmp_path):
    template = clip_vit_l14.get_config("clip")
    with template.unlocked():
        template.model.scan_layers = True
    hf_clip.write_clip_workdir(hf_dir, str(tmp_path / "scanned"), template)
    trained = load.load_stage(str(tmp_path / "scanned"))
    assert trained.params["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 64)


def test_hf_tokenizer_dir_loads_at_context_77(tmp_path):
    from transformers import CLIPTokenizerFast

    src = str(tmp_path / "src")
    hf_fixtures.write_tokenizer(src)
    # A directory as transformers saves it (the published CLIP repositories look like this).
    CLIPTokenizerFast.from_pretrained(src).save_pretrained(str(tmp_path / "hf"))
    tokenizer = hf_clip.copy_tokenizer(str(tmp_path / "hf"), str(tmp_path / "out"), 77)
    ids = tokenizer(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids[0, 0] == tokenizer.bos_token_id
    assert tokenizer_lib.Tokenizer.from_dir(str(tmp_path / "out"), 77).vocab_size == tokenizer.vocab_size


def test_missing_tensor_and_wrong_shape_are_listed_together(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["vision_model.encoder.layers.1.mlp.fc2.bias"]
    weights["text_projection.weight"] = np.zeros((17, 24), np.float32)
    weights["text_model.extra.weight"] = np.zeros((2,), np.float32)
    weights["text_model.embeddings.position_ids"] = np.arange(16)[None]  # ignored (old buffer)
    save_file(weights, os.path.join(path, "model.safetensors"))
    with pytest.raises(hf_clip.CheckpointMismatchError) as error:
        hf_clip.read_hf_clip(path)
    message = str(error.value)
    assert "3 problems" in message
    assert "missing tensor vision_model.encoder.layers.1.mlp.fc2.bias (expected shape [32])" in message
    assert "tensor text_projection.weight has shape [17, 24]; config.json implies [16, 24]" in message
    assert "unexpected tensor text_model.extra.weight" in message
    with pytest.raises(hf_clip.CheckpointMismatchError):  # nothing written either
        hf_clip.write_clip_workdir(path, str(tmp_path / "w"), clip_vit_l14.get_config("clip"))
    assert not os.path.exists(tmp_path / "w") and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_unknown_activation_and_unsupported_config_are_listed(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    _edit_config(path, text_config={"hidden_act": "relu"},
                 vision_config={"layer_norm_eps": 1e-6, "hidden_act": "swish"})
    with pytest.raises(hf_clip.CheckpointMismatchError) as error:
        hf_clip.read_hf_clip(path)
    message = str(error.value)
    assert "text_config.hidden_act='relu' is not supported" in message
    assert "vision_config.hidden_act='swish' is not supported" in message
    assert "vision_config.layer_norm_eps=1e-06" in message


def test_pickle_only_directory_is_refused(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not opened")  # a pickle header: must never be loaded
    with pytest.raises(ValueError, match=r"only pickle files \['pytorch_model.bin'\]: they are never unpickled"):
        hf_clip.read_hf_clip(path)
    with pytest.raises(ValueError, match="never unpickled"):
        hf_clip.write_clip_workdir(path, str(tmp_path / "w"), clip_vit_l14.get_config("clip"))
    assert not os.path.exists(tmp_path / "w")
    os.remove(os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        hf_clip.read_hf_clip(path)


def test_other_model_types_and_missing_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_clip.read_hf_clip(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "siglip")
    (tmp_path / "siglip" / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(hf_clip.CheckpointMismatchError, match="model_type is 'siglip'"):
        hf_clip.read_hf_clip(str(tmp_path / "siglip"))


def test_sharded_and_bfloat16_weights(hf_dir, tmp_path):
    import ml_dtypes

    path = _copy(hf_dir, tmp_path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    names = sorted(weights)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: weights[n].astype(ml_dtypes.bfloat16) for n in part}, os.path.join(path, file))
    with open(os.path.join(path, hf_clip.WEIGHTS_INDEX_FILE), "w") as f:
        json.dump({"weight_map": {n: file for file, part in halves.items() for n in part}}, f)
    params = hf_clip.read_hf_clip(path).params
    np.testing.assert_allclose(params["visual_projection"]["kernel"],
                               weights["visual_projection.weight"].T, rtol=1e-2, atol=1e-3)


def test_preprocessing_defaults_and_rules(tmp_path):
    preprocess, problems = hf_clip.read_preprocess(str(tmp_path), 224)
    assert problems == [] and preprocess == {
        "resize_size": 224, "crop_size": 224, "resample": "bicubic",
        "mean": hf_clip.OPENAI_CLIP_MEAN, "std": hf_clip.OPENAI_CLIP_STD}
    hf_fixtures.write_preprocessor(str(tmp_path), resize=200, crop=224)
    _, problems = hf_clip.read_preprocess(str(tmp_path), 224)
    assert problems == ["preprocessor_config.json: crop_size=224 is larger than the resized shorter side 200"]
    # Shorter side to 8, the longer rounded down (41 * 8 / 29 = 11.3 -> 11), centre crop.
    image = np.arange(29 * 41 * 3, dtype=np.uint8).reshape(29, 41, 3)
    assert image_lib.resize_shortest_side(image, 8).shape == (8, 11, 3)
    assert image_lib.clip_preprocess(image, resize_size=8, crop_size=7).shape == (7, 7, 3)
    with pytest.raises(ValueError, match="crop_size=9 must not exceed resize_size=8"):
        image_lib.clip_preprocess(image, resize_size=8, crop_size=9)
