"""Precision, recall, density and coverage of generated features against real ones (k-NN).

Fidelity and diversity separately, where FID mixes both into one number:

- precision (Kynkaanniemi et al. 2019): the fraction of generated samples inside the real
  manifold, the union of balls around each real sample with radius its distance to its k-th
  nearest real neighbour;
- recall: the fraction of real samples inside the generated manifold (the same, roles swapped);
- density (Naeem et al. 2020): how many real balls contain each generated sample, over k,
  averaged (about 1 when the two distributions match; unbounded above);
- coverage: the fraction of real samples whose ball holds at least one generated sample.

The k-th neighbour counts the sample itself as its first neighbour (radius = the (k+1)-th smallest
distance, as the reference code `prdc` does). Distances are Euclidean, computed block by block in
float64 so that memory stays at `block_size` rows times the other set's size.
"""
from __future__ import annotations

import numpy as np

DEFAULT_K = 5  # Naeem et al.'s recommendation (Kynkaanniemi et al. use 3).


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", x, x)


def _blocks(a: np.ndarray, b: np.ndarray, block_size: int):
    """Yields (start, squared distances [rows, len(b)]) of row blocks of `a` against `b`."""
    nb = _sq_norms(b)
    for i in range(0, len(a), block_size):
        rows = a[i:i + block_size]
        d = _sq_norms(rows)[:, None] + nb[None, :] - 2.0 * rows @ b.T
        yield i, np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int, block_size: int = 1024) -> np.ndarray:
    """Distance of each row of `x` to its k-th nearest other row (self counted first): [N]."""
    radii = np.empty(len(x))
    for i, d in _blocks(x, x, block_size):
        radii[i:i + len(d)] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return radii


def _inside_counts(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block_size: int):
    """(number of balls (centres, radii) holding each point [P], whether each ball holds a point [C])."""
    counts = np.zeros(len(points), np.int64)
    hit = np.zeros(len(centres), bool)
    sq_radii = radii ** 2
    for i, d in _blocks(points, centres, block_size):
        inside = d <= sq_radii[None, :]
        counts[i:i + len(d)] = inside.sum(axis=1)
        hit |= inside.any(axis=0)
    return counts, hit


def prdc(real, fake, k: int = DEFAULT_K, block_size: int = 1024) -> dict[str, float]:
    """{"precision", "recall", "density", "coverage"} of `fake` [M, D] against `real` [N, D]."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features must be [N, D] of the same D, got {list(real.shape)} "
                         f"and {list(fake.shape)}")
    k = int(k)
    if k < 1 or min(len(real), len(fake)) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than k real and fake samples "
                         f"(got {len(real)} real, {len(fake)} fake)")
    real_radii = knn_radii(real, k, block_size)
    fake_radii = knn_radii(fake, k, block_size)
    fake_in_real, real_ball_hit = _inside_counts(fake, real, real_radii, block_size)
    real_in_fake, _ = _inside_counts(real, fake, fake_radii, block_size)
    return {"precision": float(np.mean(fake_in_real > 0)),
            "recall": float(np.mean(real_in_fake > 0)),
            "density": float(fake_in_real.sum() / (k * len(fake))),
            "coverage": float(np.mean(real_ball_hit))}
