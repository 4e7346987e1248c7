"""Frechet distance between feature distributions (FID on InceptionV3 pool3, FD-CLIP on CLIP image
embeddings), from streaming float64 statistics, and reference statistics stored as `.npz`.

    stats = frechet.Statistics(extractor.identity)
    for images in batches:
        stats.update(extractor.images(images))
    fid = frechet.distance(stats, frechet.load_reference("coco_val.npz")["inception"])

Each set of features is summarised by its mean and covariance, accumulated batch by batch in
float64 with Chan et al.'s pairwise update (each batch's centred scatter merged with the running
one), which avoids the cancellation of `sum(x x^T) - n mu mu^T` when the mean is large next to the
spread. The covariance is the unbiased one (divided by n - 1), as `np.cov` in pytorch-fid.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

tr((S1 S2)^(1/2)) is computed without a general (non-symmetric) matrix square root: S1 S2 is
similar to S1^(1/2) S2 S1^(1/2) = A A^T with A = S1^(1/2) S2^(1/2), so the eigenvalues of its
square root are the singular values of A and the trace is A's nuclear norm. Both square roots
come from symmetric eigen-decompositions (negative round-off eigenvalues clipped to 0), and the
SVD is backward stable, so there is no imaginary part to discard and no eps added to the
diagonals, which scipy's `sqrtm` route (pytorch-fid) needs for singular covariances (fewer samples
than dimensions). While a set has at most D samples they are kept, and the same trace is the
nuclear norm of a much smaller product of their factors (`distance`). Numpy only.

A statistics `.npz` holds, per feature network (`inception`, `clip`): `<kind>.mean`,
`<kind>.covariance`, `<kind>.count`, `<kind>.extractor` (JSON: the network's name and the SHA-256
of its weights), optionally `<kind>.features` (a random subset of the features, for
precision/recall) and, for sets of at most D samples, `<kind>.rows` (the samples, float64). Statistics of two different networks are never compared: `distance` raises
`MixedStatisticsError` naming both.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

KINDS = ("inception", "clip")


class MixedStatisticsError(ValueError):
    """Two sets of statistics come from different feature networks (or weights)."""


class Statistics:
    """Streaming mean and covariance (float64) of D-dimensional features.

    While there are at most D samples (a covariance of rank < D), the samples themselves are kept
    too: the distance then works on the low-rank factor (n x D) instead of D x D matrices, which
    is both exact where the covariance is singular and far cheaper (`distance`).
    """

    def __init__(self, extractor: Mapping[str, str] | None = None, dim: int | None = None):
        self.extractor = dict(extractor or {})
        self.count = 0
        self.dim = dim
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of (x - mean)(x - mean)^T
        self._rows: list[np.ndarray] | None = []  # the samples, while count <= dim
        self._sqrt: np.ndarray | None = None  # cached covariance square root

    def update(self, features) -> "Statistics":
        """Adds a batch of features [N, D] (N may be 0)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {list(x.shape)}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions, these statistics {self.dim}")
        if len(x) == 0:
            return self
        mean = x.mean(axis=0)
        centred = x - mean
        return self._merge(len(x), mean, centred.T @ centred, [x])

    def merge(self, other: "Statistics") -> "Statistics":
        """Adds another set's statistics (same feature network) to these."""
        check_same_extractor(self.extractor, other.extractor)
        if other.count:
            self._merge(other.count, other._mean, other._scatter, other._rows)
        return self

    def _merge(self, n: int, mean: np.ndarray, scatter: np.ndarray, rows) -> "Statistics":
        self._sqrt = None
        if self.count == 0:
            self.count, self.dim = int(n), int(mean.shape[0])
            self._mean, self._scatter = mean.copy(), scatter.copy()
            self._rows = list(rows) if rows is not None and n <= self.dim else None
            return self
        if mean.shape[0] != self.dim:
            raise ValueError(f"features have {mean.shape[0]} dimensions, these statistics {self.dim}")
        total = self.count + n
        delta = mean - self._mean
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self._mean = self._mean + delta * (n / total)
        self.count = total
        keep = self._rows is not None and rows is not None and total <= self.dim
        self._rows = self._rows + list(rows) if keep else None
        return self

    @property
    def mean(self) -> np.ndarray:
        self._require(1)
        return self._mean

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased covariance [D, D] (needs at least 2 samples)."""
        self._require(2)
        return self._scatter / (self.count - 1)

    @property
    def rows(self) -> np.ndarray | None:
        """The samples [n, D] while n <= D, else None."""
        return np.concatenate(self._rows) if self._rows else None

    def factor(self) -> np.ndarray | None:
        """F [n, D] with covariance = F^T F (the centred samples / sqrt(n - 1)), while n <= D."""
        self._require(2)
        rows = self.rows
        return None if rows is None else (rows - self._mean) / np.sqrt(self.count - 1)

    def sqrt_covariance(self) -> np.ndarray:
        """The symmetric PSD square root of the covariance (cached)."""
        if self._sqrt is None:
            self._sqrt = _psd_sqrt(self.covariance)
        return self._sqrt

    def _require(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"statistics of {self.count} samples: at least {n} needed")

    @classmethod
    def from_moments(cls, mean, covariance, count: int, extractor: Mapping[str, str] | None = None,
                     rows: np.ndarray | None = None):
        """Statistics from a stored mean, covariance and count (and the samples, when n <= D)."""
        out = cls(extractor)
        mean = np.asarray(mean, np.float64)
        rows = None if rows is None else [np.asarray(rows, np.float64)]
        return out._merge(int(count), mean, np.asarray(covariance, np.float64) * (int(count) - 1), rows)


def check_same_extractor(a: Mapping[str, str], b: Mapping[str, str]) -> None:
    """Raises MixedStatisticsError unless both come from the same network with the same weights
    (an empty identity, from tests or hand-made statistics, matches only another empty one)."""
    if dict(a) != dict(b):
        raise MixedStatisticsError(
            f"cannot compare statistics of different feature networks: {_describe(a)} vs "
            f"{_describe(b)}; compute the reference statistics again with the same network and weights")


def _describe(identity: Mapping[str, str]) -> str:
    if not identity:
        return "an unnamed network"
    digest = str(identity.get("weights_sha256", ""))[:12]
    return f"{identity.get('name', '?')} (weights sha256 {digest}...)"


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix (negative eigenvalues clipped to 0)."""
    s = 0.5 * (s + s.T)
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance (squared 2-Wasserstein) between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: means {list(mu1.shape)} and {list(mu2.shape)}, "
                         f"covariances {list(s1.shape)} and {list(s2.shape)}")
    trace_sqrt = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt, 0.0))


def distance(a: Statistics, b: Statistics) -> float:
    """The Frechet distance between two sets' statistics (of the same feature network).

    With a low-rank factor F (covariance F^T F, kept while n <= D), tr((S1 S2)^(1/2)) is the
    nuclear norm of F1 F2^T [n1, n2] (both low rank) or of F1 S2^(1/2) [n1, D] (one): the same
    quantity as `frechet_distance`'s, through far smaller decompositions.
    """
    check_same_extractor(a.extractor, b.extractor)
    if a.dim != b.dim:
        raise ValueError(f"statistics of {a.dim}- and {b.dim}-dimensional features")
    fa, fb = a.factor(), b.factor()
    if fa is not None and fb is not None:
        product = fa @ fb.T
    elif fa is not None or fb is not None:
        f, other = (fa, b) if fa is not None else (fb, a)
        product = f @ other.sqrt_covariance()
    else:
        product = a.sqrt_covariance() @ b.sqrt_covariance()
    trace_sqrt = np.linalg.svd(product, compute_uv=False).sum()
    trace = lambda f, s: float(np.sum(f * f)) if f is not None else float(np.trace(s.covariance))  # noqa: E731
    diff = a.mean - b.mean
    return float(max(diff @ diff + trace(fa, a) + trace(fb, b) - 2.0 * trace_sqrt, 0.0))


# ---------------------------------------------------------------------------------------------
# Reference statistics files.
# ---------------------------------------------------------------------------------------------
def save_reference(path: str, stats: Mapping[str, Statistics],
                   features: Mapping[str, np.ndarray] | None = None, **info: Any) -> None:
    """Writes {kind: Statistics} (and optional {kind: feature subset [M, D]}) as an `.npz`
    (atomically: a temporary file, then renamed). `info` (JSON-able) is stored as `info`."""
    arrays: dict[str, np.ndarray] = {"info": np.array(json.dumps(info, sort_keys=True))}
    for kind, s in stats.items():
        arrays[f"{kind}.mean"] = s.mean
        arrays[f"{kind}.covariance"] = s.covariance
        arrays[f"{kind}.count"] = np.array(s.count, np.int64)
        arrays[f"{kind}.extractor"] = np.array(json.dumps(s.extractor, sort_keys=True))
        if s.rows is not None:
            arrays[f"{kind}.rows"] = s.rows
    for kind, f in (features or {}).items():
        arrays[f"{kind}.features"] = np.asarray(f, np.float32)
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_reference(path: str) -> dict[str, Any]:
    """{kind: Statistics, "<kind>.features": [M, D] where stored, "info": dict} of an `.npz` written
    by `save_reference`; one clear error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} do not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"reference statistics {path} are not an .npz file: {e}") from e
    with data:
        kinds = sorted({k.split(".")[0] for k in data.files if k.endswith(".mean")})
        needed = {f"{k}.{f}" for k in kinds for f in ("mean", "covariance", "count", "extractor")}
        if not kinds or not needed <= set(data.files):
            raise ValueError(f"{path} holds no reference statistics written by this project "
                             f"(keys {sorted(data.files)}); expected <kind>.mean, .covariance, "
                             ".count and .extractor")
        out: dict[str, Any] = {"info": json.loads(str(data["info"])) if "info" in data.files else {}}
        for k in kinds:
            out[k] = Statistics.from_moments(data[f"{k}.mean"], data[f"{k}.covariance"],
                                             int(data[f"{k}.count"]), json.loads(str(data[f"{k}.extractor"])),
                                             data[f"{k}.rows"] if f"{k}.rows" in data.files else None)
            if f"{k}.features" in data.files:
                out[f"{k}.features"] = np.asarray(data[f"{k}.features"], np.float32)
    return out
