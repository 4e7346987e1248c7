"""CLIP trained contrastively: symmetric InfoNCE over the global batch, zero-shot retrieval eval."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.data import images as image_lib
from unclip_jax.data import input_pipeline
from unclip_jax.data import shapes
from unclip_jax.data import tfds_builders
from unclip_jax.data import tokenizer as tokenizer_lib
from unclip_jax.evaluation import embedding_probe
from unclip_jax.models import clip as clip_lib
from unclip_jax.tasks.base import Task


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
    """Loads `config.tokenizer.dir`, or trains a BPE on the shapes captions into <workdir>/tokenizer."""
    tok_dir = config.tokenizer.dir
    if not tok_dir:
        tok_dir = os.path.join(workdir, "tokenizer")

        def train():
            if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
                return
            # Train into a temporary directory and rename, so a crash never leaves half a tokenizer.
            os.makedirs(workdir, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=workdir, prefix=".tokenizer-")
            tokenizer_lib.train_tokenizer(shapes.all_captions(), tmp, vocab_size=config.tokenizer.vocab_size)
            try:
                os.rename(tmp, tok_dir)
            except OSError:  # Another run got there first; its tokenizer is identical.
                pass

        parallel.process_zero_first(train, "train tokenizer")  # The others read process 0's.
    return tokenizer_lib.Tokenizer.from_dir(tok_dir, context_length=config.tokenizer.context_length)


def normalize(images: jax.Array, mean=input_pipeline.CLIP_MEAN, std=input_pipeline.CLIP_STD) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 normalised with `mean` and `std` (per channel, for pixels in
    [0, 1]; default OpenAI CLIP's), done on device."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


class PreprocessedSource:
    """A random-access source whose examples come out decoded and preprocessed by `fn`.

    `source[i]` -> `{"image": uint8 [S, S, 3], "caption": str}` with `(image, caption) =
    fn(raw_source[i])`; an unreadable example raises `ValueError` when it is read.
    """

    def __init__(self, source, fn):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i) -> dict[str, Any]:
        image, caption = self.fn(self.source[i])
        return {"image": image, "caption": caption}

    def __repr__(self) -> str:
        return f"PreprocessedSource({self.source!r})"


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


class ClipTask(Task):
    """Trains the CLIP towers; evaluates zero-shot caption retrieval on validation and heldout, and
    on shapes data linear / 1-NN probes of z_i's attributes (`evaluation/embedding_probe.py`)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        super().__init__(config, workdir)
        self.tokenizer = prepare_tokenizer(config, workdir)
        # An imported CLIP's config names its checkpoint's pooling; ours follows the tokenizer.
        self._build(vocab_size=self.tokenizer.vocab_size, eot_token_id=self.tokenizer.eot_token_id,
                    context_length=self.tokenizer.context_length,
                    eot_pooling=config.model.get("eot_pooling") or self.tokenizer.eot_pooling)

    @classmethod
    def from_dims(cls, config: ml_collections.ConfigDict, workdir: str, *, vocab_size: int,
                  eot_token_id: int, context_length: int) -> "ClipTask":
        """A task with given tokenizer sizes and no tokenizer behind it (compile-only; cannot train)."""
        task = cls.__new__(cls)
        Task.__init__(task, config, workdir)
        task.tokenizer = None
        task._build(vocab_size=vocab_size, eot_token_id=eot_token_id, context_length=context_length,
                    eot_pooling=config.model.get("eot_pooling") or "eot_id")
        return task

    def _build(self, *, vocab_size: int, eot_token_id: int, context_length: int, eot_pooling: str):
        config = self.config
        self.context_length = int(context_length)
        # The embedding table is padded to a multiple of 128 rows so that it shards over any
        # tensor-parallel size (ids past the tokenizer's vocabulary are never looked up).
        self.model = clip_lib.clip_model_from_config(
            config.model, vocab_size=-(-vocab_size // 128) * 128, eot_token_id=eot_token_id,
            eot_pooling=eot_pooling, context_length=self.context_length)
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
        self._encoders = {}  # Jitted image / text encoders for evaluation, built on first use.

    # ------------------------------------------------------------------ model and loss
    def init_params(self, rng):
        images = jnp.zeros((1, self.side, self.side, 3), jnp.float32)
        tokens = jnp.zeros((1, self.context_length), jnp.int32)
        return self.model.init(rng, images, tokens)["params"]

    def loss_fn(self, params, batch, rng, step):
        z_i, z_t, logit_scale = self.model.apply({"params": params}, self.normalize(batch["image"]),
                                                 batch["tokens"])
        return contrastive_loss(z_i, z_t, logit_scale)

    def normalize(self, images: jax.Array) -> jax.Array:
        """uint8 [B, S, S, 3] -> the model's float32 input (this CLIP's mean and std)."""
        return normalize(images, self.mean, self.std)

    # ------------------------------------------------------------------ data
    def decode(self, example: Mapping[str, Any]) -> tuple[np.ndarray, str]:
        """A raw example -> (uint8 [side, side, 3] image, caption), resized and cropped for this CLIP."""
        if self.preprocess is None:
            return input_pipeline.decode_example(example, self.side)
        image, caption = input_pipeline.decode_example(example, None)
        p = self.preprocess
        image = image_lib.clip_preprocess(image, resize_size=int(p.resize_size),
                                          crop_size=int(p.crop_size), resample=str(p.resample))
        return image, caption

    def preprocessed_source(self, source) -> PreprocessedSource:
        """`source` with examples already `decode`d (for readers that only resize to `side`)."""
        return PreprocessedSource(source, self.decode)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, s = int(batch_size), self.side
        return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
                "tokens": jax.ShapeDtypeStruct((b, self.context_length), jnp.int32)}

    def map_example(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        image, caption = self.decode(example)
        return {"image": image, "tokens": self.tokenizer([caption])[0]}

    def train_pipeline(self, *, local_batch_size, process_index, process_count):
        data = self.config.data
        return input_pipeline.make_pipeline(
            input_pipeline.make_source(data, "train"), self.map_example, local_batch_size=local_batch_size,
            shuffle_seed=data.shuffle_seed, process_index=process_index, process_count=process_count,
            num_threads=data.num_threads)

    # ------------------------------------------------------------------ evaluation
    def embed(self, params, mesh: Mesh, *, images: np.ndarray | None = None,
              tokens: np.ndarray | None = None) -> np.ndarray:
        """Unit CLIP embeddings [N, embed_dim] of uint8 images or int32 tokens, batched over the mesh."""
        kind, x = ("image", images) if images is not None else ("text", tokens)
        key = (kind, mesh)
        if key not in self._encoders:
            if kind == "image":
                fn = lambda p, x: self.model.apply({"params": p}, self.normalize(x), method=self.model.encode_image)  # noqa: E731
            else:
                fn = lambda p, x: self.model.apply({"params": p}, x, method=self.model.encode_text)  # noqa: E731
            self._encoders[key] = jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))
        encoder = self._encoders[key]
        return parallel.map_batches(lambda _, chunk: encoder(params, chunk), [x], mesh,
                                    self.config.eval.batch_size)

    def evaluate(self, params, mesh: Mesh) -> dict[str, float]:
        results = {}
        probe_train = {}  # The probe's training z_i and captions, embedded on first use.
        for split in self.config.eval.splits:
            try:
                source = input_pipeline.make_source(self.config.data, split)
            except tfds_builders.MissingSplitError:
                logging.info("No %r split: skipping its evaluation.", split)
                continue
            z_i, captions = self.embed_examples(params, mesh, source, int(self.config.eval.num_examples))
            results.update(self.retrieval(params, mesh, z_i, captions, split))
            results.update(self.probe(params, mesh, z_i, captions, split, probe_train))
        return results

    def probe(self, params, mesh: Mesh, z_i: np.ndarray, captions: list[str], split: str,
              train: dict) -> dict[str, float]:
        """Linear and 1-NN probes of the attributes of z_i (`embedding_probe.attribute_probe`).

        Only when `probe_enabled`, and only for captions of the shapes grammar ({} otherwise). The
        probe is fitted on the first `eval.probe_train_examples` training images, embedded on first
        use and kept in `train` (so once per evaluation).
        """
        if not self.probe_enabled():
            return {}
        if not any(embedding_probe.single_object_attributes(captions)):
            logging.info("No single-object shapes caption in %r: skipping the z_i probe.", split)
            return {}
        if not train:
            source = input_pipeline.make_source(self.config.data, "train")
            train["z_i"], train["captions"] = self.embed_examples(
                params, mesh, source, int(self.config.eval.probe_train_examples))
        probe = embedding_probe.attribute_probe(train["z_i"], train["captions"], z_i, captions)
        if not probe:
            logging.info("No single-object shapes caption among the training images: skipping the z_i probe.")
        return {f"eval/{split}/{k}": v for k, v in probe.items()}

    def probe_enabled(self) -> bool:
        """Whether `evaluate` probes z_i's attributes: `eval.probe_train_examples` > 0, shapes data."""
        data = self.config.data
        shapes_data = data.get("source") == "procedural" or (
            data.get("source") == "tfds" and str(data.get("tfds_name", "")).startswith("shapes/"))
        return int(self.config.eval.get("probe_train_examples", 0)) > 0 and shapes_data

    def embed_examples(self, params, mesh: Mesh, source, num_examples: int) -> tuple[np.ndarray, list[str]]:
        """(unit z_i [N, embed_dim], captions) of the first `num_examples` examples of `source`."""
        images, captions = [], []
        for batch in input_pipeline.eval_batches(source, lambda e: dict(zip(("image", "caption"), self.decode(e))),
                                               num_examples=num_examples,
                                               batch_size=self.config.eval.batch_size):
            images.append(batch["image"])
            captions.extend(str(c) for c in batch["caption"])
        return self.embed(params, mesh, images=np.concatenate(images)), captions

    def retrieval(self, params, mesh: Mesh, z_i: np.ndarray, captions: list[str],
                  split: str) -> dict[str, float]:
        """Zero-shot caption retrieval: each image (unit z_i) picks its caption among `num_candidates`.

        The candidates are the image's own caption and distractors drawn (fixed seed) from the other
        distinct captions of the evaluated examples of the same split.
        """
        ev = self.config.eval
        pool = sorted(set(captions))
        index = {c: i for i, c in enumerate(pool)}
        z_t = self.embed(params, mesh, tokens=self.tokenizer(pool))
        scores = z_i @ z_t.T  # [N, len(pool)]
        truth = np.array([index[c] for c in captions])
        k = min(int(ev.num_candidates), len(pool))
        rng = np.random.default_rng(0)
        correct = 0
        for n, t in enumerate(truth):
            others = rng.choice(len(pool) - 1, size=k - 1, replace=False)
            others = others + (others >= t)  # Skip the true caption.
            correct += scores[n, t] > scores[n, others].max(initial=-np.inf)
        return {
            f"eval/{split}/retrieval_top1_of_{k}": float(correct / len(truth)),
            f"eval/{split}/retrieval_top1_of_all": float(np.mean(scores.argmax(1) == truth)),
            f"eval/{split}/num_captions": float(len(pool)),
        }
