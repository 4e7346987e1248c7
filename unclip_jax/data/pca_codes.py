"""PCA + per-component quantisation of CLIP image embeddings: the AR prior's token sequence.

The paper's autoregressive prior (Ramesh et al. 2022, §2.2) does not model z_i's D coordinates
but its first K principal components (319 of 1024 for ViT-H: under 1% mean squared
reconstruction error), ordered by decreasing eigenvalue, each quantised into B buckets (1024).
This module fits that map on an embedding cache and applies it; it is plain numpy on the host
for fitting (float64) and jnp-friendly for applying (the arrays are closed over by the jitted
loss and sampler).

Fitting (`fit`): the mean and covariance are accumulated in float64 over chunks of rows (a
streaming pass; the rows themselves are float32), the eigenvectors of the covariance sorted by
decreasing eigenvalue, and the first K kept. Each component's projections are then quantised.

Quantisation: per-component QUANTILE buckets (equal mass), not uniform bins. The projections
are roughly Gaussian with variances spanning orders of magnitude across components; uniform
bins over each component's range spend most codes on the sparse tails that a few outliers
stretch, while equal-mass buckets use every code equally often (maximum entropy per token, the
most information per predicted token) and are finest where the data is densest. A code decodes
to the MEAN of the training projections in its bucket (the conditional mean: the decoding with
the least squared error for these buckets). The dot product z_i . z_t the AR prior also
conditions on is quantised the same way (one more set of quantile buckets), so its token index
orders its value and "the top half of the distribution" is a range of indices.

The fitted codebook is stored as a small `.npz` with the cache metadata it came from (the
CLIP workdir, step and data source, as `embedding_cache` records them): `check_matches` refuses
a codebook fitted on another CLIP's embeddings with one message.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

FORMAT_VERSION = 1
# The cache metadata fields that identify the embeddings (not when or where they were built).
_IDENTITY = ("clip_workdir", "clip_step", "clip_params", "embed_dim", "context_length",
             "text_width", "source")


class CodebookMismatchError(ValueError):
    """A stored codebook was fitted on other embeddings, or with other settings, than asked now."""


@dataclasses.dataclass(frozen=True)
class Codebook:
    """A fitted PCA + quantiser.

    mean [D], components [K, D] (rows: unit principal directions, decreasing eigenvalue),
    eigenvalues [K]; edges [K, B - 1] (increasing bucket boundaries per component), centres
    [K, B] (each bucket's decoded value); dot_edges [B - 1], dot_centres [B] for z_i . z_t.
    `source` is the identity of the cache it was fitted on; `explained` the fraction of the total
    variance the K components hold.
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    edges: np.ndarray
    centres: np.ndarray
    dot_edges: np.ndarray
    dot_centres: np.ndarray
    source: dict
    explained: float

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def num_buckets(self) -> int:
        return int(self.centres.shape[1])

    @property
    def embed_dim(self) -> int:
        return int(self.components.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The float32 arrays `encode` / `decode` use (what a jitted function closes over)."""
        return {"mean": self.mean.astype(np.float32), "components": self.components.astype(np.float32),
                "edges": self.edges.astype(np.float32), "centres": self.centres.astype(np.float32),
                "dot_edges": self.dot_edges.astype(np.float32),
                "dot_centres": self.dot_centres.astype(np.float32)}


def cache_identity(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the embeddings of a cache split's metadata (see the module docstring)."""
    return {k: metadata.get(k) for k in _IDENTITY}


# ---------------------------------------------------------------------------------------------
# Fitting.
# ---------------------------------------------------------------------------------------------
def _quantile_buckets(values: np.ndarray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-mass bucket edges [..., B - 1] and bucket means [..., B] of values [..., N]."""
    qs = np.arange(1, num_buckets) / num_buckets
    edges = np.quantile(values, qs, axis=-1).T if values.ndim > 1 else np.quantile(values, qs)
    edges = np.asarray(edges, np.float64)
    values2 = np.atleast_2d(values)
    edges2 = np.atleast_2d(edges)
    centres = np.empty(values2.shape[:1] + (num_buckets,), np.float64)
    for k in range(values2.shape[0]):
        idx = np.searchsorted(edges2[k], values2[k], side="right")
        sums = np.bincount(idx, weights=values2[k], minlength=num_buckets)
        counts = np.bincount(idx, minlength=num_buckets)
        # An empty bucket (ties in the data) decodes to the midpoint of its edges.
        lo = np.concatenate([[values2[k].min()], edges2[k]])
        hi = np.concatenate([edges2[k], [values2[k].max()]])
        centres[k] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.5 * (lo + hi))
    return edges, (centres if values.ndim > 1 else centres[0])


def fit(chunks: Iterable[tuple[np.ndarray, np.ndarray]], *, num_components: int, num_buckets: int,
        source: Mapping[str, Any] | None = None) -> Codebook:
    """Fits the codebook on chunks of (z_i [n, D], z_t [n, D]) rows.

    The chunks are read once; the mean and covariance accumulate in float64 as they come, and the
    rows are kept (float32) for the quantiles of their projections.
    """
    if num_buckets < 2:
        raise ValueError(f"num_buckets must be at least 2, got {num_buckets}")
    total, s1, s2, kept_z, kept_dot = 0, None, None, [], []
    for z_i, z_t in chunks:
        z_i, z_t = np.asarray(z_i, np.float32), np.asarray(z_t, np.float32)
        x = z_i.astype(np.float64)
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 = x.T @ x if s2 is None else s2 + x.T @ x
        total += len(x)
        kept_z.append(z_i)
        kept_dot.append(np.sum(z_i * z_t, -1))
    if total == 0:
        raise ValueError("no embeddings to fit the PCA codebook on")
    d = s1.shape[0]
    if not 1 <= num_components <= min(d, total):
        raise ValueError(f"num_components={num_components}: expected 1 .. min(embed_dim={d}, "
                         f"examples={total})")
    if total < num_buckets:
        raise ValueError(f"{total} examples cannot fill num_buckets={num_buckets} quantile buckets")
    mean = s1 / total
    cov = s2 / total - np.outer(mean, mean)
    eigenvalues, vectors = np.linalg.eigh(cov)  # Ascending.
    order = np.argsort(eigenvalues)[::-1][:num_components]
    components = vectors[:, order].T  # [K, D]
    # A fixed sign per component (largest-magnitude coordinate positive): reproducible fits.
    signs = np.sign(components[np.arange(num_components), np.argmax(np.abs(components), 1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    z = np.concatenate(kept_z).astype(np.float64)
    proj = (z - mean) @ components.T  # [N, K]
    edges, centres = _quantile_buckets(proj.T, num_buckets)
    dot_edges, dot_centres = _quantile_buckets(np.concatenate(kept_dot).astype(np.float64), num_buckets)
    explained = float(np.clip(eigenvalues[order].sum() / max(np.trace(cov), 1e-300), 0.0, 1.0))
    return Codebook(mean=mean, components=components, eigenvalues=eigenvalues[order], edges=edges,
                    centres=centres, dot_edges=dot_edges, dot_centres=dot_centres,
                    source=dict(source or {}), explained=explained)


def cache_chunks(source, num_examples: int = 0, chunk_rows: int = 4096):
    """(z_i, z_t) chunks of the first `num_examples` (0: all) records of an embedding cache split
    (`embedding_cache.CacheSource`)."""
    n = len(source) if not num_examples else min(int(num_examples), len(source))
    for start in range(0, n, chunk_rows):
        records = [source[i] for i in range(start, min(n, start + chunk_rows))]
        yield (np.stack([r["z_i"] for r in records]), np.stack([r["z_t"] for r in records]))


# ---------------------------------------------------------------------------------------------
# Applying (numpy or jax.numpy: pass `xp`).
# ---------------------------------------------------------------------------------------------
def project(arrays: Mapping[str, Any], z_i, xp=np):
    """PCA coordinates [..., K] of z_i [..., D]."""
    return (z_i - arrays["mean"]) @ arrays["components"].T


def _bucketise(values, edges, xp):
    """Bucket index of values [..., K] against per-component increasing edges [K, B - 1]."""
    return xp.sum(values[..., None] >= edges, axis=-1).astype(xp.int32)


def encode(arrays: Mapping[str, Any], z_i, xp=np):
    """Codes int32 [..., K] in [0, B) of z_i [..., D]."""
    return _bucketise(project(arrays, z_i, xp), arrays["edges"], xp)


def encode_dot(arrays: Mapping[str, Any], z_i, z_t, xp=np):
    """The dot-product token int32 [...] of z_i . z_t (its quantile bucket)."""
    return _bucketise(xp.sum(z_i * z_t, -1), arrays["dot_edges"], xp)


def decode(arrays: Mapping[str, Any], codes, xp=np):
    """z_i [..., D] (not normalised) of codes [..., K]: each code's bucket value, inverse PCA."""
    k = arrays["centres"].shape[0]
    values = xp.take_along_axis(xp.broadcast_to(arrays["centres"], codes.shape[:-1] + (k, arrays["centres"].shape[1])),
                                codes[..., None], axis=-1)[..., 0]
    return values @ arrays["components"] + arrays["mean"]


def reconstruct(codebook: Codebook, z_i: np.ndarray, num_kept: int | None = None,
                quantised: bool = True) -> np.ndarray:
    """Unit z_i [N, D] rebuilt from its first `num_kept` components (all: None), quantised or not
    (the reconstruction curve)."""
    arrays = {k: np.asarray(v, np.float64) for k, v in codebook.arrays().items()}
    k = codebook.num_components if num_kept is None else int(num_kept)
    proj = project(arrays, np.asarray(z_i, np.float64))[:, :k]
    if quantised:
        codes = _bucketise(proj, arrays["edges"][:k], np)
        proj = np.take_along_axis(arrays["centres"][:k][None].repeat(len(proj), 0), codes[..., None], -1)[..., 0]
    out = proj @ arrays["components"][:k] + arrays["mean"]
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Storage.
# ---------------------------------------------------------------------------------------------
def save(codebook: Codebook, path: str) -> None:
    """Writes the codebook to `path` (.npz), atomically."""
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, mean=codebook.mean, components=codebook.components,
             eigenvalues=codebook.eigenvalues, edges=codebook.edges, centres=codebook.centres,
             dot_edges=codebook.dot_edges, dot_centres=codebook.dot_centres,
             explained=np.float64(codebook.explained),
             info=np.array(json.dumps({"format_version": FORMAT_VERSION, "source": codebook.source},
                                      sort_keys=True)))
    os.replace(tmp, path)


def load(path: str) -> Codebook:
    """Reads a codebook written by `save`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no PCA codebook at {path}: it is written when the AR prior's "
                                "training starts (python train.py --config <config>:ar_prior ...)")
    with np.load(path) as f:
        info = json.loads(str(f["info"]))
        if info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: codebook format {info.get('format_version')}, expected "
                             f"{FORMAT_VERSION}")
        return Codebook(mean=f["mean"], components=f["components"], eigenvalues=f["eigenvalues"],
                        edges=f["edges"], centres=f["centres"], dot_edges=f["dot_edges"],
                        dot_centres=f["dot_centres"], source=info["source"],
                        explained=float(f["explained"]))


def check_matches(codebook: Codebook, *, source: Mapping[str, Any], num_components: int,
                  num_buckets: int, path: str = "the codebook") -> None:
    """Refuses (one `CodebookMismatchError` listing every difference) a codebook fitted on other
    embeddings or with other sizes than asked."""
    problems = []
    wanted = json.loads(json.dumps(dict(source)))  # As a JSON round trip stores it.
    for k in sorted(set(wanted) | set(codebook.source)):
        if wanted.get(k) != codebook.source.get(k):
            problems.append(f"{k}: codebook {codebook.source.get(k)!r}, cache {wanted.get(k)!r}")
    if codebook.num_components != num_components:
        problems.append(f"num_components: codebook {codebook.num_components}, config {num_components}")
    if codebook.num_buckets != num_buckets:
        problems.append(f"num_buckets: codebook {codebook.num_buckets}, config {num_buckets}")
    if problems:
        raise CodebookMismatchError(
            f"{path} was fitted on other embeddings or with other settings:\n  " + "\n  ".join(problems)
            + "\nUse a new workdir for a prior on this CLIP's cache (or delete the file to refit).")
