"""The captioned-shapes renderer and grammar follow the spec (docs/shapes.md)."""
import collections
import dataclasses
import hashlib
import pickle

import numpy as np
import pytest

from unclip_jax.data import shapes


def test_palette_and_geometry_constants_follow_the_spec():
    assert shapes.COLORS == {
        "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220),
        "yellow": (240, 210, 30), "purple": (140, 50, 190), "orange": (245, 140, 20),
        "cyan": (30, 200, 210), "pink": (245, 120, 190)}
    assert shapes.BACKGROUNDS == {"white": (245, 245, 245), "black": (15, 15, 15),
                                  "gray": (128, 128, 128)}
    assert shapes.SHAPES == ("circle", "square", "triangle", "cross")
    assert shapes.SIZES == {"small": 0.28, "large": 0.50}
    assert shapes.POSITIONS == {"in the center": (.5, .5), "on the left": (.28, .5),
                                "on the right": (.72, .5), "at the top": (.5, .28),
                                "at the bottom": (.5, .72)}
    assert shapes.RELATIONS == {"to the left of": ((.28, .5), (.72, .5)),
                                "above": ((.5, .28), (.5, .72))}
    assert shapes.SPLITS == ("train", "validation", "heldout")


def test_grammar_counts_and_every_caption_parses():
    captions = shapes.all_captions()
    assert captions == shapes.all_captions()  # deterministic order
    assert len(captions) == len(set(captions)) == 6336
    kinds = collections.Counter(shapes.parse_caption(c)["kind"] for c in captions)
    assert kinds == {"single": 960, "pair": 5376}
    for caption in captions:
        assert caption == caption.strip().lower() and "  " not in caption
        assert not caption.endswith(".")


def test_parse_caption_examples_from_the_spec():
    assert shapes.parse_caption("a large red circle on the left on a white background") == {
        "kind": "single", "size": "large", "color": "red", "shape": "circle",
        "position": "on the left", "background": "white"}
    assert shapes.parse_caption("a blue triangle above a yellow cross on a gray background") == {
        "kind": "pair", "color1": "blue", "shape1": "triangle", "relation": "above",
        "color2": "yellow", "shape2": "cross", "background": "gray"}


@pytest.mark.parametrize("caption", [
    "a large red circle on the left on a white background.",  # full stop
    "a red circle above a red cross on a gray background",  # same colours
    "a huge red circle on the left on a white background",
    "A large red circle on the left on a white background",
    "",
])
def test_parse_caption_rejects_captions_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="not in the shapes grammar") as info:
        shapes.parse_caption(caption)
    assert repr(caption) in str(info.value)


def test_heldout_is_the_documented_tenth():
    captions = shapes.all_captions()
    expected = set()
    for kind, count in (("single", 96), ("pair", 538)):
        of_kind = [c for c in captions if shapes.parse_caption(c)["kind"] == kind]
        ranked = sorted(of_kind, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
        expected |= set(ranked[:count])
    held = shapes.heldout_captions()
    assert held == expected and len(held) == 634
    train = shapes.train_captions()
    assert len(train) == 6336 - 634
    assert set(train).isdisjoint(held) and set(train) | held == set(captions)
    # Every attribute value of each kind still appears in train.
    for kind in ("single", "pair"):
        seen = collections.defaultdict(set)
        for c in train:
            attributes = shapes.parse_caption(c)
            if attributes["kind"] == kind:
                for key, value in attributes.items():
                    seen[key].add(value)
        everything = collections.defaultdict(set)
        for c in captions:
            attributes = shapes.parse_caption(c)
            if attributes["kind"] == kind:
                for key, value in attributes.items():
                    everything[key].add(value)
        assert seen == everything


def test_splits_draw_from_their_captions_with_the_70_30_mix():
    held = shapes.heldout_captions()
    scenes = {split: [shapes.sample_scene(0, split, i) for i in range(1500)]
              for split in shapes.SPLITS}
    for split, split_scenes in scenes.items():
        in_held = [s.caption in held for s in split_scenes]
        assert all(in_held) if split == "heldout" else not any(in_held), split
        single = np.mean([len(s.objects) == 1 for s in split_scenes])
        assert abs(single - 0.7) < 0.05, (split, single)
    # validation is a different stream over the same training captions.
    train_captions = [s.caption for s in scenes["train"]]
    validation_captions = [s.caption for s in scenes["validation"]]
    assert np.mean([a == b for a, b in zip(train_captions, validation_captions)]) < 0.05


def test_scenes_are_laid_out_as_their_captions_say():
    for i in range(300):
        scene = shapes.sample_scene(3, "train", i)
        a = shapes.parse_caption(scene.caption)
        assert scene.background == a["background"]
        if a["kind"] == "single":
            (obj,) = scene.objects
            assert (obj.color, obj.shape, obj.size) == (a["color"], a["shape"], a["size"])
            centres = [shapes.POSITIONS[a["position"]]]
        else:
            first, second = scene.objects
            assert (first.color, first.shape, second.color, second.shape) == (
                a["color1"], a["shape1"], a["color2"], a["shape2"])
            assert first.size == second.size == "small" and first.d == second.d
            centres = shapes.RELATIONS[a["relation"]]
        for obj, (cx, cy) in zip(scene.objects, centres):
            assert abs(obj.cx - cx) <= 0.03 and abs(obj.cy - cy) <= 0.03
            assert 0.95 * shapes.SIZES[obj.size] <= obj.d <= 1.05 * shapes.SIZES[obj.size]


def test_examples_are_pure_functions_of_seed_split_and_index():
    a = shapes.example(0, "train", 7, 32)
    b = shapes.example(0, "train", 7, 32)
    assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])
    images = [shapes.example(0, "train", i, 32)["image"] for i in range(20)]
    distinct = {im.tobytes() for im in images}
    assert len(distinct) == 20
    other_seed = shapes.example(1, "train", 7, 32)
    assert not np.array_equal(other_seed["image"], a["image"])
    # Different sides render the same scene.
    assert shapes.example(0, "train", 7, 48)["caption"] == a["caption"]


def test_pixels_are_pinned():
    # Guards the "same pixels on any machine" promise against silent changes.
    digest = hashlib.sha256()
    for i in range(8):
        digest.update(shapes.example(0, "train", i, 32)["image"].tobytes())
    scene = shapes.sample_scene(0, "train", 0)
    assert scene.caption == "a large red circle on the right on a gray background"
    assert digest.hexdigest() == PINNED_DIGEST


PINNED_DIGEST = "0d25c7727ec8a2c43bba0844099f1db2f018a212973fc55abcb04e999b5caebd"


@pytest.mark.parametrize("side", [16, 17, 31, 32, 33, 64, 100])
def test_render_any_side(side):
    scene = shapes.sample_scene(0, "validation", side)
    image = shapes.render(scene, side)
    assert image.shape == (side, side, 3) and image.dtype == np.uint8
    background = np.array(shapes.BACKGROUNDS[scene.background])
    assert np.array_equal(image[0, 0], background)
    assert (np.abs(image.astype(int) - background).sum(-1) > 0).sum() > 0  # something drawn


@pytest.mark.parametrize("side", [15, 0, -3, 16.0, True, "32"])
def test_render_rejects_bad_sides(side):
    with pytest.raises(ValueError, match="side"):
        shapes.render(shapes.sample_scene(0, "train", 0), side)


def test_render_geometry_and_box_filter():
    red, white = shapes.COLORS["red"], shapes.BACKGROUNDS["white"]
    square = shapes.ShapeObject("red", "square", "large", 0.5, 0.5, 0.5)
    image = shapes.render(shapes.Scene((square,), "white", "unused"), 64)
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    assert (image[inside] == red).all() and (image[~inside] == white).all()

    # An edge through the middle of a pixel: half covered, averaged and rounded half up.
    square = shapes.ShapeObject("red", "square", "large", 0.5, 0.5, 0.5 + 1 / 16)
    image = shapes.render(shapes.Scene((square,), "white", "unused"), 16)
    assert tuple(image[8, 3]) == (233, 138, 138)  # (245 + 220) / 2 = 232.5 -> 233, ...
    assert tuple(image[8, 4]) == red and tuple(image[8, 2]) == white

    # Triangle: apex at the top centre, base along the bottom.
    triangle = shapes.ShapeObject("blue", "triangle", "large", 0.5, 0.5, 0.5)
    image = shapes.render(shapes.Scene((triangle,), "black", "unused"), 64)
    blue = np.all(image == shapes.COLORS["blue"], axis=-1)
    assert blue[46, 17:47].all() and not blue[17, 20] and blue[20:24, 31:33].all()
    # Cross: centre covered, box corners not.
    cross = shapes.ShapeObject("green", "cross", "large", 0.5, 0.5, 0.5)
    image = shapes.render(shapes.Scene((cross,), "gray", "unused"), 64)
    green = np.all(image == shapes.COLORS["green"], axis=-1)
    assert green[32, 17:47].all() and green[17:47, 32].all() and not green[18, 18]
    # Circle: centre and edge midpoints covered, corners not.
    circle = shapes.ShapeObject("cyan", "circle", "large", 0.5, 0.5, 0.5)
    image = shapes.render(shapes.Scene((circle,), "gray", "unused"), 64)
    cyan = np.all(image == shapes.COLORS["cyan"], axis=-1)
    assert cyan[32, 17:47].all() and not cyan[17, 17] and not cyan[46, 46]


def test_render_rejects_unknown_names():
    good = shapes.ShapeObject("red", "square", "small", 0.5, 0.5, 0.28)
    with pytest.raises(ValueError, match="'mauve'"):
        shapes.render(shapes.Scene((dataclasses.replace(good, color="mauve"),), "white", ""), 32)
    with pytest.raises(ValueError, match="'star'"):
        shapes.render(shapes.Scene((dataclasses.replace(good, shape="star"),), "white", ""), 32)
    with pytest.raises(ValueError, match="'beige'"):
        shapes.render(shapes.Scene((good,), "beige", ""), 32)


def test_sample_scene_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'test'"):
        shapes.sample_scene(0, "test", 0)
    with pytest.raises(ValueError, match="index"):
        shapes.sample_scene(0, "train", -1)
    with pytest.raises(ValueError, match="seed"):
        shapes.sample_scene(-1, "train", 0)


def test_shapes_source_is_a_picklable_random_access_source():
    source = shapes.ShapesSource("heldout", 32, 10, seed=5)
    assert len(source) == 10
    restored = pickle.loads(pickle.dumps(source))
    for i in (0, 9, -1):
        a, b = source[i], restored[i]
        expected = shapes.example(5, "heldout", i % 10, 32)
        assert a["caption"] == b["caption"] == expected["caption"]
        assert np.array_equal(a["image"], expected["image"])
        assert a["caption"] in shapes.heldout_captions()
    with pytest.raises(IndexError):
        source[10]
    with pytest.raises(ValueError, match="split"):
        shapes.ShapesSource("nope", 32, 10)


def test_shapes_source_works_with_grain():
    grain = pytest.importorskip("grain")
    dataset = grain.MapDataset.source(shapes.ShapesSource("train", 16, 6)).shuffle(seed=0)
    captions = sorted(dataset[i]["caption"] for i in range(len(dataset)))
    assert captions == sorted(shapes.example(0, "train", i, 16)["caption"] for i in range(6))
