"""The AR prior's reconstruction curve: principal components kept vs how much of z_i survives.

  python benchmarks/ar_prior_pca.py --cache_dir runs/shapes_clip/cache [--num_buckets 256]
      [--output_dir docs]

Fits the PCA + quantile codebook (`unclip_jax/data/pca_codes.py`) on the cache's training split
with every component, then for each number of components kept reports, on the validation split,
the mean cosine of z_i with its reconstruction (unquantised, and quantised into `num_buckets`
buckets per component) and the top-1 retrieval of the true image among 32 (the reconstruction
picks it among 31 images of other captions, as the priors' evaluation). Writes
`ar_prior_pca.json` and `ar_prior_pca.png` to `output_dir` and prints the JSON.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from unclip_jax.data import embedding_cache, pca_codes  # noqa: E402
from unclip_jax.evaluation import retrieval  # noqa: E402

flags.DEFINE_string("cache_dir", None, "A CLIP embedding cache (embed.py).", required=True)
flags.DEFINE_integer("num_buckets", 256, "Quantile buckets per component.")
flags.DEFINE_integer("fit_examples", 0, "Training embeddings to fit on (0: all).")
flags.DEFINE_integer("eval_examples", 1000, "Validation embeddings of the curve.")
flags.DEFINE_integer("num_candidates", 32, "Images each reconstruction picks among.")
flags.DEFINE_string("split", "validation", "Split of the curve.")
flags.DEFINE_string("output_dir", ".", "Where the JSON and PNG go.")
FLAGS = flags.FLAGS


def main(_):
    train = embedding_cache.CacheSource(FLAGS.cache_dir, "train")
    dim = int(train.metadata["embed_dim"])
    codebook = pca_codes.fit(pca_codes.cache_chunks(train, FLAGS.fit_examples), num_components=dim,
                             num_buckets=FLAGS.num_buckets)
    split = embedding_cache.CacheSource(FLAGS.cache_dir, FLAGS.split)
    records = [split[i] for i in range(min(FLAGS.eval_examples, len(split)))]
    z_i = np.stack([r["z_i"] for r in records])
    captions = np.array([r["caption"] for r in records])
    allowed = captions[None, :] != captions[:, None]
    kept = sorted({k for k in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 319, 512, 1024)
                   if k <= dim} | {dim})
    rows = []
    for k in kept:
        row = {"components": k,
               "explained_variance": float(codebook.eigenvalues[:k].sum() / codebook.eigenvalues.sum())}
        for name, quantised in (("", False), ("_quantised", True)):
            rebuilt = pca_codes.reconstruct(codebook, z_i, k, quantised=quantised)
            row[f"cosine{name}"] = float(np.mean(np.sum(rebuilt * z_i, -1)))
            row[f"retrieval_top1{name}"] = retrieval.top1_among_distractors(
                rebuilt @ z_i.T, np.arange(len(z_i)), FLAGS.num_candidates, allowed=allowed)
        rows.append(row)
    out = {"cache_dir": FLAGS.cache_dir, "split": FLAGS.split, "examples": len(z_i),
           "embed_dim": dim, "num_buckets": FLAGS.num_buckets, "num_candidates": FLAGS.num_candidates,
           "curve": rows}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "ar_prior_pca.json"), "w") as f:
        json.dump(out, f, indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ks = [r["components"] for r in rows]
    for ax, metric, label in ((axes[0], "cosine", "mean cosine(z_i, reconstruction)"),
                              (axes[1], "retrieval_top1", f"retrieval top-1 among {FLAGS.num_candidates}")):
        ax.plot(ks, [r[metric] for r in rows], "o-", label="PCA")
        ax.plot(ks, [r[f"{metric}_quantised"] for r in rows], "s--",
                label=f"PCA + {FLAGS.num_buckets} quantile buckets")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("principal components kept")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"z_i reconstruction ({FLAGS.split}, D={dim})")
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.output_dir, "ar_prior_pca.png"), dpi=100)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
