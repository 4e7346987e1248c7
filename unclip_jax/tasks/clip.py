"""CLIP trained contrastively: symmetric InfoNCE over the global batch, zero-shot retrieval eval."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from unclip_jax import parallel
from unclip_jax.data import input_pipeline
from unclip_jax.data import shapes
from unclip_jax.data import tfds_builders
from unclip_jax.data import tokenizer as tokenizer_lib
from unclip_jax.evaluation import embedding_probe
from unclip_jax.evaluation import retrieval as retrieval_lib
from unclip_jax.stages.clip import ClipStage
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


class ClipTask(Task):
    """Trains the CLIP towers; evaluates zero-shot caption retrieval on validation and heldout, and
    on shapes data linear / 1-NN probes of z_i's attributes (`evaluation/embedding_probe.py`)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, sizes: Mapping[str, Any] | None = None):
        """`sizes` (vocab_size, eot_token_id, context_length) builds it without a tokenizer
        (ahead-of-time compiles); such a task cannot train."""
        super().__init__(config, workdir)
        self.tokenizer = None
        if sizes is None:
            self.tokenizer = prepare_tokenizer(config, workdir)
            sizes = {"vocab_size": self.tokenizer.vocab_size, "eot_token_id": self.tokenizer.eot_token_id,
                     "context_length": self.tokenizer.context_length}
        # An imported CLIP's config names its checkpoint's pooling; ours follows the tokenizer.
        pooling = config.model.get("eot_pooling") or (self.tokenizer.eot_pooling if self.tokenizer else "eot_id")
        self.stage = ClipStage(config, tokenizer=self.tokenizer, **{"eot_pooling": pooling, **sizes})
        self.side = self.stage.side

    def describe(self) -> dict[str, Any]:
        depends = {"tokenizer": self.tokenizer.path} if self.tokenizer is not None else {}
        return {"sizes": dict(self.stage.sizes), "depends_on": depends}

    # ------------------------------------------------------------------ data
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        b, s = int(batch_size), self.side
        return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
                "tokens": jax.ShapeDtypeStruct((b, self.stage.context_length), jnp.int32)}

    def map_example(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        image, caption = self.stage.decode(example)
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
        return self.stage.embed(params, mesh, images=images, tokens=tokens,
                                batch_size=self.config.eval.batch_size)

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
        for batch in input_pipeline.eval_batches(source, lambda e: dict(zip(("image", "caption"), self.stage.decode(e))),
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
        top1 = retrieval_lib.top1_among_distractors(scores, truth, k)
        return {
            f"eval/{split}/retrieval_top1_of_{k}": top1,
            f"eval/{split}/retrieval_top1_of_all": float(np.mean(scores.argmax(1) == truth)),
            f"eval/{split}/num_captions": float(len(pool)),
        }
