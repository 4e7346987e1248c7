"""The zero-shot text-to-image evaluation end to end at tiny size: random stages, a random FID
InceptionV3, a second random CLIP as the evaluation CLIP, a generated reference folder; then the
resume (only missing samples are generated) and the reference checks."""
import json
import os

import jax
import numpy as np
import pytest

from tests import helpers, pipeline_stages
from tests.evaluation import inception_fixtures
from unclip_jax import parallel
from unclip_jax.data import images as image_lib
from unclip_jax.evaluation import features, frechet, t2i

pytest.importorskip("torch")

CAPTIONS = ["a large red circle in the center on a white background",
            "a blue triangle above a yellow cross on a gray background",
            "a small green square on the left on a black background"]
SCALES = [pipeline_stages.DECODER_GUIDANCE, 0.0]
NUM_SAMPLES, BATCH, K = 4, 4, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = pipeline_stages.tiny_pipeline(tmp_path_factory)
    root = tmp_path_factory.mktemp("t2i")
    _, weights = inception_fixtures.random_inception_weights(tmp_path_factory)
    # The Inception on one device: batches of BATCH rows, one compiled program.
    one = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    clip_dir = pipeline_stages.write_random_stage(helpers.tiny_config("clip"), str(root / "eval_clip"), seed=1)
    extractors = t2i.Extractors(
        inception=features.InceptionFeatures(weights, mesh=one, batch_size=BATCH),
        clip=features.ClipFeatures(clip_dir, mesh=pipe.mesh, batch_size=BATCH))
    rng = np.random.default_rng(0)
    ref_dir = root / "reference" / "nested"
    ref_dir.mkdir(parents=True)
    for i in range(8):  # Not the samples' size: resized (and cropped) to it.
        image = rng.integers(0, 256, (48, 40 + 4 * i, 3), dtype=np.uint8)
        (ref_dir / f"{i}.png").write_bytes(image_lib.encode_png(image))
    (root / "captions.txt").write_text("\n".join(CAPTIONS) + "\n\n")
    return pipe, extractors, root


def _evaluate(pipe, extractors, root, out, reference=None, **kw):
    return t2i.evaluate(pipe, t2i.read_captions(str(root / "captions.txt")), reference or str(root / "reference"),
                        num_samples=NUM_SAMPLES, guidance_scales=SCALES, output_dir=str(out),
                        extractors=extractors, k=K, batch_size=BATCH, **kw)


@pytest.mark.slow
def test_end_to_end_then_resume_generates_only_the_missing_samples(setup, tmp_path, monkeypatch):
    pipe, extractors, root = setup
    out = tmp_path / "eval"
    report = _evaluate(pipe, extractors, root, out)

    # Outputs: one PNG per (scale, sample), the reference statistics, the JSON and the curve.
    for s in SCALES:
        assert sorted(os.listdir(out / "samples" / t2i.scale_name(s))) == [f"{i:06d}.png" for i in range(NUM_SAMPLES)]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ref = frechet.load_reference(str(out / "reference.npz"))
    assert ref["inception"].count == ref["clip"].count == 8
    results = report["results"]
    assert sorted(results) == sorted(f"{s:g}" for s in SCALES)
    for r in results.values():
        assert r["generated_now"] == NUM_SAMPLES
        assert r["fid"] > 0 and r["fd_clip"] > 0 and 0 <= r["clip_score"] <= 100
        for kind in ("inception", "clip"):
            assert all(0 <= r[f"{kind}/{m}"] <= 1 for m in ("precision", "recall", "coverage"))

    # The metrics are those of the written PNGs, recomputed here from the parts.
    scale = SCALES[0]
    images = np.stack([image_lib.decode_image((out / "samples" / t2i.scale_name(scale) / f"{i:06d}.png").read_bytes())
                       for i in range(NUM_SAMPLES)])
    fid = frechet.distance(frechet.Statistics(extractors.inception.identity).update(
        extractors.inception.images(images)), ref["inception"])
    z_t = extractors.clip.texts([CAPTIONS[i % len(CAPTIONS)] for i in range(NUM_SAMPLES)])
    score = features.clip_score(extractors.clip.images(images), z_t).mean()
    assert results[f"{scale:g}"]["fid"] == pytest.approx(fid, rel=1e-6)
    assert results[f"{scale:g}"]["clip_score"] == pytest.approx(score, rel=1e-5)

    # Interrupted run: one sample missing (and a stale temporary file). Only it is generated,
    # identically (its key depends on its caption and index only), and the metrics are unchanged.
    lost = out / "samples" / t2i.scale_name(SCALES[1]) / "000002.png"
    before = lost.read_bytes()
    lost.unlink()
    (lost.parent / "000003.png.tmp-1").write_bytes(b"partial")
    ref_mtime = os.path.getmtime(out / "reference.npz")
    rows = []
    generate_rows = pipe.generate_rows
    monkeypatch.setattr(pipe, "generate_rows", lambda c, k, s=None: rows.extend(c) or generate_rows(c, k, s))
    again = _evaluate(pipe, extractors, root, out)
    assert rows == [CAPTIONS[2 % len(CAPTIONS)]]
    assert lost.read_bytes() == before
    assert os.path.getmtime(out / "reference.npz") == ref_mtime
    assert again["results"][f"{SCALES[1]:g}"]["generated_now"] == 1
    for s in results:
        for m, v in results[s].items():
            if m != "generated_now":
                assert again["results"][s][m] == pytest.approx(v, rel=1e-6), (s, m)

    # A resume with other settings, and reference statistics of another network, are refused.
    with pytest.raises(t2i.UsageError, match="seed"):
        _evaluate(pipe, extractors, root, out, seed=1)
    other = frechet.Statistics({"name": "inception_v3_fid", "weights_sha256": "00" * 32}).update(
        np.random.default_rng(0).standard_normal((3, 2048)))
    bad = str(tmp_path / "bad.npz")
    frechet.save_reference(bad, {"inception": other, "clip": ref["clip"]})
    with pytest.raises(frechet.MixedStatisticsError, match="different feature networks"):
        _evaluate(pipe, extractors, root, tmp_path / "eval2", reference=bad)


def test_inputs_are_checked(tmp_path):
    assert t2i.parse_guidance_scales("1, 2,3.5") == [1.0, 2.0, 3.5]
    for bad in ("1,x", "1,1", "-1", ""):
        with pytest.raises(t2i.UsageError, match="guidance_scales"):
            t2i.parse_guidance_scales(bad)
    assert t2i.scale_name(3.0) == "g3" and t2i.scale_name(1.5) == "g1.5"
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(t2i.UsageError, match="holds no caption"):
        t2i.read_captions(str(tmp_path / "empty.txt"))
    with pytest.raises(t2i.UsageError, match="does not exist"):
        t2i.read_captions(str(tmp_path / "missing.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(t2i.UsageError, match="no .png"):
        t2i.iter_reference_images(str(tmp_path / "folder"))
    with pytest.raises(t2i.UsageError, match="WebDataset"):
        t2i.iter_reference_images(str(tmp_path / "missing-{000..001}.tar"))
