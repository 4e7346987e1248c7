"""The embedded data set: captioned shapes (spec: docs/shapes.md).

Scenes of one or two flat shapes on a plain background, rendered anti-aliased at any side
`S >= 16` (drawn at 4x the side, each 4x4 block averaged, rounded half up), with captions from a
closed grammar:

    single: "a {size} {color} {shape} {position} on a {background} background"   (960 captions)
    pair:   "a {color1} {shape1} {relation} a {color2} {shape2} on a {background} background"
            (two small objects of different colours; 5,376 captions)

Held-out rule (compositional generalisation): within each kind, the captions are ordered by the
SHA-256 hex digest of their UTF-8 bytes and the `round(0.1 * n)` smallest are held out: 96 single
and 538 pair captions (634 of 6,336). They appear only in the `heldout` split; every attribute value
still appears in `train` (checked by the tests).

Splits: every example is a pure function of `(seed, split, index)`. Its generator is
`np.random.default_rng(np.random.SeedSequence([seed, split_id, index]))` with split ids
train=0, validation=1, heldout=2, and it draws, in this order: the kind (single with probability
0.7, else pair; the same 70/30 mix in every split), the caption (uniform among the split's captions
of that kind: training captions for `train` and `validation`, held-out ones for `heldout`), the size
factor U[0.95, 1.05] (shared by both objects of a pair), then per object the x and y jitter
U[-0.03, 0.03]. PCG64 and these draws are platform independent, so the pixels are the same on any
machine.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import operator

import numpy as np

from unclip_jax.data.checks import checked_int

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 190),
    "orange": (245, 140, 20),
    "cyan": (30, 200, 210),
    "pink": (245, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Box side as a fraction of S, before the factor U[0.95, 1.05].
SIZES = {"small": 0.28, "large": 0.50}
# Caption phrase -> box centre (x, y) as fractions of S, x to the right, y downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "in the center": (0.5, 0.5),
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
}
# Caption phrase -> (centre of object 1, centre of object 2).
RELATIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "to the left of": ((0.28, 0.5), (0.72, 0.5)),
    "above": ((0.5, 0.28), (0.5, 0.72)),
}
SPLITS = ("train", "validation", "heldout")
SINGLE_FRACTION = 0.7  # share of single-object scenes in every split
SIZE_FACTOR_RANGE = (0.95, 1.05)
JITTER = 0.03
HELDOUT_FRACTION = 0.1
MIN_SIDE = 16
SUPERSAMPLING = 4

_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One shape: palette/grammar names; box centre (cx, cy) and side d as fractions of S."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float
    d: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects drawn in order on a background colour, with the caption that describes them."""

    objects: tuple[ShapeObject, ...]
    background: str
    caption: str


# ----------------------------------------------------------------------------------------------
# Grammar
# ----------------------------------------------------------------------------------------------
def single_caption(size: str, color: str, shape: str, position: str, background: str) -> str:
    """Caption of a single-object scene."""
    return f"a {size} {color} {shape} {position} on a {background} background"


def pair_caption(color1: str, shape1: str, relation: str, color2: str, shape2: str,
                 background: str) -> str:
    """Caption of a two-object scene."""
    return f"a {color1} {shape1} {relation} a {color2} {shape2} on a {background} background"


@functools.cache
def _grammar() -> dict[str, dict[str, str]]:
    """Every caption -> its attributes, in the deterministic order of `all_captions`."""
    table: dict[str, dict[str, str]] = {}
    for size in SIZES:
        for color in COLORS:
            for shape in SHAPES:
                for position in POSITIONS:
                    for background in BACKGROUNDS:
                        table[single_caption(size, color, shape, position, background)] = dict(
                            kind="single", size=size, color=color, shape=shape,
                            position=position, background=background)
    for color1 in COLORS:
        for shape1 in SHAPES:
            for relation in RELATIONS:
                for color2 in COLORS:
                    if color2 == color1:
                        continue
                    for shape2 in SHAPES:
                        for background in BACKGROUNDS:
                            caption = pair_caption(color1, shape1, relation, color2, shape2,
                                                   background)
                            table[caption] = dict(
                                kind="pair", color1=color1, shape1=shape1, relation=relation,
                                color2=color2, shape2=shape2, background=background)
    return table


def all_captions() -> list[str]:
    """All 6,336 captions: the 960 single-object ones, then the 5,376 pair ones (fixed order)."""
    return list(_grammar())


def _sha256(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


@functools.cache
def _heldout() -> frozenset[str]:
    held: set[str] = set()
    for kind in ("single", "pair"):
        captions = [c for c, a in _grammar().items() if a["kind"] == kind]
        count = round(HELDOUT_FRACTION * len(captions))
        held.update(sorted(captions, key=_sha256)[:count])
    return frozenset(held)


def heldout_captions() -> frozenset[str]:
    """The held-out tenth: per kind, the round(10%) captions with the smallest SHA-256 digest."""
    return _heldout()


@functools.cache
def _split_captions(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(single captions, pair captions) a split draws from, in `all_captions` order."""
    held = _heldout()
    keep = (lambda c: c in held) if split == "heldout" else (lambda c: c not in held)
    table = _grammar()
    single = tuple(c for c in table if keep(c) and table[c]["kind"] == "single")
    pair = tuple(c for c in table if keep(c) and table[c]["kind"] == "pair")
    return single, pair


def train_captions() -> list[str]:
    """The 5,702 captions of `train` and `validation` (all but the held-out ones), fixed order."""
    single, pair = _split_captions("train")
    return list(single + pair)


def parse_caption(caption: str) -> dict[str, str]:
    """Attributes of a caption of the grammar.

    Returns {"kind": "single", "size", "color", "shape", "position", "background"} or
    {"kind": "pair", "color1", "shape1", "relation", "color2", "shape2", "background"}, with
    position/relation given as their caption phrases (keys of POSITIONS / RELATIONS).
    """
    attributes = _grammar().get(caption) if isinstance(caption, str) else None
    if attributes is None:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar: expected e.g. "
                         f"'a large red circle on the left on a white background' or "
                         f"'a blue triangle above a yellow cross on a gray background'")
    return dict(attributes)


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------
def layout(caption: str, rng: np.random.Generator) -> Scene:
    """Scene for a caption: draws the size factor, then x and y jitter per object, from `rng`."""
    a = parse_caption(caption)
    factor = rng.uniform(*SIZE_FACTOR_RANGE)
    if a["kind"] == "single":
        specs = [(a["color"], a["shape"], a["size"], POSITIONS[a["position"]])]
    else:
        centre1, centre2 = RELATIONS[a["relation"]]
        specs = [(a["color1"], a["shape1"], "small", centre1),
                 (a["color2"], a["shape2"], "small", centre2)]
    objects = []
    for color, shape, size, (cx, cy) in specs:
        jx = rng.uniform(-JITTER, JITTER)
        jy = rng.uniform(-JITTER, JITTER)
        objects.append(ShapeObject(color=color, shape=shape, size=size, cx=float(cx + jx),
                                   cy=float(cy + jy), d=float(SIZES[size] * factor)))
    return Scene(objects=tuple(objects), background=a["background"], caption=caption)


def _check_split(split: str) -> None:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """The scene of example `index` of `split` (a pure function of its arguments)."""
    _check_split(split)
    seed = checked_int("seed", seed)
    index = checked_int("index", index)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]))
    single, pair = _split_captions(split)
    pool = single if rng.random() < SINGLE_FRACTION else pair
    caption = pool[int(rng.integers(len(pool)))]
    return layout(caption, rng)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape inequality in box coordinates u (x) and v (y), both in [0, 1]."""
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if shape == "triangle":
        return np.abs(u - 0.5) <= v / 2
    if shape == "cross":
        return (np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6)
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def render(scene: Scene, side: int) -> np.ndarray:
    """Renders a scene anti-aliased: uint8 [side, side, 3] sRGB, side >= 16.

    Draws at 4x the side (pixel centres at (i + 0.5) / (4 side)), averages each 4x4 block and
    rounds half up, so the result is exact integer arithmetic on every machine.
    """
    side = checked_int("side", side, MIN_SIDE)
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"background {scene.background!r} is not one of {tuple(BACKGROUNDS)}")
    n = SUPERSAMPLING
    hi = n * side
    background = np.asarray(BACKGROUNDS[scene.background], dtype=np.int32)
    labels = np.zeros((hi, hi), dtype=np.uint8)  # 0 = background, k = object k
    centres = (np.arange(hi) + 0.5) / hi
    windows = []  # per object: (colour, row slice, column slice) in output pixels
    for k, obj in enumerate(scene.objects, start=1):
        if obj.color not in COLORS:
            raise ValueError(f"color {obj.color!r} is not one of {tuple(COLORS)}")
        if not obj.d > 0:
            raise ValueError(f"object box side d must be positive, got {obj.d!r}")
        _inside(obj.shape, np.zeros(1), np.zeros(1))  # validates the shape name
        x0, y0 = obj.cx - obj.d / 2, obj.cy - obj.d / 2
        # Output pixels whose blocks can hold a hi-res centre inside the box.
        c0, c1 = max(0, math.floor(x0 * side)), min(side, math.ceil((x0 + obj.d) * side))
        r0, r1 = max(0, math.floor(y0 * side)), min(side, math.ceil((y0 + obj.d) * side))
        if c0 >= c1 or r0 >= r1:
            continue
        u = ((centres[n * c0:n * c1] - x0) / obj.d)[None, :]
        v = ((centres[n * r0:n * r1] - y0) / obj.d)[:, None]
        mask = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1) & _inside(obj.shape, u, v)
        labels[n * r0:n * r1, n * c0:n * c1][mask] = k
        windows.append((k, COLORS[obj.color], slice(r0, r1), slice(c0, c1)))
    # Box filter of the hi-res image = background + sum over objects of coverage * (colour - bg);
    # counting coverage from the final label map keeps it exact when objects overlap.
    sums = np.broadcast_to(background * (n * n), (side, side, 3)).copy()
    for k, color, rows, cols in windows:
        block = labels[n * rows.start:n * rows.stop, n * cols.start:n * cols.stop] == k
        coverage = block.reshape(rows.stop - rows.start, n, cols.stop - cols.start, n).sum(
            axis=(1, 3), dtype=np.int32)
        sums[rows, cols] += coverage[..., None] * (np.asarray(color, np.int32) - background)
    return ((sums + (n * n) // 2) // (n * n)).astype(np.uint8)


def example(seed: int, split: str, index: int, side: int) -> dict:
    """{"image": uint8 [side, side, 3], "caption": str} of example `index` of `split`."""
    side = checked_int("side", side, MIN_SIDE)
    scene = sample_scene(seed, split, index)
    return {"image": render(scene, side), "caption": scene.caption}


class ShapesSource:
    """Random-access source of rendered examples (grain's RandomAccessDataSource protocol).

    `source[i]` is `example(seed, split, i, side)` for 0 <= i < num_examples (negative i counts
    from the end). Holds only its arguments, so it pickles to worker processes.
    """

    def __init__(self, split: str, side: int, num_examples: int, seed: int = 0):
        _check_split(split)
        self.split = split
        self.side = checked_int("side", side, MIN_SIDE)
        self.num_examples = checked_int("num_examples", num_examples)
        self.seed = checked_int("seed", seed)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        if i < 0:
            i += self.num_examples
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {index} out of range for ShapesSource of "
                             f"{self.num_examples} examples")
        return example(self.seed, self.split, i, self.side)

    def __repr__(self) -> str:
        return (f"ShapesSource(split={self.split!r}, side={self.side}, "
                f"num_examples={self.num_examples}, seed={self.seed})")
