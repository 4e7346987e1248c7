"""CLIP: the image and text towers, their preprocessing, the contrastive loss and embedding."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.data import images as image_lib
from unclip_jax.data import input_pipeline
from unclip_jax.models import clip as clip_lib
from unclip_jax.models.layers import text_mask


def normalize(images: jax.Array, mean=input_pipeline.CLIP_MEAN, std=input_pipeline.CLIP_STD) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 normalised with `mean` and `std` (per channel, for pixels in
    [0, 1]; default OpenAI CLIP's), done on device."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def contrastive_loss(z_i: jax.Array, z_t: jax.Array, logit_scale: jax.Array) -> tuple[jax.Array, dict]:
    """Symmetric cross-entropy over the [B, B] similarity matrix of unit embeddings.

    Under `jit` with a sharded batch, B is the *global* batch: XLA gathers the embeddings, so every
    image is contrasted with every caption of every device.
    """
    logits = logit_scale * z_i @ z_t.T
    labels = jnp.arange(logits.shape[0])
    loss_i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss_t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    metrics = {
        "image_to_text_acc": (jnp.argmax(logits, axis=1) == labels).mean(),
        "text_to_image_acc": (jnp.argmax(logits, axis=0) == labels).mean(),
        "logit_scale": logit_scale,
    }
    return 0.5 * (loss_i + loss_t), metrics


class ClipStage:
    """The CLIP of a stage config (`model`, `preprocess`) with a tokenizer of the given sizes.

    Sizes: vocab_size, eot_token_id, context_length and eot_pooling ("eot_id": pool the text
    tower at the end-of-text token; "argmax": at the highest id, as OpenAI's checkpoints). The
    tokenizer itself (captions -> tokens) is attached when there is one (`tokenizer`).
    """

    def __init__(self, config: ml_collections.ConfigDict, *, vocab_size: int, eot_token_id: int,
                 context_length: int, eot_pooling: str, tokenizer=None):
        self.config = config
        self.sizes = {"vocab_size": int(vocab_size), "eot_token_id": int(eot_token_id),
                      "context_length": int(context_length), "eot_pooling": str(eot_pooling)}
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        # The embedding table is padded to a multiple of 128 rows so that it shards over any
        # tensor-parallel size (ids past the tokenizer's vocabulary are never looked up).
        self.model = clip_lib.clip_model_from_config(
            config.model, vocab_size=-(-int(vocab_size) // 128) * 128, eot_token_id=int(eot_token_id),
            eot_pooling=str(eot_pooling), context_length=self.context_length)
        self.side = int(config.model.image_size)
        # Imported CLIPs carry their own preprocessing (resize, crop, mean/std); ours resizes the
        # shorter side to `side` and uses OpenAI's constants.
        self.preprocess = config.get("preprocess")
        if self.preprocess is not None and int(self.preprocess.crop_size) != self.side:
            raise ValueError(f"config.preprocess.crop_size={self.preprocess.crop_size} must equal "
                             f"config.model.image_size={self.side}")
        p = self.preprocess
        self.mean = np.asarray(p.mean if p else input_pipeline.CLIP_MEAN, np.float32)
        self.std = np.asarray(p.std if p else input_pipeline.CLIP_STD, np.float32)
        self._jitted = parallel.JitCache()

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        """The model's params (boxed with logical axis names). Runs under eval_shape and jit."""
        images = jnp.zeros((1, self.side, self.side, 3), jnp.float32)
        tokens = jnp.zeros((1, self.context_length), jnp.int32)
        if not self.model.has_vision:  # A text encoder alone (Karlo's).
            return self.model.init(rng, tokens, method=self.model.encode_text)["params"]
        return self.model.init(rng, images, tokens)["params"]

    def loss(self, params, batch: Mapping[str, jax.Array], rng: jax.Array):
        """The contrastive loss of a batch of uint8 `image` and caption `tokens`."""
        z_i, z_t, logit_scale = self.model.apply({"params": params}, self.normalize(batch["image"]),
                                                 batch["tokens"])
        return contrastive_loss(z_i, z_t, logit_scale)

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8 [B, S, S, 3] -> the model's float32 input (this CLIP's mean and std)."""
        return normalize(images, self.mean, self.std)

    def decode(self, example: Mapping[str, Any]) -> tuple[np.ndarray, str]:
        """A raw example -> (uint8 [side, side, 3] image, caption), resized and cropped for this CLIP."""
        if self.preprocess is None:
            return input_pipeline.decode_example(example, self.side)
        image, caption = input_pipeline.decode_example(example, None)
        p = self.preprocess
        image = image_lib.clip_preprocess(image, resize_size=int(p.resize_size),
                                          crop_size=int(p.crop_size), resample=str(p.resample))
        return image, caption

    def prepare_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> uint8 [N, side, side, 3] as this CLIP's data were prepared (its
        own resize and crop when imported, else a bicubic resize and centre crop); images already
        at `side` are kept as they are."""
        p = self.preprocess
        if images.shape[1:3] == (self.side, self.side):
            return images
        if p is not None:
            return np.stack([image_lib.clip_preprocess(x, resize_size=int(p.resize_size),
                                                       crop_size=int(p.crop_size), resample=str(p.resample))
                             for x in images])
        return np.stack([image_lib.resize_center_crop(x, self.side) for x in images])

    # ------------------------------------------------------------------ embedding
    def embed(self, params, mesh: Mesh, *, images: np.ndarray | None = None,
              tokens: np.ndarray | None = None, batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        """Unit CLIP embeddings [N, embed_dim] of uint8 images (at `side` px) or int32 tokens,
        batched over the mesh (`normalize=False`: the projections as they are)."""
        model = self.model
        if images is not None:
            kind, x = "image", images
            build = lambda: lambda p, x: model.apply({"params": p}, self.normalize(x), normalize,  # noqa: E731
                                                     method=model.encode_image)
        else:
            kind, x = "text", tokens
            build = lambda: lambda p, x: model.apply({"params": p}, x, normalize=normalize,  # noqa: E731
                                                     method=model.encode_text)
        fn = self._jitted(mesh, (kind, normalize), build)
        return parallel.map_batches(lambda _, chunk: fn(params, chunk), [x], mesh, batch_size)

    def encode_captions(self, params, mesh: Mesh, tokens: np.ndarray, *, batch_size: int = 64,
                        normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int32 caption tokens [N, L] -> (z_t float32 [N, D], unit unless `normalize=False`; the
        text tower's hidden states float32 [N, L, W] after its final LayerNorm; the attention mask
        bool [N, L], True up to and including the end-of-text token), batched over the mesh.
        What GLIDE-style and Karlo stages condition on besides the pooled embedding."""
        model, tokens = self.model, np.asarray(tokens, np.int32)

        def build():
            def encode(p, x):  # one output array, so that map_batches can gather it
                z_t, hidden = model.apply({"params": p}, x, return_hidden=True, normalize=normalize,
                                          method=model.encode_text)
                return jnp.concatenate([z_t.astype(jnp.float32),
                                        hidden.astype(jnp.float32).reshape(x.shape[0], -1)], axis=1)
            return encode

        fn = self._jitted(mesh, ("text_hidden", normalize), build)
        out = parallel.map_batches(lambda _, chunk: fn(params, chunk), [tokens], mesh, batch_size)
        d = int(model.embed_dim)
        mask = np.asarray(text_mask(tokens, self.sizes["eot_token_id"]), bool)
        return out[:, :d], out[:, d:].reshape(len(out), tokens.shape[1], -1), mask
