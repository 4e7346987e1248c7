"""The whole stack judged from pixels on shapes (the scores train_stack.py prints).

    from unclip_jax.evaluation import pipeline_eval
    pipe = UnCLIPPipeline.from_config(configs.pipeline_shapes.get_config(), batch_size=64)
    results = pipeline_eval.evaluate(pipe, num_captions=100)

or `python -m unclip_jax.evaluation.pipeline_eval --config configs/pipeline_shapes.py
--num_captions 100 --output results.json`. Every function takes a pipeline and returns a flat dict
of floats (rates in [0, 1], PSNR in dB); the captions and input renders are drawn with `seed`:

- `text_to_image`: judge `exact` (and each attribute) of text -> image samples for single- and
  two-object captions, of the training and the held-out caption sets.
- `variation_keep_rate`: variations of the correctly generated images; the rate at which the
  variations are still judged `exact` for the caption, and their mean pixel difference.
- `interpolation_trajectory`: interpolations between renders of two single-object captions of
  different colour and shape; per frame the rate judged as caption A and as caption B.
- `text_diff_colour_change`: text diffs from "... red ..." to "... blue ..." on renders of red
  single objects; per theta the rate judged blue, the rate keeping the shape, and both.
- `inversion_psnr`: DDIM inversion then DDIM regeneration of renders at the decoder's size.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from unclip_jax import manipulations
from unclip_jax.diffusion import pixels
from unclip_jax.data import shapes
from unclip_jax.evaluation import shapes_judge
from unclip_jax.pipeline import UnCLIPPipeline, resize


def _pick(captions: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    captions = sorted(captions)
    return [captions[i] for i in rng.choice(len(captions), size=min(int(n), len(captions)), replace=False)]


def caption_sets(num_captions: int, seed: int = 0) -> dict[str, list[str]]:
    """`num_captions` captions of each of train/single, train/pair, heldout/single, heldout/pair."""
    rng = np.random.default_rng(seed)
    held = shapes.heldout_captions()
    train = shapes.train_captions()
    kind = lambda c: shapes.parse_caption(c)["kind"]  # noqa: E731
    return {f"{split}/{k}": _pick([c for c in pool if kind(c) == k], num_captions, rng)
            for split, pool in (("train", train), ("heldout", sorted(held))) for k in ("single", "pair")}


def render(captions: Sequence[str], side: int, seed: int = 0) -> np.ndarray:
    """Ground-truth renders of captions (the data set's renderer): uint8 [N, side, side, 3]."""
    rng = np.random.default_rng(seed)
    return np.stack([shapes.render(shapes.layout(c, rng), side) for c in captions])


def text_to_image(pipe: UnCLIPPipeline, num_captions: int, *, seed: int = 0, num_per_caption: int = 1,
                  return_samples: bool = False):
    """Judge rates of text -> image samples per caption set (`caption_sets`).

    Returns {"<split>/<kind>/exact": rate, "<split>/<kind>/<attribute>": rate, ...}; with
    `return_samples`, also {set name: (captions per row, images uint8 [N, S, S, 3], exact bool [N])}.
    """
    results: dict[str, float] = {}
    samples = {}
    for name, captions in caption_sets(num_captions, seed).items():
        out = pipe.generate(captions, seed=seed, num_per_prompt=num_per_caption)
        verdicts = [shapes_judge.judge(img, c) for img, c in zip(out.images, out.captions)]
        for key in verdicts[0]:
            results[f"{name}/{key}"] = float(np.mean([v[key] for v in verdicts]))
        results[f"{name}/count"] = float(len(verdicts))
        samples[name] = (out.captions, out.images, np.array([v["exact"] for v in verdicts]))
    return (results, samples) if return_samples else results


def variation_keep_rate(pipe: UnCLIPPipeline, captions: Sequence[str], images: np.ndarray, *,
                        num_variations: int = 4, eta: float = 1.0, seed: int = 0) -> dict[str, float]:
    """How often variations of images judged correct for their captions stay correct.

    Only the images judged `exact` are varied. Returns `keep_rate` (judge exact of the
    variations), `num_sources`, and `mean_abs_pixel_difference` between variations and sources
    (0-255: variations must differ in pixels).
    """
    ok = [i for i, (img, c) in enumerate(zip(images, captions)) if shapes_judge.judge(img, c)["exact"]]
    if not ok:
        return {"keep_rate": float("nan"), "num_sources": 0.0, "mean_abs_pixel_difference": float("nan")}
    sources = images[ok]
    out = manipulations.variations(pipe, sources, num_variations=num_variations, eta=eta, seed=seed)
    kept = [shapes_judge.judge(v, captions[i])["exact"] for i, row in zip(ok, out) for v in row]
    src = resize(sources, out.shape[2])
    diff = np.abs(out.astype(np.float64) - src[:, None].astype(np.float64)).mean()
    return {"keep_rate": float(np.mean(kept)), "num_sources": float(len(ok)),
            "mean_abs_pixel_difference": float(diff)}


def _different_pairs(num_pairs: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Pairs of training single-object captions differing in colour and shape (same background)."""
    single = [c for c in shapes.train_captions() if shapes.parse_caption(c)["kind"] == "single"]
    pairs = []
    while len(pairs) < num_pairs:
        a, b = (single[i] for i in rng.choice(len(single), 2, replace=False))
        pa, pb = shapes.parse_caption(a), shapes.parse_caption(b)
        if pa["color"] != pb["color"] and pa["shape"] != pb["shape"] and pa["background"] == pb["background"]:
            pairs.append((a, b))
    return pairs


def interpolation_trajectory(pipe: UnCLIPPipeline, num_pairs: int, *, num_frames: int = 5,
                             noise: str = "inverted", seed: int = 0) -> dict[str, Any]:
    """Interpolations between renders of caption pairs (different colour and shape).

    Returns per-frame rates `frame_exact_a` / `frame_exact_b` (lists over frames), `endpoints`
    (first frame judged exact A and last judged exact B), and `monotone_colour` (the judged colour
    goes from A's to B's and never back).
    """
    rng = np.random.default_rng(seed)
    pairs = _different_pairs(num_pairs, rng)
    side = pipe.image_size
    exact_a, exact_b, ends, monotone = [], [], [], []
    for n, (a, b) in enumerate(pairs):
        images = render([a, b], side, seed + n)
        frames = manipulations.interpolate(pipe, images[0], images[1], num_frames=num_frames, noise=noise,
                                           seed=seed + n)
        ja = [shapes_judge.judge(f, a) for f in frames]
        jb = [shapes_judge.judge(f, b) for f in frames]
        exact_a.append([v["exact"] for v in ja])
        exact_b.append([v["exact"] for v in jb])
        ends.append(ja[0]["exact"] and jb[-1]["exact"])
        is_b = [v["color"] for v in jb]
        is_a = [v["color"] for v in ja]
        first_b = next((i for i, x in enumerate(is_b) if x), len(is_b))
        monotone.append(is_a[0] and is_b[-1] and all(is_b[first_b:]) and all(is_a[:first_b]))
    return {"frame_exact_a": np.mean(exact_a, 0).tolist(), "frame_exact_b": np.mean(exact_b, 0).tolist(),
            "endpoints": float(np.mean(ends)), "monotone_colour": float(np.mean(monotone)),
            "num_pairs": float(len(pairs))}


def text_diff_colour_change(pipe: UnCLIPPipeline, num_images: int, *,
                            thetas: Sequence[float] = (0.0, 0.25, 0.5), seed: int = 0) -> dict[str, Any]:
    """Text diffs "... red ..." -> "... blue ..." on renders of red single-object training captions.

    Per theta (lists): `blue_rate` (judged colour is blue), `shape_kept_rate` (judged shape is the
    source's), `changed_and_kept`; and `best_changed_and_kept`, the best over thetas.
    """
    rng = np.random.default_rng(seed)
    red = [c for c in shapes.train_captions()
           if shapes.parse_caption(c)["kind"] == "single" and shapes.parse_caption(c)["color"] == "red"]
    captions = _pick(red, num_images, rng)
    images = render(captions, pipe.image_size, seed)
    targets = [c.replace(" red ", " blue ") for c in captions]
    rows = manipulations.text_diff(pipe, images, captions, targets, thetas=thetas, seed=seed)
    blue = [[shapes_judge.judge(f, t)["color"] for f in row] for row, t in zip(rows, targets)]
    kept = [[shapes_judge.judge(f, c)["shape"] for f in row] for row, c in zip(rows, captions)]
    blue, kept = np.asarray(blue, float), np.asarray(kept, float)
    both = blue * kept
    return {"thetas": [float(t) for t in thetas], "blue_rate": blue.mean(0).tolist(),
            "shape_kept_rate": kept.mean(0).tolist(), "changed_and_kept": both.mean(0).tolist(),
            "best_changed_and_kept": float(both.mean(0).max()), "num_images": float(len(captions))}


def inversion_psnr(pipe: UnCLIPPipeline, num_images: int, *, num_fixed_point_iters: Sequence[int] = (0,),
                   seed: int = 0) -> dict[str, float]:
    """PSNR (dB) of DDIM inversion then DDIM regeneration of renders at the decoder's size.

    One entry `psnr_iters_<k>` per number of fixed-point refinements of the inversion, and
    `judge_exact_reconstructed` (the judge on the reconstructions, iters = the first entry).
    """
    rng = np.random.default_rng(seed)
    captions = _pick(shapes.train_captions(), num_images, rng)
    images = render(captions, max(pipe.base_size, shapes.MIN_SIDE), seed)
    results = {}
    for j, iters in enumerate(num_fixed_point_iters):
        enc = manipulations.encode(pipe, images, num_fixed_point_iters=int(iters))
        rec = manipulations.reconstruct(pipe, enc)
        results[f"psnr_iters_{int(iters)}"] = pixels.psnr(rec, enc.images)
        if j == 0 and pipe.base_size >= shapes.MIN_SIDE:
            results["judge_exact_reconstructed"] = float(np.mean(
                [shapes_judge.judge(r, c)["exact"] for r, c in zip(rec, captions)]))
    return results


def evaluate(pipe: UnCLIPPipeline, num_captions: int, *, seed: int = 0, num_variations: int = 4,
             eta: float = 1.0, num_frames: int = 5, thetas: Sequence[float] = (0.0, 0.25, 0.5),
             num_fixed_point_iters: Sequence[int] = (0, 2)) -> dict[str, Any]:
    """All of the above with `num_captions` per caption set (and as many images per manipulation).

    Variations are made of the correct text -> image samples of the training single- and
    two-object sets.
    """
    results: dict[str, Any] = {}
    t2i, samples = text_to_image(pipe, num_captions, seed=seed, return_samples=True)
    results.update({f"text_to_image/{k}": v for k, v in t2i.items()})
    captions = samples["train/single"][0] + samples["train/pair"][0]
    images = np.concatenate([samples["train/single"][1], samples["train/pair"][1]])
    results.update({f"variations/{k}": v for k, v in variation_keep_rate(
        pipe, captions, images, num_variations=num_variations, eta=eta, seed=seed).items()})
    results.update({f"interpolation/{k}": v for k, v in interpolation_trajectory(
        pipe, num_captions, num_frames=num_frames, seed=seed).items()})
    results.update({f"text_diff/{k}": v for k, v in text_diff_colour_change(
        pipe, num_captions, thetas=thetas, seed=seed).items()})
    results.update({f"inversion/{k}": v for k, v in inversion_psnr(
        pipe, num_captions, num_fixed_point_iters=num_fixed_point_iters, seed=seed).items()})
    return results


def _main():
    import json

    from absl import app, flags
    from ml_collections import config_flags

    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config_flags.DEFINE_config_file("config", os.path.join(root, "configs", "pipeline_shapes.py"),
                                    "Pipeline config.", lock_config=True)
    flags.DEFINE_integer("num_captions", 50, "Captions per caption set (and images per manipulation).")
    flags.DEFINE_integer("batch_size", 64, "Rows per batch.")
    flags.DEFINE_integer("seed", 0, "Seed of the captions, renders and samples.")
    flags.DEFINE_string("output", None, "Also write the results to this JSON file.")

    def main(argv):
        del argv
        from unclip_jax import cli

        cli.start()
        f = flags.FLAGS
        pipe = UnCLIPPipeline.from_config(f.config, batch_size=f.batch_size)
        results = evaluate(pipe, f.num_captions, seed=f.seed)
        results["settings"] = pipe.resolved_settings()
        text = json.dumps(results, indent=2)
        print(text)
        if f.output:
            with open(f.output, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")

    app.run(main)


if __name__ == "__main__":
    _main()
