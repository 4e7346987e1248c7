"""Training the autoregressive prior (`stages/ar_prior.py`) on the CLIP embedding cache.

The PCA codebook is fitted on the cache's training split when a run starts (`<workdir>/ar_codes.npz`,
`data/pca_codes.py`) and reused when it resumes; a codebook fitted on another CLIP's cache is
refused. Data and evaluation are the diffusion prior's (`tasks/prior.py`): the same records, the
same cosine and retrieval metrics next to the same baselines, so the two priors compare row for
row; evaluation also reports the codebook's own ceiling (the true z_i's codes decoded).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from unclip_jax import paths
from unclip_jax.data import embed
from unclip_jax.data import embedding_cache
from unclip_jax.data import pca_codes
from unclip_jax.stages.ar_prior import CODEBOOK_FILENAME, ARPriorStage
from unclip_jax.tasks.base import Task
from unclip_jax.tasks.prior import PriorTask


def fit_or_load_codebook(config: ml_collections.ConfigDict, cache_dir: str, workdir: str) -> str:
    """The path of `workdir`'s codebook, fitted on the cache's training split if it has none yet
    (process 0 writes it); an existing one must match the cache and the config."""
    path = os.path.join(paths.resolve(workdir), CODEBOOK_FILENAME)
    source = pca_codes.cache_identity(embedding_cache.read_metadata(cache_dir, "train"))
    k, b = int(config.codes.num_components), int(config.codes.num_buckets)
    if os.path.exists(path):
        pca_codes.check_matches(pca_codes.load(path), source=source, num_components=k, num_buckets=b,
                                path=path)
        return path
    train = embedding_cache.CacheSource(cache_dir, "train")
    codebook = pca_codes.fit(pca_codes.cache_chunks(train, int(config.codes.fit_examples)),
                             num_components=k, num_buckets=b, source=source)
    logging.info("PCA codebook: %d of %d components hold %.4f of the variance", k,
                 codebook.embed_dim, codebook.explained)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pca_codes.save(codebook, path)
    return path


class ARPriorTask(PriorTask):
    """Trains the AR prior; evaluates sampled z_i as `PriorTask` does.

    `sizes` (embed_dim, text_length, text_width, eot_token_id; optionally codebook_path) builds it
    without a CLIP or cache behind it (compiles, parameter counts); such a task cannot train.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, sizes: Mapping[str, Any] | None = None):
        Task.__init__(self, config, workdir)
        self.cache_dir = None
        if sizes is None:
            clip = embed.cached_clip(config)
            self.cache_dir = clip.cache_dir
            sizes = {"embed_dim": clip.embed_dim, "text_length": clip.text_length,
                     "text_width": clip.text_width, "eot_token_id": clip.eot_token_id,
                     "codebook_path": fit_or_load_codebook(config, clip.cache_dir, workdir)}
        self.stage = ARPriorStage(config, **sizes)

    def describe(self) -> dict[str, Any]:
        """`PriorTask.describe` with the codebook as a path the stage depends on, not a size: the
        record stores it relative to the workdir (`stages.load.write_record`), so a moved or copied
        workdir still finds its own `ar_codes.npz`."""
        described = super().describe()
        sizes = dict(described["sizes"])
        codebook = sizes.pop("codebook_path", "")
        if codebook:
            described["depends_on"]["codebook"] = codebook
        return {"sizes": sizes, "depends_on": described["depends_on"]}

    def sample_z_i(self, params, mesh: Mesh, records: Mapping[str, np.ndarray], rng: jax.Array, *,
                   guidance_scale: float | None = None, best_of: int | None = None) -> np.ndarray:
        """Samples unit z_i [N, D] for cached captions with the config's `ar` settings."""
        return self.stage.sample(params, mesh, records["z_t"], records["text_hidden"], records["tokens"],
                                 rng, batch_size=self.config.eval.batch_size,
                                 guidance_scale=guidance_scale, best_of=best_of)

    def evaluate(self, params, mesh: Mesh) -> dict[str, float]:
        """`PriorTask.evaluate`, plus the codebook's ceiling: the cosine and retrieval of the true
        z_i's own codes, decoded (`cosine_codes`, `retrieval_top1_codes`)."""
        results = super().evaluate(params, mesh)
        for split in self.config.eval.splits:
            try:
                data = self._load_split(split, int(self.config.eval.num_examples))
            except embedding_cache.CacheNotFoundError:
                continue
            rebuilt = pca_codes.reconstruct(self.stage.codebook, data["z_i"])
            results[f"eval/{split}/cosine_codes"] = float(np.mean(np.sum(rebuilt * data["z_i"], -1)))
            results[f"eval/{split}/retrieval_top1_codes"] = self.retrieval(rebuilt, data["z_i"], data["caption"])
        return results
