"""Tests of the caption tokenizer (unclip_jax.data.tokenizer)."""
import logging
import os
import pickle
import random

import numpy as np
import pytest

from unclip_jax.data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, train_tokenizer

CONTEXT = 16
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "gray"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]


def _captions(n=200, seed=0):
    """A tiny local grammar of shapes captions (lower case)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        caption = (f"a {rng.choice(['small', 'large'])} {rng.choice(COLORS)} "
                   f"{rng.choice(SHAPES)} {rng.choice(PLACES)}")
        if rng.random() < 0.5:
            caption += f" and {rng.randint(2, 4)} {rng.choice(COLORS)} {rng.choice(SHAPES)}s"
        out.append(caption)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(_captions(), path, vocab_size=1024)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir, context_length=CONTEXT)


def test_saves_the_hugging_face_clip_format(tokenizer_dir):
    from transformers import CLIPTokenizerFast

    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= set(os.listdir(tokenizer_dir))
    hf = CLIPTokenizerFast.from_pretrained(tokenizer_dir)
    caption = "a large red circle on the left and 3 blue stars"
    ids = hf(caption)["input_ids"]
    assert ids[0] == hf.bos_token_id and ids[-1] == hf.eos_token_id
    assert len(ids) < len(caption.split()) + 8  # words of the grammar are whole tokens
    assert hf.decode(ids, skip_special_tokens=True) == caption
    # The vocabulary is bytes, bytes + </w>, merges, then the two special tokens last.
    assert MIN_VOCAB_SIZE < len(hf) <= 1024
    assert hf.convert_ids_to_tokens([len(hf) - 2, len(hf) - 1]) == [
        "<|startoftext|>", "<|endoftext|>"]


def test_training_is_deterministic(tokenizer_dir, tmp_path):
    train_tokenizer(_captions(), str(tmp_path), vocab_size=1024)
    for name in sorted(os.listdir(tokenizer_dir)):
        with open(os.path.join(tokenizer_dir, name), "rb") as a, \
                open(os.path.join(tmp_path, name), "rb") as b:
            assert a.read() == b.read(), name


def test_vocab_size_cap_and_minimum(tmp_path):
    train_tokenizer(_captions(), str(tmp_path / "small"), vocab_size=MIN_VOCAB_SIZE + 10)
    assert Tokenizer.from_dir(str(tmp_path / "small")).vocab_size == MIN_VOCAB_SIZE + 10
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(_captions(), str(tmp_path / "tiny"), vocab_size=300)


def test_fixed_shape_special_tokens_and_round_trip(tokenizer):
    captions = _captions(8, seed=1)
    tokens = tokenizer(captions)
    assert tokens.shape == (8, CONTEXT) and tokens.dtype == np.int32
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()
    for row, caption in zip(tokens, captions):
        eot = int(np.argmax(row == tokenizer.eot_token_id))
        assert eot > 1 and (row[eot:] == tokenizer.pad_token_id).all()
    assert tokenizer.decode(tokens) == captions
    assert tokenizer(["A Large RED Star"]).tolist() == tokenizer(["a large red star"]).tolist()


def test_properties(tokenizer):
    assert tokenizer.context_length == CONTEXT
    assert tokenizer.eot_token_id == tokenizer.vocab_size - 1
    assert tokenizer.pad_token_id == tokenizer.eot_token_id
    assert tokenizer.eot_pooling == "argmax"
    tokens = tokenizer(["a red star", "two blue squares at the bottom"])
    # argmax pooling finds the first EOT even though padding repeats it.
    assert np.argmax(tokens, axis=-1).tolist() == np.argmax(
        tokens == tokenizer.eot_token_id, axis=-1).tolist()


def test_long_captions_are_truncated_with_one_warning(tokenizer, caplog):
    long = " and ".join(_captions(6, seed=2))
    with caplog.at_level(logging.WARNING):
        tokens = tokenizer(["a red star", long, long])
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1
    assert "2 of 3" in records[0].getMessage() and str(CONTEXT) in records[0].getMessage()
    assert tokens.shape == (3, CONTEXT)
    assert (tokens[1:, -1] == tokenizer.eot_token_id).all()
    assert (tokens[1:, :-1] != tokenizer.eot_token_id).all()
    assert tokenizer.decode(tokens[1:2])[0] in long
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokenizer(["a red star"])
    assert not caplog.records


def test_inputs(tokenizer):
    assert tokenizer([b"a red star"]).tolist() == tokenizer(["a red star"]).tolist()
    assert tokenizer([]).shape == (0, CONTEXT)
    with pytest.raises(TypeError, match="single string"):
        tokenizer("a red star")


def test_pickles_for_grain_workers(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    captions = _captions(4, seed=3)
    assert clone.context_length == CONTEXT
    np.testing.assert_array_equal(clone(captions), tokenizer(captions))


def test_missing_directory_or_files_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        Tokenizer.from_dir(str(empty))
