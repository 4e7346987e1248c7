"""Top-1 retrieval among distractors, as the CLIP and prior evaluations report it."""
from __future__ import annotations

import numpy as np


def top1_among_distractors(scores: np.ndarray, truth: np.ndarray, num_candidates: int,
                           allowed: np.ndarray | None = None, seed: int = 0) -> float:
    """The fraction of rows whose true column outscores `num_candidates - 1` distractor columns.

    scores: [N, M] similarities; truth: [N] the true column of each row; allowed: optional bool
    [N, M], the columns that may be drawn as row n's distractors (never its true column). The
    distractors are drawn without replacement with a fixed seed; a row with fewer possible
    distractors uses them all (none: it counts as correct).
    """
    scores, truth = np.asarray(scores), np.asarray(truth)
    rng = np.random.default_rng(seed)
    correct = 0
    for n, t in enumerate(truth):
        ok = np.ones(scores.shape[1], bool) if allowed is None else np.asarray(allowed[n], bool).copy()
        ok[t] = False
        others = np.flatnonzero(ok)
        picks = rng.choice(others, size=min(int(num_candidates) - 1, len(others)), replace=False)
        correct += scores[n, t] > scores[n, picks].max(initial=-np.inf)
    return float(correct / len(truth))
