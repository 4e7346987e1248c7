"""The shapes judge agrees with the renderer, and disagrees when the caption is wrong."""
import inspect
import random

import numpy as np
import pytest

from unclip_jax.data import shapes
from unclip_jax.evaluation import shapes_judge
from unclip_jax.evaluation.shapes_judge import judge, judge_batch


def _examples(side, n, seed=0):
    """n examples spread over the three splits."""
    return [shapes.example(seed, shapes.SPLITS[i % 3], i, side) for i in range(n)]


def test_judge_transcribes_the_same_spec_as_the_renderer():
    assert shapes_judge.PALETTE == shapes.COLORS
    assert shapes_judge.BACKGROUND_PALETTE == shapes.BACKGROUNDS
    assert shapes_judge.POSITION_CENTRES == shapes.POSITIONS
    # Independent of the renderer: it never draws with it.
    source = inspect.getsource(shapes_judge)
    assert "render" not in source.replace("renderer", "")


@pytest.mark.parametrize("side,minimum", [(32, 0.97), (64, 1.0)])
def test_rendered_images_match_their_captions(side, minimum):
    examples = _examples(side, 300)
    rates = judge_batch(np.stack([e["image"] for e in examples]),
                        [e["caption"] for e in examples])
    assert rates["count"] == 300
    assert rates["exact"] >= minimum, rates
    assert rates["exact_single"] >= minimum and rates["exact_pair"] >= minimum, rates


def test_a_different_caption_is_almost_never_exact():
    examples = _examples(32, 300, seed=1)
    captions = shapes.all_captions()
    rng = random.Random(0)
    wrong = []
    for e in examples:
        caption = rng.choice(captions)
        while caption == e["caption"]:
            caption = rng.choice(captions)
        wrong.append(caption)
    rates = judge_batch([e["image"] for e in examples], wrong)
    assert rates["exact"] <= 0.1, rates
    assert rates["background"] < 0.6  # about a third by chance


def _render(caption, side=64, seed=0):
    return shapes.render(shapes.layout(caption, np.random.default_rng(seed)), side)


def test_each_single_attribute_is_judged_on_its_own():
    caption = "a small red circle on the left on a white background"
    image = _render(caption)
    assert judge(image, caption) == dict(background=True, size=True, color=True, shape=True,
                                         position=True, exact=True)
    changes = {
        "size": "a large red circle on the left on a white background",
        "color": "a small blue circle on the left on a white background",
        "shape": "a small red cross on the left on a white background",
        "position": "a small red circle at the top on a white background",
        "background": "a small red circle on the left on a black background",
    }
    for attribute, other in changes.items():
        verdict = judge(image, other)
        wrong = {k for k, v in verdict.items() if not v}
        assert wrong == {attribute, "exact"}, (attribute, verdict)


def test_each_pair_attribute_is_judged_on_its_own():
    caption = "a green triangle above a pink square on a gray background"
    image = _render(caption, side=32)
    assert all(judge(image, caption).values())
    changes = [
        (("relation",), "a green triangle to the left of a pink square on a gray background"),
        (("shape1",), "a green square above a pink square on a gray background"),
        (("shape2",), "a green triangle above a pink cross on a gray background"),
        (("background",), "a green triangle above a pink square on a white background"),
        # A colour that is not in the image fails its colour, its shape and the relation.
        (("color2", "shape2", "relation"), "a green triangle above a cyan square on a gray background"),
        # Swapped objects: each colour keeps its shape, but the relation is reversed.
        (("relation",), "a pink square above a green triangle on a gray background"),
    ]
    for attributes, other in changes:
        verdict = judge(image, other)
        wrong = {k for k, v in verdict.items() if not v}
        assert wrong == set(attributes) | {"exact"}, (attributes, verdict)


def test_shape_is_still_judged_when_the_colour_is_wrong():
    image = _render("a large yellow cross in the center on a black background")
    verdict = judge(image, "a large purple cross in the center on a black background")
    assert not verdict["color"] and verdict["shape"] and verdict["size"] and verdict["position"]


def test_an_empty_canvas_has_only_a_background():
    image = np.full((32, 32, 3), shapes.BACKGROUNDS["gray"], np.uint8)
    verdict = judge(image, "a small red circle in the center on a gray background")
    assert verdict == dict(background=True, size=False, color=False, shape=False,
                           position=False, exact=False)
    verdict = judge(image, "a red circle above a blue cross on a gray background")
    assert verdict["background"] and not any(v for k, v in verdict.items() if k != "background")


def test_mild_noise_does_not_change_the_verdicts():
    rng = np.random.default_rng(0)
    examples = _examples(64, 60, seed=2)
    noisy = [np.clip(e["image"] + rng.normal(0, 10, e["image"].shape), 0, 255).astype(np.uint8)
             for e in examples]
    assert judge_batch(noisy, [e["caption"] for e in examples])["exact"] >= 0.95


def test_judge_batch_reports_kinds_present():
    single = _render("a large red circle on the left on a white background", side=32)
    rates = judge_batch([single], [b"a large red circle on the left on a white background"])
    assert rates["exact"] == rates["exact_single"] == 1.0 and "exact_pair" not in rates
    assert rates["count"] == 1.0 and "relation" not in rates


@pytest.mark.parametrize("image", [
    np.zeros((32, 32, 3), np.float32), np.zeros((32, 30, 3), np.uint8),
    np.zeros((32, 32), np.uint8), np.zeros((8, 8, 3), np.uint8)])
def test_judge_rejects_bad_images(image):
    with pytest.raises(ValueError, match="image"):
        judge(image, "a small red circle in the center on a gray background")


def test_judge_rejects_bad_captions_and_batches():
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="a red balloon"):
        judge(image, "a red balloon")
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        judge_batch([image, image], ["a small red circle in the center on a gray background"])


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=(23, 19), p=[0.4, 0.3, 0.3])
    comps = shapes_judge._components(labels)
    # Reference: breadth-first flood fill with 8-neighbours.
    reference = -np.ones(labels.shape, int)
    count = 0
    for start in zip(*np.nonzero(labels >= 0)):
        if reference[start] >= 0:
            continue
        reference[start] = count
        queue = [start]
        while queue:
            r, c = queue.pop()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    q = (r + dr, c + dc)
                    if (0 <= q[0] < labels.shape[0] and 0 <= q[1] < labels.shape[1]
                            and reference[q] < 0 and labels[q] == labels[r, c]):
                        reference[q] = count
                        queue.append(q)
        count += 1
    assert ((comps < 0) == (reference < 0)).all()
    pairs = set(zip(comps[labels >= 0].tolist(), reference[labels >= 0].tolist()))
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == count
