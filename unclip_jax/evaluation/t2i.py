"""Zero-shot text-to-image evaluation: FID, FD-CLIP, CLIP score and precision/recall per guidance scale.

    python -m unclip_jax.evaluation.t2i --config configs/pipeline_shapes.py:runs/stack_fast \
        --captions captions.txt --reference data/val_images/ --num_samples 10000 \
        --guidance_scales 1,2,3,4 --inception weights/fid_inception.safetensors \
        --clip_workdir runs/clip_eval --output_dir runs/eval_t2i

For each guidance scale (of the decoder, or with --guide prior of the prior) the pipeline samples
`num_samples` images, sample i from caption i mod C (C captions, in file order) with the row key
of (caption i mod C, repeat i div C) (`pipeline.row_keys`): every scale sees the same captions
and the same noise, so the curve compares like with like. Every sample is written as
`<output_dir>/samples/g<scale>/<i>.png` (atomically), so an interrupted run resumes: samples
already written are not generated again. Then, from the PNGs:

- `fid`: Frechet distance of InceptionV3 pool3 features (pytorch-fid's network, `--inception`);
- `fd_clip`: Frechet distance of the evaluation CLIP's image embeddings (`--clip_workdir`);
- `clip_score`: mean of 100 * max(cos(image, caption), 0) under the evaluation CLIP;
- `<inception|clip>/{precision, recall, density, coverage}` (k-NN, `--k`) against the reference
  features stored with the reference statistics.

The reference is an image folder, WebDataset shards, or a statistics `.npz` (`frechet`). From
images, each is centre-cropped and resized (bicubic) to the pipeline's output size, as the
samples are, and the statistics are written to `<output_dir>/reference.npz` (reused on resume; pass
it as --reference to later runs). Results go to `<output_dir>/metrics.json` and the curves to
`<output_dir>/metrics.png`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging

from unclip_jax.cli import UsageError, read_lines
from unclip_jax.data import images as image_lib
from unclip_jax.evaluation import features as features_lib
from unclip_jax.evaluation import frechet, prdc

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
GUIDES = ("decoder", "prior")
RUN_FILE = "run.json"




# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def read_captions(path: str) -> list[str]:
    """One caption per line (blank lines skipped)."""
    return read_lines(path, "--captions", "caption")


def parse_guidance_scales(text: str | Sequence[float]) -> list[float]:
    """"1,2,3.5" -> [1.0, 2.0, 3.5] (distinct, >= 0, in the given order)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        scales = [float(s) for s in items if str(s).strip()]
    except ValueError as e:
        raise UsageError(f"--guidance_scales {text!r}: expected comma-separated numbers") from e
    if not scales or any(not s >= 0 for s in scales) or len(set(scales)) != len(scales):
        raise UsageError(f"--guidance_scales {text!r}: expected distinct numbers >= 0")
    return scales


def scale_name(scale: float) -> str:
    """The directory name of a guidance scale's samples: 3.0 -> "g3", 1.5 -> "g1.5"."""
    return f"g{float(scale):g}"


def iter_reference_images(reference: str, limit: int | None = None) -> tuple[int, Iterator[np.ndarray]]:
    """(count, iterator of uint8 [H, W, 3]) of an image folder (recursive, sorted) or WebDataset
    shards (a path or pattern of `.tar` files); undecodable images are skipped with a warning."""
    if os.path.isdir(reference):
        files = sorted(p for p in glob.glob(os.path.join(reference, "**", "*"), recursive=True)
                       if p.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"--reference {reference}: no {'/'.join(IMAGE_EXTENSIONS)} image in the folder")
        files = files[:limit] if limit else files

        def read_files():
            for path in files:
                with open(path, "rb") as f:
                    try:
                        yield image_lib.decode_image(f.read())
                    except ValueError as e:
                        logging.warning("reference: skipping %s: %s", path, e)

        return len(files), read_files()
    from unclip_jax.data import webdataset

    try:
        source = webdataset.WebDatasetSource(reference)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--reference {reference}: not an image folder, a statistics .npz, or "
                         f"readable WebDataset shards: {e}") from e
    n = min(len(source), limit) if limit else len(source)

    def read_shards():
        for i in range(n):
            try:
                yield image_lib.decode_image(source[i]["image"])
            except ValueError as e:
                logging.warning("reference: skipping sample %d: %s", i, e)

    return n, read_shards()


def _chunks(it: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# Features of a set of images
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Extractors:
    """The feature networks of the evaluation: {"inception": ..., "clip": ...} (either may be None)."""

    inception: features_lib.InceptionFeatures | None
    clip: features_lib.ClipFeatures

    def kinds(self) -> dict[str, Any]:
        return {k: v for k, v in (("inception", self.inception), ("clip", self.clip)) if v is not None}


def image_features(extractors: Extractors, chunks: Iterator[list[np.ndarray]], *, keep: np.ndarray | None = None
                   ) -> tuple[dict[str, frechet.Statistics], dict[str, np.ndarray]]:
    """Streaming statistics per feature network of uint8 image chunks, and the features of the rows
    whose running index is in `keep` (all rows when None)."""
    stats = {k: frechet.Statistics(e.identity) for k, e in extractors.kinds().items()}
    kept: dict[str, list[np.ndarray]] = {k: [] for k in stats}
    seen = 0
    for chunk in chunks:
        batch = np.stack(chunk)
        rows = np.arange(seen, seen + len(batch))
        mask = np.ones(len(batch), bool) if keep is None else np.isin(rows, keep)
        seen += len(batch)
        for kind, extractor in extractors.kinds().items():
            f = extractor.images(batch)
            stats[kind].update(f)
            kept[kind].append(f[mask])
    return stats, {k: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for k, v in kept.items()}


def reference_statistics(reference: str, extractors: Extractors, *, image_size: int, output_dir: str,
                         max_images: int | None, max_prdc: int, batch_size: int, seed: int) -> dict[str, Any]:
    """The reference's {kind: Statistics, "<kind>.features": ...}: loaded from an `.npz`, or
    computed from images (resized to `image_size`) and saved to `<output_dir>/reference.npz`."""
    cached = os.path.join(output_dir, "reference.npz")
    source = reference
    if reference.endswith(".npz"):
        ref = frechet.load_reference(reference)
    elif os.path.isfile(cached):
        ref = frechet.load_reference(cached)
        if ref["info"].get("source") != os.path.abspath(reference):
            raise UsageError(f"{cached} holds the statistics of {ref['info'].get('source')}, not of "
                             f"--reference {reference}: use another --output_dir")
        source = cached
    else:
        n, images = iter_reference_images(reference, max_images)
        keep = np.random.default_rng(seed).permutation(n)[:max_prdc]
        resized = (image_lib.resize_center_crop(x, image_size) for x in images)
        logging.info("reference: features of %d images from %s", n, reference)
        stats, feats = image_features(extractors, _chunks(resized, batch_size), keep=keep)
        frechet.save_reference(cached, stats, feats, source=os.path.abspath(reference), image_size=image_size)
        ref = frechet.load_reference(cached)
    for kind, extractor in extractors.kinds().items():
        if kind not in ref:
            raise UsageError(f"reference statistics {source} hold no {kind} statistics "
                             f"(they hold {sorted(k for k in frechet.KINDS if k in ref)})")
        frechet.check_same_extractor(ref[kind].extractor, extractor.identity)
    size = ref["info"].get("image_size")
    if size is not None and int(size) != int(image_size):
        logging.warning("reference statistics %s are of %s px images; the samples are %d px",
                        source, size, image_size)
    return ref


# ---------------------------------------------------------------------------------------------
# Sampling with resume
# ---------------------------------------------------------------------------------------------
def sample_path(output_dir: str, scale: float, index: int) -> str:
    return os.path.join(output_dir, "samples", scale_name(scale), f"{index:06d}.png")


def write_png(path: str, image: np.ndarray) -> None:
    """Writes a PNG atomically (a temporary file in the same folder, then renamed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(image_lib.encode_png(image))
    os.replace(tmp, path)


def _check_run(output_dir: str, record: dict[str, Any]) -> None:
    """Writes `run.json` on the first run; a resumed run must have the same captions, seed, guide
    and pipeline (else its old samples would be mixed with new ones)."""
    path = os.path.join(output_dir, RUN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = sorted(k for k in record if old.get(k) != record[k])
        if changed:
            raise UsageError(f"{output_dir} holds samples of another evaluation ({', '.join(changed)} "
                             "differ): use another --output_dir, or the same settings to resume")
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def generate_missing(pipe, captions: Sequence[str], scale: float, num_samples: int, *, output_dir: str,
                     seed: int, guide: str, chunk_size: int) -> int:
    """Samples the missing PNGs of one guidance scale, `chunk_size` rows at a time; returns how many."""
    from unclip_jax import pipeline as pipeline_lib

    missing = [i for i in range(num_samples) if not os.path.isfile(sample_path(output_dir, scale, i))]
    if not missing:
        return 0
    c = len(captions)
    settings = pipe.settings
    block = getattr(settings, guide)
    settings = dataclasses.replace(settings, **{guide: dataclasses.replace(block, guidance_scale=float(scale))})
    logging.info("guidance %g: sampling %d of %d images", scale, len(missing), num_samples)
    for lo in range(0, len(missing), chunk_size):
        rows = np.asarray(missing[lo:lo + chunk_size])
        keys = pipeline_lib.row_keys(seed, rows % c, rows // c)
        out = pipe.generate_rows([captions[i % c] for i in rows], keys, settings)
        for i, image in zip(rows, out.images):
            write_png(sample_path(output_dir, scale, int(i)), image)
    return len(missing)


def read_samples(output_dir: str, scale: float, num_samples: int, batch_size: int) -> Iterator[list[np.ndarray]]:
    def read():
        for i in range(num_samples):
            with open(sample_path(output_dir, scale, i), "rb") as f:
                yield image_lib.decode_image(f.read())

    return _chunks(read(), batch_size)


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------
def evaluate(pipe, captions: Sequence[str], reference: str, *, num_samples: int,
             guidance_scales: Sequence[float], output_dir: str, extractors: Extractors,
             guide: str = "decoder", seed: int = 0, k: int = prdc.DEFAULT_K,
             max_reference: int | None = None, max_prdc: int = 10000, batch_size: int = 64,
             pipeline_id: dict | None = None) -> dict[str, Any]:
    """Samples (resuming), computes every metric per guidance scale, writes metrics.json and
    metrics.png under `output_dir`, and returns the JSON's contents."""
    if guide not in GUIDES:
        raise UsageError(f"--guide {guide!r}: expected one of {list(GUIDES)}")
    if int(num_samples) < 2:
        raise UsageError(f"--num_samples {num_samples}: at least 2 (a covariance needs 2 samples)")
    captions = list(captions)
    scales = parse_guidance_scales(guidance_scales)
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()
    _check_run(output_dir, {"captions_sha256": digest, "num_captions": len(captions), "seed": int(seed),
                            "guide": guide, "pipeline": pipeline_id or {}, "image_size": int(pipe.image_size)})
    ref = reference_statistics(reference, extractors, image_size=pipe.image_size, output_dir=output_dir,
                               max_images=max_reference, max_prdc=max_prdc, batch_size=batch_size, seed=seed)
    text = extractors.clip.texts(captions)[np.arange(num_samples) % len(captions)]
    results: dict[str, dict[str, float]] = {}
    for scale in scales:
        generated = generate_missing(pipe, captions, scale, num_samples, output_dir=output_dir, seed=seed,
                                     guide=guide, chunk_size=batch_size)
        stats, feats = image_features(extractors, read_samples(output_dir, scale, num_samples, batch_size))
        r: dict[str, float] = {"generated_now": generated}
        if "inception" in stats:
            r["fid"] = frechet.distance(stats["inception"], ref["inception"])
        r["fd_clip"] = frechet.distance(stats["clip"], ref["clip"])
        r["clip_score"] = float(features_lib.clip_score(feats["clip"], text).mean())
        for kind in stats:
            real = ref.get(f"{kind}.features")
            if real is not None and min(len(real), num_samples) > k:
                r.update({f"{kind}/{m}": v for m, v in prdc.prdc(real, feats[kind], k=k).items()})
            else:
                logging.warning("%s precision/recall skipped: %s", kind,
                                "the reference statistics hold no features" if real is None
                                else f"needs more than k={k} reference features and samples")
        results[f"{scale:g}"] = r
        logging.info("guidance %g: %s", scale, {m: round(v, 4) for m, v in r.items()})
    report = {
        "results": results,
        "protocol": {"num_samples": int(num_samples), "num_captions": len(captions),
                     "captions_sha256": digest, "seed": int(seed), "guide": guide, "k": int(k),
                     "image_size": int(pipe.image_size)},
        "reference": {"source": os.path.abspath(reference),
                      **{kind: {"count": int(ref[kind].count), "extractor": ref[kind].extractor,
                                "features_for_prdc": int(len(ref.get(f"{kind}.features", [])))}
                         for kind in extractors.kinds()}},
        "feature_networks": {kind: e.identity for kind, e in extractors.kinds().items()},
        "settings": pipe.resolved_settings(),
    }
    _write_json(os.path.join(output_dir, "metrics.json"), report)
    plot(results, os.path.join(output_dir, "metrics.png"), guide)
    return report


def _write_json(path: str, data: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def plot(results: dict[str, dict[str, float]], path: str, guide: str) -> None:
    """Two panels: FID and FD-CLIP against the guidance scale; FID (or FD-CLIP) against CLIP score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(results, key=float)
    x = [float(s) for s in scales]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for metric, style in (("fid", "o-"), ("fd_clip", "s--")):
        if all(metric in results[s] for s in scales):
            left.plot(x, [results[s][metric] for s in scales], style, label=metric.upper().replace("_", "-"))
    left.set_xlabel(f"{guide} guidance scale")
    left.set_ylabel("Frechet distance (lower is better)")
    left.legend()
    distance = "fid" if all("fid" in results[s] for s in scales) else "fd_clip"
    clip = [results[s]["clip_score"] for s in scales]
    right.plot(clip, [results[s][distance] for s in scales], "o-")
    for s, cx, d in zip(scales, clip, [results[s][distance] for s in scales]):
        right.annotate(s, (cx, d), textcoords="offset points", xytext=(4, 4))
    right.set_xlabel("CLIP score (higher is better)")
    right.set_ylabel(distance.upper().replace("_", "-"))
    right.set_title("trade-off over guidance scales")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_extractors(inception: str | None, clip_workdir: str | None, pipe, batch_size: int) -> Extractors:
    """The Inception (when given) and the evaluation CLIP (default: the pipeline's own, with a warning)."""
    inc = None
    if inception:
        inc = features_lib.InceptionFeatures(inception, mesh=pipe.mesh, batch_size=batch_size)
    else:
        logging.warning("no --inception weights: FID (and Inception precision/recall) not computed")
    if not clip_workdir or os.path.abspath(clip_workdir) == os.path.abspath(pipe.clip.workdir):
        logging.warning("evaluating with the CLIP the pipeline is conditioned on: its FD-CLIP and CLIP "
                        "score favour samples that fit that CLIP's embedding; give another CLIP "
                        "(--clip_workdir) for scores comparable across models")
        clip = features_lib.ClipFeatures(pipe.clip.workdir, loaded=pipe.clip, batch_size=batch_size)
    else:
        clip = features_lib.ClipFeatures(clip_workdir, mesh=pipe.mesh, batch_size=batch_size)
    return Extractors(inception=inc, clip=clip)


def _main():
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Pipeline config (configs/pipeline_shapes.py).",
                                    lock_config=True)
    flags.DEFINE_string("captions", None, "Text file, one caption per line (cycled over the samples).")
    flags.DEFINE_string("reference", None, "Real images: a folder, WebDataset shards, or a statistics .npz.")
    flags.DEFINE_integer("num_samples", 10000, "Images per guidance scale.")
    flags.DEFINE_string("guidance_scales", "1,2,3,4", "Comma-separated guidance scales.")
    flags.DEFINE_enum("guide", "decoder", list(GUIDES), "Which stage's guidance scale varies.")
    flags.DEFINE_string("output_dir", None, "Samples, reference.npz, metrics.json and metrics.png (resumes).")
    flags.DEFINE_string("inception", None, "FID InceptionV3 weights (safetensors from convert_inception.py).")
    flags.DEFINE_string("clip_workdir", None, "Evaluation CLIP workdir (default: the pipeline's CLIP).")
    flags.DEFINE_integer("k", prdc.DEFAULT_K, "Nearest neighbours of precision/recall/density/coverage.")
    flags.DEFINE_integer("max_reference", None, "Use at most this many reference images.")
    flags.DEFINE_integer("max_prdc", 10000, "Reference features kept for precision/recall.")
    flags.DEFINE_integer("batch_size", 64, "Rows per batch (sampling and features).")
    flags.DEFINE_integer("seed", 0, "Seed of the samples' noise.")
    flags.mark_flags_as_required(["config", "captions", "reference", "output_dir"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        from unclip_jax import cli
        from unclip_jax.pipeline import StageError, UnCLIPPipeline
        from unclip_jax.stages import load

        cli.start()
        f = flags.FLAGS
        try:
            captions = read_captions(f.captions)
            parse_guidance_scales(f.guidance_scales)
            if not (os.path.exists(f.reference) or f.reference.endswith(".tar") or "{" in f.reference
                    or glob.has_magic(f.reference)):
                raise UsageError(f"--reference {f.reference} does not exist")
            pipe = UnCLIPPipeline.from_config(f.config, batch_size=f.batch_size)
            extractors = build_extractors(f.inception, f.clip_workdir, pipe, f.batch_size)
            pipeline_id = {name: {"workdir": s["workdir"], "step": s["step"]}
                           for name, s in pipe.resolved_settings()["stages"].items()}
            report = evaluate(pipe, captions, f.reference, num_samples=f.num_samples,
                              guidance_scales=f.guidance_scales, output_dir=f.output_dir,
                              extractors=extractors, guide=f.guide, seed=f.seed, k=f.k,
                              max_reference=f.max_reference, max_prdc=f.max_prdc,
                              batch_size=f.batch_size, pipeline_id=pipeline_id)
        except (UsageError, features_lib.WeightsError, frechet.MixedStatisticsError, FileNotFoundError,
                load.NotTrainedError, StageError) as e:
            sys.exit(f"t2i: {e}")
        print(json.dumps(report["results"], indent=2))

    app.run(main)


if __name__ == "__main__":
    _main()
