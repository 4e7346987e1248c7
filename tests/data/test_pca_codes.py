"""The AR prior's PCA + quantile codebook: the fit against an SVD, round trips, storage checks."""
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.data import pca_codes

D, N, K, B = 12, 600, 5, 16


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z_i = rng.normal(size=(N, D)) * np.geomspace(3, 0.05, D) + 0.3
    z_t = z_i + rng.normal(size=(N, D))
    return z_i.astype(np.float32), z_t.astype(np.float32)


@pytest.fixture(scope="module")
def codebook(data):
    z_i, z_t = data
    chunks = [(z_i[i:i + 128], z_t[i:i + 128]) for i in range(0, N, 128)]  # Streamed in 5 chunks.
    return pca_codes.fit(chunks, num_components=K, num_buckets=B, source={"clip_step": 7})


def test_fit_matches_an_svd_of_the_centred_data(data, codebook):
    z = data[0].astype(np.float64)
    centred = z - z.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(codebook.mean, z.mean(0), atol=1e-6)
    np.testing.assert_allclose(codebook.eigenvalues, s[:K] ** 2 / N, rtol=1e-6)
    # The same directions up to sign, in decreasing eigenvalue order.
    np.testing.assert_allclose(np.abs(np.sum(codebook.components * vt[:K], -1)), 1.0, atol=1e-6)
    np.testing.assert_allclose(codebook.explained, np.sum(s[:K] ** 2) / np.sum(s ** 2), rtol=1e-6)


def test_codes_are_in_range_and_use_every_bucket_equally(data, codebook):
    codes = pca_codes.encode(codebook.arrays(), data[0])
    assert codes.shape == (N, K) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < B
    counts = np.stack([np.bincount(codes[:, k], minlength=B) for k in range(K)])
    assert counts.min() >= N // B - 2 and counts.max() <= N // B + 2  # Quantile buckets.
    dots = pca_codes.encode_dot(codebook.arrays(), data[0], data[1])
    assert dots.min() >= 0 and dots.max() < B
    # jax.numpy gives the same codes (the loss runs it under jit).
    np.testing.assert_array_equal(pca_codes.encode(codebook.arrays(), jnp.asarray(data[0]), xp=jnp), codes)


def test_inverse_is_within_the_quantisation_error(data, codebook):
    arrays = {k: v.astype(np.float64) for k, v in codebook.arrays().items()}
    z = data[0].astype(np.float64)
    codes = pca_codes.encode(arrays, z)
    proj = pca_codes.project(arrays, z)
    decoded = pca_codes.decode(arrays, codes)
    # In the PCA coordinates each decoded value lies in its bucket: |error| <= the bucket's width
    # (the outer buckets reach the data's extremes).
    lo = np.concatenate([proj.min(0)[:, None], arrays["edges"]], axis=1)
    hi = np.concatenate([arrays["edges"], proj.max(0)[:, None]], axis=1)
    width = np.take_along_axis((hi - lo)[None].repeat(N, 0), codes[..., None], -1)[..., 0]
    decoded_proj = pca_codes.project(arrays, decoded)
    assert np.all(np.abs(decoded_proj - proj) <= width + 1e-9)
    # Out of the kept subspace the error is exactly the discarded components' part.
    residual = (z - arrays["mean"]) - proj @ arrays["components"]
    np.testing.assert_allclose((z - decoded) - (proj - decoded_proj) @ arrays["components"], residual, atol=1e-6)


def test_all_components_unquantised_round_trip_exactly(data):
    z_i, z_t = data
    full = pca_codes.fit([(z_i, z_t)], num_components=D, num_buckets=B)
    rebuilt = pca_codes.reconstruct(full, z_i, quantised=False)
    np.testing.assert_allclose(rebuilt, z_i / np.linalg.norm(z_i, axis=-1, keepdims=True), atol=1e-5)


def test_save_load_and_mismatch_refused(codebook, tmp_path):
    path = str(tmp_path / "codes.npz")
    pca_codes.save(codebook, path)
    loaded = pca_codes.load(path)
    np.testing.assert_array_equal(loaded.centres, codebook.centres)
    pca_codes.check_matches(loaded, source={"clip_step": 7}, num_components=K, num_buckets=B)
    with pytest.raises(pca_codes.CodebookMismatchError, match="clip_step: codebook 7, cache 8"):
        pca_codes.check_matches(loaded, source={"clip_step": 8}, num_components=K, num_buckets=B)
    with pytest.raises(pca_codes.CodebookMismatchError, match="num_buckets"):
        pca_codes.check_matches(loaded, source={"clip_step": 7}, num_components=K, num_buckets=B * 2)
    with pytest.raises(FileNotFoundError, match="no PCA codebook"):
        pca_codes.load(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="num_components"):
        pca_codes.fit([(np.zeros((20, 4)), np.zeros((20, 4)))], num_components=5, num_buckets=4)
