"""The embedded default: the unCLIP stack on procedurally rendered captioned shapes, sized for a CPU.

Usage: `python train.py --config configs/shapes.py:clip --workdir runs/shapes_clip`
Variants (the part after `:`): `clip` (default). Later stages add `prior`, `decoder`, `upsampler`.
Comma-separated options after the variant: `clip,tiny` shrinks everything for tests and smoke runs.
Any field can be overridden on the command line: `--config.train.num_steps=100`.
"""
from __future__ import annotations

import ml_collections

from unclip_jax import parallel


def _parse_arg(arg: str | None) -> tuple[str, set[str]]:
    parts = [p.strip() for p in (arg or "clip").split(",") if p.strip()]
    variant, options = (parts[0] if parts else "clip"), set(parts[1:])
    if variant not in ("clip",):
        raise ValueError(f"configs/shapes.py: unknown variant {variant!r}; expected one of: clip")
    unknown = options - {"tiny"}
    if unknown:
        raise ValueError(f"configs/shapes.py: unknown option(s) {sorted(unknown)}; expected: tiny")
    return variant, options


def data_config(side: int) -> ml_collections.ConfigDict:
    """Where the images and captions come from."""
    d = ml_collections.ConfigDict()
    d.source = "tfds"  # "tfds" (a prepared TFDS data set), or "procedural" (render shapes on the fly).
    d.tfds_name = f"shapes/{side}px"  # TFDS name/config; "shapes/*" is built on first use.
    d.data_dir = "data/tfds"  # TFDS data directory (relative paths are relative to the current dir).
    d.side = side  # Shapes render side in pixels (procedural source, and TFDS "shapes" builds).
    d.num_train = 50_000  # Shapes train examples (procedural source, and the shapes TFDS build).
    d.num_eval = 2_000  # Shapes validation / heldout examples (procedural source and TFDS build).
    d.seed = 0  # Shapes generator seed.
    d.shuffle_seed = 0  # Seed of the (per-epoch) shuffle of the training stream.
    d.num_threads = 4  # Grain threads decoding and preprocessing examples.
    return d


def mesh_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.shape = (-1, 1, 1)  # Devices along (data, fsdp, tensor); -1 takes the rest.
    m.num_devices = 0  # Use only the first N devices of each process (0: all of them).
    # Logical axis -> mesh axes, first match wins (see unclip_jax/parallel.py for the vocabulary).
    m.rules = tuple((name, axes) for name, axes in parallel.DEFAULT_RULES)
    return m


def clip_config(tiny: bool) -> ml_collections.ConfigDict:
    """CLIP: ViT image tower + causal text tower trained contrastively on 64 px shapes."""
    c = ml_collections.ConfigDict()
    c.stage = "clip"  # Which task trains (unclip_jax/tasks/<stage>.py).
    c.seed = 0  # Model init and training RNG seed.
    c.data = data_config(side=32 if tiny else 64)
    if tiny:
        c.data.source = "procedural"
        c.data.num_train, c.data.num_eval = 512, 64

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.dir = ""  # Tokenizer directory (HF CLIP format); "" trains a BPE on the shapes captions into <workdir>/tokenizer.
    c.tokenizer.vocab_size = 1024  # Vocabulary cap of the BPE trained on the shapes captions.
    c.tokenizer.context_length = 20  # Text tokens (shapes captions need at most 16) per caption; longer captions are truncated with a warning.

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 32 if tiny else 128  # Shared image/text embedding width (z_i, z_t).
    c.model.image_size = c.data.side  # Input side in pixels.
    c.model.patch_size = 8 if tiny else 16  # ViT patch side (16 px: 4x4 patches + class token at 64 px).
    c.model.vision_width = 32 if tiny else 128  # ViT width.
    c.model.vision_depth = 1 if tiny else 4  # ViT blocks.
    c.model.vision_heads = 2 if tiny else 4  # ViT attention heads.
    c.model.text_width = 32 if tiny else 128  # Text transformer width.
    c.model.text_depth = 1 if tiny else 3  # Text transformer blocks.
    c.model.text_heads = 2 if tiny else 4  # Text attention heads.
    c.model.mlp_ratio = 4.0  # MLP hidden width / model width.
    c.model.activation = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu".
    c.model.dtype = "float32"  # Activation dtype ("bfloat16" on accelerators); params stay float32.
    c.model.scan_layers = False  # nn.scan over transformer blocks (faster compiles for deep stacks).
    c.model.remat_policy = "none"  # Rematerialisation: none | full | dots_saveable | nothing_saveable.

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32 if tiny else 128  # Global batch (all hosts); the contrastive loss spans all of it.
    c.train.num_steps = 20 if tiny else 800  # Optimizer steps.
    c.train.grad_accum_steps = 1  # Micro-batches per step (each micro-batch is its own contrastive batch).
    c.train.learning_rate = 1e-3  # Peak learning rate.
    c.train.warmup_steps = 5 if tiny else 100  # Linear warmup, then cosine decay to end_lr_fraction.
    c.train.end_lr_fraction = 0.02  # Final learning rate / peak.
    c.train.weight_decay = 0.1  # AdamW decoupled weight decay (kernels only).
    c.train.b1 = 0.9  # Adam beta1.
    c.train.b2 = 0.98  # Adam beta2.
    c.train.eps = 1e-6  # Adam epsilon.
    c.train.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
    c.train.ema_decay = 0.999  # EMA of params (warmed up as min(decay, (1+t)/(10+t))).
    c.train.log_every = 5 if tiny else 50  # Steps between metric logs (and NaN checks).
    c.train.checkpoint_every = 10 if tiny else 200  # Steps between checkpoints.
    c.train.keep_checkpoints = 3  # Checkpoints kept (older ones are deleted).
    c.train.eval_every = 0  # Steps between evaluations during training (0: only at the end).

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 64 if tiny else 1_000  # Images per split for retrieval evaluation.
    c.eval.num_candidates = 8 if tiny else 32  # Captions each image chooses among (its own + distractors).
    c.eval.batch_size = 64 if tiny else 250  # Evaluation batch.
    c.eval.use_ema = True  # Evaluate the EMA params.
    c.eval.splits = ("validation", "heldout")  # Splits evaluated (missing splits are skipped).

    c.mesh = mesh_config()
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _parse_arg(arg)
    config = clip_config(tiny="tiny" in options)
    config.lock()
    return config
