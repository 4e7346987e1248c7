"""Frechet distance (closed forms, scipy's sqrtm route), streaming statistics, reference files,
precision/recall/density/coverage against a brute-force transcription, and the CLIP score."""
import numpy as np
import pytest

from unclip_jax.evaluation import features, frechet, prdc

IDENTITY = {"name": "net", "weights_sha256": "ab" * 32}


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _stats(x, identity=IDENTITY):
    return frechet.Statistics(identity).update(x)


@pytest.mark.parametrize("n, d", [(400, 32), (40, 64)])  # Full rank, and fewer samples than dimensions.
def test_a_set_against_itself_is_zero(n, d):
    x = 100.0 + np.random.default_rng(0).standard_normal((n, d)) * np.linspace(0.01, 3, d)
    s = _stats(x)
    assert abs(frechet.distance(s, s)) < 1e-6
    assert frechet.distance(s, _stats(x + 0.5)) == pytest.approx(0.25 * d, rel=1e-6)


def test_closed_forms_of_gaussians():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # Commuting (diagonal) covariances: sum of squared differences of the standard deviations.
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # S2 = c^2 S1 (not diagonal): |dmu|^2 + (1 - c)^2 tr(S1).
    s1 = _spd(rng, d)
    want = np.sum((mu1 - mu2) ** 2) + (1 - 3.0) ** 2 * np.trace(s1)
    assert frechet.frechet_distance(mu1, s1, mu2, 9.0 * s1) == pytest.approx(want, rel=1e-10)


def test_two_gaussian_samples_match_the_closed_form_and_scipy_sqrtm():
    rng = np.random.default_rng(2)
    d, n = 6, 40000
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 1
    a, b = rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
    x = mu1 + rng.standard_normal((n, d)) * np.sqrt(a)
    y = mu2 + rng.standard_normal((n, d)) * np.sqrt(b)
    sx, sy = _stats(x), _stats(y)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.distance(sx, sy)
    assert got == pytest.approx(want, rel=0.02)  # Sampling error of 40k samples (~0.3%).
    # Non-commuting covariances: the general formula through scipy's matrix square root.
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _spd(rng, 12), _spd(rng, 12, 2.0)
    m1, m2 = rng.standard_normal(12), rng.standard_normal(12)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-8)


def test_streaming_statistics_equal_the_one_shot_ones():
    rng = np.random.default_rng(3)
    x = 1e3 + rng.standard_normal((203, 24)) * rng.uniform(0.01, 2, 24)
    s = frechet.Statistics(IDENTITY)
    for lo, hi in ((0, 1), (1, 1), (1, 50), (50, 51), (51, 203)):  # Uneven, one empty, single rows.
        s.update(x[lo:hi])
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.covariance, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    merged = _stats(x[:80]).merge(_stats(x[80:]))
    np.testing.assert_allclose(merged.covariance, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert s.count == merged.count == 203


def test_low_rank_routes_equal_the_general_formula():
    """Sets of at most D samples keep them: the distance through their factors equals the one
    through D x D matrices, for two, one or no low-rank sets."""
    rng = np.random.default_rng(8)
    d = 24
    small = [5.0 + rng.standard_normal((n, d)) * rng.uniform(0.1, 2, d) for n in (7, 20)]
    large = rng.standard_normal((60, d)) @ _spd(rng, d)
    for x, y in ((small[0], small[1]), (small[0], large), (large, small[1]), (large, large + 1)):
        sx, sy = _stats(x), _stats(y)
        assert (sx.rows is not None) == (len(x) <= d) and (sy.rows is not None) == (len(y) <= d)
        want = frechet.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
        assert frechet.distance(sx, sy) == pytest.approx(want, rel=1e-7)
    grown = _stats(small[0]).update(large)  # Past D samples: the rows are dropped.
    assert grown.rows is None and grown.count == 67


def test_statistics_of_different_networks_are_refused():
    x = np.random.default_rng(4).standard_normal((20, 4))
    other = dict(IDENTITY, weights_sha256="cd" * 32)
    with pytest.raises(frechet.MixedStatisticsError, match="different feature networks"):
        frechet.distance(_stats(x), _stats(x, other))
    with pytest.raises(frechet.MixedStatisticsError):
        _stats(x).merge(_stats(x, {"name": "clip:other", "weights_sha256": "00"}))
    with pytest.raises(ValueError, match="4 dimensions, these statistics 3"):
        frechet.Statistics(dim=3).update(x)


def test_reference_files_round_trip_and_refuse_foreign_files(tmp_path):
    rng = np.random.default_rng(5)
    x, z = rng.standard_normal((30, 8)), rng.standard_normal((30, 4))
    clip_id = {"name": "clip:eval", "weights_sha256": "ef" * 32}
    path = str(tmp_path / "ref.npz")
    frechet.save_reference(path, {"inception": _stats(x), "clip": _stats(z, clip_id)},
                           {"clip": z}, source="folder")
    ref = frechet.load_reference(path)
    assert ref["info"] == {"source": "folder"} and ref["clip"].extractor == clip_id
    assert ref["inception"].count == 30 and "inception.features" not in ref
    assert ref["inception"].rows is None and ref["clip"].rows is None  # n > D: moments only.
    frechet.save_reference(path + ".small.npz", {"inception": _stats(x[:5])})
    np.testing.assert_array_equal(frechet.load_reference(path + ".small.npz")["inception"].rows, x[:5])
    np.testing.assert_allclose(ref["clip.features"], z.astype(np.float32))
    assert frechet.distance(ref["inception"], _stats(x)) < 1e-6
    with pytest.raises(frechet.MixedStatisticsError):
        frechet.distance(ref["clip"], _stats(z))
    np.savez(tmp_path / "other.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))  # pytorch-fid's.
    with pytest.raises(ValueError, match="no reference statistics written by this project"):
        frechet.load_reference(str(tmp_path / "other.npz"))
    with pytest.raises(FileNotFoundError):
        frechet.load_reference(str(tmp_path / "missing.npz"))


def _prdc_brute_force(real, fake, k):
    """The definitions, with full distance matrices (as the reference `prdc` package)."""
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: E731
    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)  # [N, M]
    inside = d <= r_real[:, None]
    return {"precision": (inside.any(0)).mean(),
            "recall": (d <= r_fake[None, :]).any(1).mean(),
            "density": inside.sum() / (k * len(fake)),
            "coverage": (d.min(1) <= r_real).mean()}


def test_prdc_matches_the_definitions():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((60, 5))
    fake = 0.7 * rng.standard_normal((45, 5)) + 0.4
    got = prdc.prdc(real, fake, k=3, block_size=7)
    want = _prdc_brute_force(real, fake, 3)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    same = prdc.prdc(real, real, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc.prdc(real, fake + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="more than k"):
        prdc.prdc(real[:3], fake, k=3)


def test_clip_score_is_100_times_the_clipped_cosine():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((50, 8))
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(features.clip_score(a, b), 100 * np.maximum(cos, 0), rtol=1e-5)
    assert (features.clip_score(a, -a) == 0).all() and np.allclose(features.clip_score(a, 3 * a), 100)
    with pytest.raises(ValueError, match="one caption per image"):
        features.clip_score(a, b[:3])
