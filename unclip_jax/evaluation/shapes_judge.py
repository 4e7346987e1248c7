"""The shapes judge: does an image show what its caption says? (spec: docs/shapes.md)

Reads only the pixels and is written from the spec, independently of the renderer
(`unclip_jax.data.shapes` is used for the caption grammar only). For an image uint8 [S, S, 3]:

1. Background: the per-channel median of the border pixels, snapped to the nearest background
   colour for the verdict.
2. Object pixels: each pixel is explained as a blend `bg + alpha * (c - bg)` of the measured
   background and each palette colour `c`; it takes the colour whose blend line passes closest
   (so anti-aliased edges, e.g. red on white, are not mistaken for pink). It is an object pixel of
   that colour when `alpha >= 0.5` (mostly covered; weaker blends are ignored) and the pixel lies
   within half the colour's distance from the background of that line (clean enough to trust).
   For unblended pixels this is the nearest palette colour.
3. Regions: per colour, the largest 8-connected region (union-find written in numpy). A colour is
   present when that region holds at least 0.9% of the image (a quarter of the smallest object,
   a small triangle).
4. Per region: shape = the template (circle, square, triangle, cross, built here from the spec's
   inequalities) of best IoU with the region resampled to its square bounding box; the IoU is
   soft (sum of minima over sum of maxima) on the colour's blend alpha around the region, so
   anti-aliased edges count by how much they are covered (a small circle at S = 32 is only ~9
   pixels wide). Size = small when the region's extent (larger side of its bounding box) is
   below 0.39 S. Centre = bounding-box centre (not the centroid, which sits low in a triangle);
   position = nearest position centre.

Verdicts, one per attribute of the caption plus `exact` (all of them):
- single: `background`; `color` is True when the caption's colour is present and is the largest
  region; `size`, `shape`, `position` are judged on the region of the caption's colour, or when
  that colour is missing on the largest region of any colour (so a right shape in a wrong colour
  still scores on shape); all three are False when no colour is present.
- pair: `background`; `color1`/`color2` True when that colour is present; `shape1`/`shape2` judged
  on that colour's region, False when the colour is missing; `relation` from the two regions'
  centres (object 2 mostly to the right: "to the left of"; mostly below: "above"), False when
  either colour is missing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from unclip_jax.data.shapes import parse_caption

# Transcribed from the spec (the tests check them against the renderer's copy).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 190), "orange": (245, 140, 20),
    "cyan": (30, 200, 210), "pink": (245, 120, 190),
}
BACKGROUND_PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128),
}
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "in the center": (0.5, 0.5), "on the left": (0.28, 0.5), "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28), "at the bottom": (0.5, 0.72),
}
SMALL_EXTENT = 0.39  # region extent below this fraction of S is "small"
MIN_REGION_FRACTION = 0.009  # of S^2: smaller regions count as absent
MIN_ALPHA = 0.5
TEMPLATE_SIDE = 32

_COLOR_NAMES = tuple(PALETTE)
_PALETTE = np.asarray([PALETTE[c] for c in _COLOR_NAMES], dtype=np.float32)  # [8, 3]
_BACKGROUND_NAMES = tuple(BACKGROUND_PALETTE)
_BACKGROUNDS = np.asarray([BACKGROUND_PALETTE[b] for b in _BACKGROUND_NAMES], np.float32)


def _templates(k: int) -> dict[str, np.ndarray]:
    """Boolean [k, k] masks of the four shapes, sampled at pixel centres of the unit box."""
    t = (np.arange(k) + 0.5) / k
    u, v = t[None, :], t[:, None]
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((k, k), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
        "cross": (np.abs(u - 0.5) <= 1 / 6) | (np.abs(v - 0.5) <= 1 / 6),
    }


_TEMPLATES = _templates(TEMPLATE_SIDE)
_TEMPLATE_STACK = np.stack(list(_TEMPLATES.values())).astype(np.float32)  # [4, k, k]
_TEMPLATE_NAMES = tuple(_TEMPLATES)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or image.shape[0] != image.shape[1] or image.shape[0] < 16:
        raise ValueError(f"image must be uint8 [S, S, 3] with S >= 16, got {image.dtype} "
                         f"{list(image.shape)}")
    return image


def _background(image: np.ndarray) -> tuple[str, np.ndarray]:
    """(nearest background name, measured median colour float32 [3]) from the border pixels."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    median = np.median(border.astype(np.float32), axis=0)
    name = _BACKGROUND_NAMES[int(np.argmin(((_BACKGROUNDS - median) ** 2).sum(-1)))]
    return name, median


def _colour_labels(image: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int [S, S] palette index of each object pixel or -1, float [S, S, 8] blend alphas)."""
    p = image.astype(np.float32).reshape(-1, 3) - bg  # [N, 3]
    delta = _PALETTE - bg  # [8, 3]
    norm2 = np.maximum((delta ** 2).sum(-1), 1e-6)  # [8]
    dot = p @ delta.T  # [N, 8]
    alpha = np.clip(dot / norm2, 0.0, 1.0)
    residual2 = (p ** 2).sum(-1, keepdims=True) - 2 * alpha * dot + alpha ** 2 * norm2
    best = np.argmin(residual2, axis=1)
    rows = np.arange(len(best))
    ok = (alpha[rows, best] >= MIN_ALPHA) & (residual2[rows, best] <= 0.25 * norm2[best])
    labels = np.where(ok, best, -1).reshape(image.shape[:2])
    return labels, alpha.reshape(*image.shape[:2], len(_COLOR_NAMES))


def _components(labels: np.ndarray) -> np.ndarray:
    """int [S, S]: 8-connected component id of each labelled pixel (same label), -1 elsewhere."""
    s0, s1 = labels.shape
    parent = np.arange(s0 * s1)
    flat = labels.reshape(-1)
    idx = np.arange(s0 * s1).reshape(s0, s1)
    edges_a, edges_b = [], []
    # Right, down-left, down, down-right neighbours cover all 8-neighbour pairs once.
    for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):
        a = idx[0:s0 - dr, max(0, -dc):s1 - max(0, dc)].reshape(-1)
        b = idx[dr:s0, max(0, dc):s1 - max(0, -dc)].reshape(-1)
        same = (flat[a] >= 0) & (flat[a] == flat[b])
        edges_a.append(a[same])
        edges_b.append(b[same])
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    # Hook the larger root under the smaller, then jump pointers, until every edge agrees.
    while a.size:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return np.where(flat >= 0, parent, -1).reshape(s0, s1)


class _Region:
    """Largest region of one colour: area, bounding box, and its soft coverage map."""

    def __init__(self, mask: np.ndarray, coverage: np.ndarray):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        side = mask.shape[0]
        self.area = int(mask.sum())
        self.r0, self.r1 = int(rows[0]), int(rows[-1]) + 1
        self.c0, self.c1 = int(cols[0]), int(cols[-1]) + 1
        self.coverage = coverage  # float [S, S], zero outside the region's neighbourhood
        self.centre = ((self.c0 + self.c1) / 2 / side, (self.r0 + self.r1) / 2 / side)
        self.extent = max(self.r1 - self.r0, self.c1 - self.c0) / side

    def shape(self) -> str:
        """Template of best soft IoU with the coverage resampled (bilinear) to the box."""
        side = self.coverage.shape[0]
        t = (np.arange(TEMPLATE_SIDE) + 0.5) / TEMPLATE_SIDE
        xs = self.c0 + t * (self.c1 - self.c0) - 0.5  # pixel centres sit at integers + 0.5
        ys = self.r0 + t * (self.r1 - self.r0) - 0.5
        x0 = np.clip(np.floor(xs).astype(int), 0, side - 2)
        y0 = np.clip(np.floor(ys).astype(int), 0, side - 2)
        fx = np.clip(xs - x0, 0.0, 1.0)[None, :]
        fy = np.clip(ys - y0, 0.0, 1.0)[:, None]
        m = self.coverage
        top = m[y0][:, x0] * (1 - fx) + m[y0][:, x0 + 1] * fx
        bottom = m[y0 + 1][:, x0] * (1 - fx) + m[y0 + 1][:, x0 + 1] * fx
        box = top * (1 - fy) + bottom * fy  # [k, k]
        inter = np.minimum(_TEMPLATE_STACK, box).sum(axis=(1, 2))
        union = np.maximum(_TEMPLATE_STACK, box).sum(axis=(1, 2))
        return _TEMPLATE_NAMES[int(np.argmax(inter / np.maximum(union, 1e-6)))]

    def size(self) -> str:
        return "small" if self.extent < SMALL_EXTENT else "large"

    def position(self) -> str:
        x, y = self.centre
        return min(POSITION_CENTRES, key=lambda p: (POSITION_CENTRES[p][0] - x) ** 2
                   + (POSITION_CENTRES[p][1] - y) ** 2)


def _regions(image: np.ndarray, bg: np.ndarray) -> dict[str, _Region]:
    """Present colours -> their largest region."""
    labels, alpha = _colour_labels(image, bg)
    comps = _components(labels)
    side = image.shape[0]
    min_area = max(2, MIN_REGION_FRACTION * side * side)
    regions = {}
    for ci in np.unique(labels[labels >= 0]):
        ci = int(ci)
        ids = comps[labels == ci]
        values, counts = np.unique(ids, return_counts=True)
        if counts.max() < min_area:
            continue
        mask = comps == values[np.argmax(counts)]
        # Soft coverage: this colour's blend alpha on its own and on unassigned (edge) pixels,
        # within one pixel of the region's box.
        region = _Region(mask, np.zeros((side, side), np.float32))
        r0, r1 = max(region.r0 - 1, 0), min(region.r1 + 1, side)
        c0, c1 = max(region.c0 - 1, 0), min(region.c1 + 1, side)
        near = labels[r0:r1, c0:c1]
        region.coverage[r0:r1, c0:c1] = np.where((near == ci) | (near < 0),
                                                 alpha[r0:r1, c0:c1, ci], 0.0)
        regions[_COLOR_NAMES[ci]] = region
    return regions


def _relation(first: _Region, second: _Region) -> str:
    dx = second.centre[0] - first.centre[0]
    dy = second.centre[1] - first.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def judge(image: np.ndarray, caption: str) -> dict[str, bool]:
    """Verdicts for one image uint8 [S, S, 3] against one caption of the shapes grammar.

    Single captions give {background, size, color, shape, position, exact}; pair captions give
    {background, color1, shape1, relation, color2, shape2, exact}. See the module docstring.
    """
    image = _check_image(image)
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    want = parse_caption(caption)
    background, bg = _background(image)
    regions = _regions(image, bg)
    verdict = {"background": background == want["background"]}
    if want["kind"] == "single":
        largest = max(regions, key=lambda c: regions[c].area, default=None)
        verdict["color"] = largest is not None and largest == want["color"]
        region = regions.get(want["color"], regions.get(largest))
        verdict["size"] = region is not None and region.size() == want["size"]
        verdict["shape"] = region is not None and region.shape() == want["shape"]
        verdict["position"] = region is not None and region.position() == want["position"]
    else:
        first, second = regions.get(want["color1"]), regions.get(want["color2"])
        verdict["color1"] = first is not None
        verdict["color2"] = second is not None
        verdict["shape1"] = first is not None and first.shape() == want["shape1"]
        verdict["shape2"] = second is not None and second.shape() == want["shape2"]
        verdict["relation"] = (first is not None and second is not None
                               and _relation(first, second) == want["relation"])
    verdict["exact"] = all(verdict.values())
    return verdict


def judge_batch(images, captions: Sequence[str]) -> dict[str, float]:
    """Mean verdicts over a batch: images uint8 [N, S, S, 3] (or a sequence of [S, S, 3]).

    Returns the rate of each attribute over the captions that have it, `exact`, `exact_single`
    and `exact_pair` (when the batch holds that kind), and `count` (N).
    """
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if not captions:
        raise ValueError("judge_batch needs at least one image")
    totals: dict[str, list[float]] = {}
    for image, caption in zip(images, captions):
        verdict = judge(image, caption)
        kind = "single" if "size" in verdict else "pair"
        for key, value in verdict.items():
            totals.setdefault(key, []).append(float(value))
        totals.setdefault(f"exact_{kind}", []).append(float(verdict["exact"]))
    rates = {key: float(np.mean(values)) for key, values in totals.items()}
    rates["count"] = float(len(captions))
    return rates
