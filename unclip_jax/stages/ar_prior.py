"""The unCLIP autoregressive prior: caption -> the codes of z_i's principal components -> z_i.

The paper's alternative to the diffusion prior (§2.2; the diffusion prior won every comparison,
§5.1). z_i is represented by the quantised first K principal components of the CLIP image
embeddings (`data/pca_codes.py`, fitted on the training cache when training starts and stored in
the workdir), and a causal transformer (`models/ar_prior.py`) predicts them one at a time after
the caption, z_t and a token for the quantised dot product z_i . z_t.

Training: cross-entropy of the dot token and the K codes given everything before them (teacher
forcing); the caption and z_t are replaced by learned nulls 10% of the time for classifier-free
guidance (`ar.text_drop_prob`).

Sampling (`sample_body`): one compiled loop over the K + 1 tokens (`jax.lax.fori_loop`), each step
running one new token against a static-size KV cache. Each token is drawn from the logits
  - guided: uncond + s (cond - uncond) on the log-probabilities (a scale of 1 runs the
    conditional model alone),
  - divided by `temperature` (0: the argmax), then limited to the `top_k` most likely tokens and
    the smallest set holding `top_p` of the mass (0 / 1: off);
and the dot token is drawn only from the part of its distribution above its `dot_percentile`
(the paper: the top half, 0.5, best of 50/70/85/95%): buckets are quantiles of z_i . z_t, so
their index orders their value, and the tokens kept are those whose cumulative probability
below them is at least the percentile (the bucket holding the percentile included). The codes
are decoded through the inverse PCA and normalised: `sample(params, z_t, text_hidden, tokens,
rng) -> unit z_i [B, D]`, the diffusion prior's interface (`stages.prior.PriorStage.sample_body`).

The codebook lives in `<workdir>/ar_codes.npz`; the stage takes its path (`codebook_path`) and
reads it on first use, so a stage built from sizes alone needs no file. The workdir's `stage.json`
records it as a path the stage depends on, relative to the workdir (`stages/load.py`), so a moved
workdir keeps its codebook. Its shapes (K, B) come from the config (`codes`); compiles and FLOP
counts, which depend on the shapes alone, use `placeholder_codebook`.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.data import pca_codes
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models.layers import text_mask

CODEBOOK_FILENAME = "ar_codes.npz"


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [..., V] with all but the `top_k` largest (0: all) and all outside the smallest set
    holding `top_p` of the probability (1: all) set to -inf. The most likely token always stays."""
    neg = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the more likely tokens.
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def restrict_to_percentile(logits: jax.Array, percentile: float) -> jax.Array:
    """logits [..., V] of ORDERED buckets with the part of the distribution below its
    `percentile` removed (-inf): bucket j stays where cdf(j) = P(token <= j) > percentile, i.e. the
    bucket holding the percentile and every bucket above it. 0 keeps every bucket."""
    if percentile <= 0:
        return logits
    cdf = jnp.cumsum(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    keep = cdf > percentile
    keep = keep | (jnp.arange(logits.shape[-1]) == logits.shape[-1] - 1)  # Never empty.
    return jnp.where(keep, logits, jnp.finfo(logits.dtype).min)


def draw(logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """A token [B] from logits [B, V]: the argmax at temperature 0, else a categorical draw."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def placeholder_codebook(num_components: int, num_buckets: int, embed_dim: int) -> pca_codes.Codebook:
    """A codebook of the given shapes with made-up values (the first K coordinate axes, evenly
    spaced buckets): what ahead-of-time compiles and FLOP counts need, where only the shapes
    matter. Never for training or sampling."""
    k, b, d = int(num_components), int(num_buckets), int(embed_dim)
    edges = np.linspace(-1.0, 1.0, b + 1)[1:-1]
    centres = np.linspace(-1.0, 1.0, b)
    return pca_codes.Codebook(
        mean=np.zeros(d), components=np.eye(k, d), eigenvalues=np.ones(k),
        edges=np.tile(edges, (k, 1)), centres=np.tile(centres, (k, 1)), dot_edges=edges,
        dot_centres=centres, source={"placeholder": True}, explained=float("nan"))


class ARPriorStage:
    """The AR prior of a stage config (`model`, `codes`, `ar`) over a CLIP of the given sizes.

    Sizes: embed_dim, text_length, text_width, eot_token_id as `PriorStage`, and codebook_path
    (the fitted `pca_codes.Codebook`, read on first use; "" = none yet: `set_codebook`).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, embed_dim: int, text_length: int,
                 text_width: int, eot_token_id: int, codebook_path: str = ""):
        self.config = config
        self.sizes = {"embed_dim": int(embed_dim), "text_length": int(text_length),
                      "text_width": int(text_width), "eot_token_id": int(eot_token_id),
                      "codebook_path": str(codebook_path)}
        self.embed_dim, self.text_length, self.text_width = int(embed_dim), int(text_length), int(text_width)
        self.eot_token_id = int(eot_token_id)
        self.num_components = int(config.codes.num_components)
        self.num_buckets = int(config.codes.num_buckets)
        self.model = ar_lib.ar_prior_from_config(
            config.model, embed_dim=self.embed_dim, text_width=self.text_width,
            text_length=self.text_length, num_components=self.num_components,
            num_buckets=self.num_buckets)
        self._codebook: pca_codes.Codebook | None = None
        self._jitted = parallel.JitCache()

    # ------------------------------------------------------------------ the codebook
    @property
    def codebook(self) -> pca_codes.Codebook:
        """The PCA + quantiser (read from `codebook_path` on first use)."""
        if self._codebook is None:
            if not self.sizes["codebook_path"]:
                raise ValueError("this AR prior has no codebook: build it with codebook_path or "
                                 "call set_codebook")
            self.set_codebook(pca_codes.load(self.sizes["codebook_path"]))
        return self._codebook

    def set_codebook(self, codebook: pca_codes.Codebook) -> None:
        """Uses `codebook`, which must have the config's K components, B buckets and embed_dim."""
        got = (codebook.num_components, codebook.num_buckets, codebook.embed_dim)
        want = (self.num_components, self.num_buckets, self.embed_dim)
        if got != want:
            raise pca_codes.CodebookMismatchError(
                f"codebook has (num_components, num_buckets, embed_dim) = {got}; the config and the "
                f"CLIP give {want}")
        self._codebook = codebook
        self._jitted = parallel.JitCache()

    def _arrays(self):
        return {k: jnp.asarray(v) for k, v in self.codebook.arrays().items()}

    def targets(self, z_i: jax.Array, z_t: jax.Array) -> jax.Array:
        """The token sequence int32 [B, 1 + K]: the dot token of z_i . z_t, then z_i's codes."""
        arrays = self._arrays()
        dot = pca_codes.encode_dot(arrays, z_i, z_t, xp=jnp)
        return jnp.concatenate([dot[:, None], pca_codes.encode(arrays, z_i, xp=jnp)], axis=1)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Unit z_i [B, D] of codes [B, K] (bucket values, inverse PCA, normalised)."""
        z = pca_codes.decode(self._arrays(), codes, xp=jnp)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        """The model's params (boxed with logical axis names). Runs under eval_shape and jit."""
        b, d, length, w = 1, self.embed_dim, self.text_length, self.text_width
        return self.model.init(rng, jnp.zeros((b, d)), jnp.zeros((b, length, w)), jnp.ones((b, length), bool),
                               jnp.zeros((b, 1 + self.num_components), jnp.int32))["params"]

    def loss(self, params, batch: Mapping[str, jax.Array], rng: jax.Array):
        """Mean cross-entropy of the dot token and the K codes of a batch of `z_i`, `z_t`,
        `text_hidden`, `tokens`; metrics: the codes' accuracy and the dot token's loss."""
        tokens = self.targets(batch["z_i"], batch["z_t"])
        b = tokens.shape[0]
        drop = jax.random.bernoulli(rng, self.config.ar.text_drop_prob, (b,))
        logits = self.model.apply({"params": params}, batch["z_t"], batch["text_hidden"].astype(jnp.float32),
                                  text_mask(batch["tokens"], self.eot_token_id), tokens, drop)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]  # [B, 1 + K]
        accuracy = jnp.mean(jnp.argmax(logits[:, 1:], -1) == tokens[:, 1:])
        return jnp.mean(nll), {"code_accuracy": accuracy, "dot_token_nll": jnp.mean(nll[:, 0])}

    # ------------------------------------------------------------------ sampling
    def sample_body(self, *, guidance_scale: float, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, dot_percentile: float = 0.5, return_tokens: bool = False,
                    always_guide: bool = False):
        """The un-jitted sampler `(params, z_t [B, D], text_hidden [B, L, W], tokens [B, L], rng)
        -> unit z_i [B, D]` (the diffusion prior's signature; tokens are the caption's CLIP tokens,
        which give its mask). `return_tokens`: return the sampled [dot, codes] int32 [B, 1 + K]
        too. `always_guide` runs the unconditional half even at scale 1 (for tests)."""
        model, k = self.model, self.num_components
        guide = always_guide or guidance_scale != 1
        settings = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        decode_codes = self.decode_codes

        def sample(params, z_t, text_hidden, tokens, rng):
            b = z_t.shape[0]
            apply = lambda method, *args: model.apply({"params": params}, *args, method=method)  # noqa: E731
            hidden, mask = text_hidden.astype(jnp.float32), text_mask(tokens, self.eot_token_id)
            z_t32 = z_t.astype(jnp.float32)
            if guide:
                two = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
                drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
                cache = apply(model.encode_prefix, two(z_t32), two(hidden), two(mask), drop)
            else:
                cache = apply(model.encode_prefix, z_t32, hidden, mask)

            def combine(logits):  # [B or 2B, V] -> the guided [B, V].
                if not guide:
                    return logits
                logp = jax.nn.log_softmax(logits, axis=-1)
                cond, uncond = logp[:b], logp[b:]
                return uncond + guidance_scale * (cond - uncond)

            rngs = jax.random.split(rng, k + 1)
            dot_logits = restrict_to_percentile(combine(cache["logits"]), dot_percentile)
            out = jnp.zeros((b, k + 1), jnp.int32).at[:, 0].set(draw(dot_logits, rngs[0], **settings))

            def step(i, carry):
                out, cache = carry
                token = out[:, i]
                token = jnp.concatenate([token, token]) if guide else token
                logits, cache = apply(model.decode_step, cache, token, i)
                nxt = draw(combine(logits), rngs[i + 1], **settings)
                return out.at[:, i + 1].set(nxt), cache

            out, _ = jax.lax.fori_loop(0, k, step, (out, {"kv": cache["kv"], "mask": cache["mask"]}))
            z_i = decode_codes(out[:, 1:])
            return (z_i, out) if return_tokens else z_i

        return sample

    def settings(self, **overrides):
        """The config's sampling settings (`ar`), with the non-None `overrides`."""
        ar = self.config.ar
        out = {"guidance_scale": float(ar.guidance_scale), "temperature": float(ar.temperature),
               "top_k": int(ar.top_k), "top_p": float(ar.top_p), "dot_percentile": float(ar.dot_percentile)}
        out.update({k: v for k, v in overrides.items() if v is not None})
        return out

    def sample(self, params, mesh: Mesh, z_t: np.ndarray, text_hidden: np.ndarray, tokens: np.ndarray,
               rng: jax.Array, *, batch_size: int = 64, guidance_scale: float | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               dot_percentile: float | None = None, best_of: int | None = None) -> np.ndarray:
        """Unit z_i [N, D] for captions (z_t [N, D], text_hidden [N, L, W], tokens [N, L]), batched
        over the mesh; unset settings take the config's (`ar`). `best_of` is accepted for the
        diffusion prior's interface and must be None or 1 (the AR prior draws one sample)."""
        if best_of not in (None, 1):
            raise ValueError(f"best_of={best_of}: the AR prior draws one z_i per caption (use 1)")
        s = self.settings(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                          top_p=top_p, dot_percentile=dot_percentile)
        fn = self._jitted(mesh, ("sample", *sorted(s.items())), lambda: self.sample_body(**s))
        return parallel.map_batches(lambda i, *chunk: fn(params, *chunk, jax.random.fold_in(rng, i)),
                                    [z_t, text_hidden, tokens], mesh, batch_size)
