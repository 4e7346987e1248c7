"""The z_i attribute probe: reads what is linearly encoded, chance otherwise; singles only."""
import numpy as np

from unclip_jax.data import shapes
from unclip_jax.evaluation import embedding_probe

SINGLES = [c for c in shapes.all_captions() if shapes.parse_caption(c)["kind"] == "single"]
PAIRS = [c for c in shapes.all_captions() if shapes.parse_caption(c)["kind"] == "pair"]
POSITIONS = sorted(shapes.POSITIONS)


def _data(rng, n, dim=32, position_encoded=True):
    """n random single-object captions and embeddings: position one-hot in the first dims, or noise."""
    captions = [SINGLES[i] for i in rng.integers(len(SINGLES), size=n)]
    z = rng.normal(size=(n, dim))
    if position_encoded:
        z[:, :len(POSITIONS)] = 0.0
        for row, caption in zip(z, captions):
            row[POSITIONS.index(shapes.parse_caption(caption)["position"])] = 10.0
    return z, captions


def test_linearly_encoded_position_is_read_and_noise_is_chance():
    rng = np.random.default_rng(0)
    probe = embedding_probe.attribute_probe(*_data(rng, 1000), *_data(rng, 500))
    assert probe["probe_position_linear"] == 1.0 and probe["probe_position_1nn"] == 1.0
    assert probe["probe_num_examples"] == 500 and probe["probe_num_train"] == 1000
    for name in embedding_probe.ATTRIBUTES:
        assert 0.0 <= probe[f"probe_{name}_linear"] <= 1.0 and 0.0 <= probe[f"probe_{name}_1nn"] <= 1.0

    noise = embedding_probe.attribute_probe(*_data(rng, 1000, position_encoded=False),
                                            *_data(rng, 500, position_encoded=False))
    assert noise["probe_position_linear"] < 0.6 and noise["probe_position_1nn"] < 0.6  # chance: 0.2


def test_pair_and_unparsed_captions_are_left_out():
    rng = np.random.default_rng(1)
    train_z, train_captions = _data(rng, 300)
    eval_z, eval_captions = _data(rng, 100)
    expected = embedding_probe.attribute_probe(train_z, train_captions, eval_z, eval_captions)
    # Extra examples with pair captions or captions outside the grammar, and misleading embeddings.
    extra = ["a photo of a dog", b"not a shapes caption", ""] + PAIRS[:20]
    extra_z = rng.normal(size=(len(extra), train_z.shape[1])) * 100
    got = embedding_probe.attribute_probe(np.concatenate([extra_z, train_z]), extra + train_captions,
                                          np.concatenate([eval_z, extra_z]), eval_captions + extra)
    assert got == expected
    assert got["probe_num_examples"] == 100 and got["probe_num_train"] == 300


def test_no_single_object_caption_gives_no_probe_and_one_class_is_skipped():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4, 8))
    other = ["a photo of a dog", "a cat", PAIRS[0], PAIRS[1]]
    train_z, train_captions = _data(rng, 50, dim=8)
    assert embedding_probe.attribute_probe(z, other, z, other) == {}
    assert embedding_probe.attribute_probe(train_z, train_captions, z, other) == {}
    # Only large objects in training: no size probe; the others are there.
    large = [c for c in SINGLES if shapes.parse_caption(c)["size"] == "large"]
    large = [large[i] for i in rng.integers(len(large), size=50)]
    probe = embedding_probe.attribute_probe(train_z, large, train_z, train_captions)
    assert "probe_size_linear" not in probe and "probe_position_linear" in probe
