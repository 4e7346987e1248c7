"""unCLIP on your own image-text data with a published CLIP (OpenAI's ViT-L/14, imported).

    python convert_clip.py --hf_dir clip-vit-large-patch14 --workdir runs/clip_vit_l14 \
        --config configs/clip_vit_l14.py:clip --config.data.shards='data/shards/{00000..00099}.tar'
    python embed.py --clip_workdir runs/clip_vit_l14 --cache_dir runs/clip_vit_l14/cache
    python train.py --config configs/clip_vit_l14.py:prior --workdir runs/l14_prior
    python train.py --config configs/clip_vit_l14.py:decoder --workdir runs/l14_decoder

Variants (the part after `:`): `clip` (the template `convert_clip.py` fills with the checkpoint's
sizes: the data set, evaluation and mesh of the imported CLIP), `prior`, `decoder`. Option `tiny`
(`prior,tiny`) shrinks the prior and decoder for smoke tests. The data come from WebDataset tar
shards (`data.source="webdataset"`, img2dataset's output) or a captioned folder
(`--config.data.source=tfds --config.data.tfds_name=captioned_folder/mine --config.data.folder=...`).
The prior and decoder read the imported CLIP's data through `clip_workdir`. Untuned: sizes and
steps are a starting point between `configs/shapes.py` and the paper's (Ramesh et al. 2022,
Table 3).
"""
from __future__ import annotations

import ml_collections

from configs import shapes

VARIANTS = ("clip", "prior", "decoder")
CLIP_WORKDIR = "runs/clip_vit_l14"


def _parse_arg(arg: str | None) -> tuple[str, set[str]]:
    return shapes.parse_variant(arg, where="configs/clip_vit_l14.py", variants=VARIANTS,
                                options=("tiny",), exclusive=(), default="clip")


def data_config() -> ml_collections.ConfigDict:
    """Where the image-caption pairs come from (read by the CLIP workdir's consumers)."""
    d = ml_collections.ConfigDict()
    d.source = "webdataset"  # "webdataset" (tar shards) or "tfds" (a prepared TFDS data set, e.g. a captioned folder).
    d.shards = ""  # Train shards: glob or brace pattern, e.g. "data/shards/{00000..00099}.tar" (webdataset).
    d.validation_shards = ""  # Validation shards (webdataset); "" = no validation split.
    d.verify_images = False  # Decode every image when indexing shards and skip corrupt ones up front (slower start).
    d.tfds_name = "captioned_folder/mine"  # TFDS name/config (tfds source); "captioned_folder/<name>" builds from `folder`.
    d.data_dir = "data/tfds"  # TFDS data directory (tfds source).
    d.folder = ""  # Folder of name.jpg + name.txt pairs (captioned_folder).
    d.validation_fraction = 0.01  # Share of a captioned folder held out for validation.
    d.shuffle_seed = 0  # Seed of the (per-epoch) shuffle of the training stream.
    d.num_threads = 16  # Grain threads decoding and preprocessing images.
    return d


def clip_config() -> ml_collections.ConfigDict:
    """The frozen, imported CLIP. Model sizes here are OpenAI ViT-L/14's; the import replaces them
    (and `preprocess`, `tokenizer`) with the checkpoint's own."""
    c = ml_collections.ConfigDict()
    c.stage = "clip"  # The CLIP task reads this workdir (imported, not trained here).
    c.seed = 0  # Unused by an import; kept for the CLIP task.
    c.imported_from = ""  # The Hugging Face directory the weights came from (set by convert_clip.py).
    c.data = data_config()

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.dir = ""  # "" = <workdir>/tokenizer (copied from the checkpoint by convert_clip.py).
    c.tokenizer.vocab_size = 49408  # Ids of the tokenizer (informational: the import sets it).
    c.tokenizer.context_length = 77  # Text tokens per caption (the text tower's position embeddings).

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 768  # Shared embedding width (z_i, z_t).
    c.model.image_size = 224  # Input side in pixels.
    c.model.patch_size = 14  # ViT patch side.
    c.model.vision_width = 1024  # ViT width.
    c.model.vision_depth = 24  # ViT blocks.
    c.model.vision_heads = 16  # ViT heads.
    c.model.text_width = 768  # Text transformer width.
    c.model.text_depth = 12  # Text transformer blocks.
    c.model.text_heads = 12  # Text heads.
    c.model.context_length = 77  # Text positions.
    c.model.mlp_ratio = 4.0  # MLP hidden width / width.
    c.model.activation = "quick_gelu"  # quick_gelu (OpenAI) | gelu (LAION ViT-H/14) | gelu_tanh.
    c.model.eot_pooling = "argmax"  # Text pooling position: argmax (legacy HF configs, eos_token_id=2) | eot_id.
    c.model.dtype = "float32"  # Activation dtype of the frozen encoder (bfloat16 is faster on accelerators).
    c.model.scan_layers = False  # nn.scan over blocks (faster compiles for deep towers).
    c.model.remat_policy = "none"  # Only matters for training.

    c.preprocess = ml_collections.ConfigDict()
    c.preprocess.resize_size = 224  # Shorter side after the resize (px).
    c.preprocess.crop_size = 224  # Centre crop side (= model.image_size).
    c.preprocess.resample = "bicubic"  # Pillow filter of the resize.
    c.preprocess.mean = (0.48145466, 0.4578275, 0.40821073)  # Per-channel mean of [0, 1] pixels (OpenAI's).
    c.preprocess.std = (0.26862954, 0.26130258, 0.27577711)  # Per-channel std (OpenAI's).

    c.train = shapes.train_config(
        batch_size=256, num_steps=0, learning_rate=1e-5, warmup_steps=500, weight_decay=0.1, b2=0.98,
        eps=1e-6, ema_decay=0.999, log_every=50, checkpoint_every=1000)  # num_steps=0: not trained.

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 1_000  # Images per split for zero-shot retrieval.
    c.eval.num_candidates = 32  # Captions each image chooses among.
    c.eval.batch_size = 256  # Evaluation batch.
    c.eval.use_ema = True  # The imported weights are both params and EMA params.
    c.eval.splits = ("validation",)  # Splits evaluated (missing ones are skipped).
    c.mesh = shapes.mesh_config()
    return c


def prior_config() -> ml_collections.ConfigDict:
    """The diffusion prior over ViT-L/14 embeddings (D=768, text hidden states 77 x 768)."""
    c = shapes.prior_config()
    c.clip_workdir = CLIP_WORKDIR  # The imported CLIP (convert_clip.py) and its embedding cache.
    c.data.num_threads = 8
    c.model.width = 1024  # Transformer width (paper: 2048 for the 1B prior).
    c.model.depth = 12  # Blocks (paper: 24).
    c.model.num_heads = 16  # Heads.
    c.model.dtype = "bfloat16"  # Activations; params stay float32.
    c.model.remat_policy = "dots_saveable"
    c.diffusion.embedding_scale = 0.0  # sqrt(768), the unit embeddings' scale as in the paper.
    c.train = shapes.train_config(
        batch_size=1024, num_steps=200_000, learning_rate=1.1e-4, warmup_steps=2_000,
        weight_decay=6e-2, b2=0.96, eps=1e-6, ema_decay=0.9999, log_every=100,
        checkpoint_every=5_000)  # Paper: batch 4096, lr 1.1e-4, wd 6e-2, 600k steps.
    c.eval.splits = ("validation",)
    c.eval.num_examples = 1_000
    c.eval.num_train_neighbours = 100_000
    c.eval.batch_size = 500
    return c


def decoder_config() -> ml_collections.ConfigDict:
    """The 64 px decoder conditioned on ViT-L/14 z_i (and the caption)."""
    c = shapes.decoder_config()
    c.clip_workdir = CLIP_WORKDIR  # The imported CLIP: its data set, tokenizer and embedding cache.
    _real_data_eval(c)
    c.data.num_threads = 16
    unet = shapes.unet_config(base=192, mult=(1, 2, 3, 4), res_blocks=3, attention=(32, 16, 8),
                              image_size=64)  # Paper: base 512 (3.5B parameters).
    for key, value in unet.items():
        c.model[key] = value
    c.model.head_channels = 64
    c.model.clip_spatial = 0  # The paper's conditioning only (the shapes decoder adds a z_i map).
    c.model.dropout = 0.1  # Paper: 0.1.
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.text_width = 512  # The decoder's own caption transformer (GLIDE's pathway).
    c.model.text_depth = 8
    c.model.text_heads = 8
    c.diffusion.sample_steps = 50
    c.train = shapes.train_config(
        batch_size=256, num_steps=400_000, learning_rate=1.2e-4, warmup_steps=2_000,
        weight_decay=0.0, b2=0.999, eps=1e-8, ema_decay=0.9999, log_every=100,
        checkpoint_every=5_000)  # Paper: batch 2048, lr 1.2e-4, 800k steps.
    c.eval.num_examples = 64
    c.eval.batch_size = 64
    return c


def _real_data_eval(c: ml_collections.ConfigDict) -> None:
    """The decoder's evaluation on real data: the shapes judge only understands shapes captions, so
    decoded validation z_i are scored by FD-CLIP and CLIP score (docs/evaluation.md). Without
    validation shards (`data.validation_shards` of the CLIP workdir) it is skipped with a note."""
    c.eval.splits = ("validation",)  # Held-out split whose true z_i are decoded and scored.
    c.eval.metrics = ("fd_clip", "clip_score")  # Frechet distance and caption fidelity in CLIP space.
    c.eval.clip_workdir = ""  # CLIP of the features; "" = clip_workdir (the one the decoder is conditioned on).


def _tiny_overrides(c: ml_collections.ConfigDict, variant: str) -> None:
    """The `tiny` option (prior and decoder, for smoke tests): every section of configs/shapes.py's
    tiny stage in place of this file's sizes; only `clip_workdir` (this file's CLIP) and the
    decoder's evaluation metrics (the CLIP ones: real captions) stay."""
    small = shapes.get_config(f"{variant},tiny")
    for section in ("data", "model", "diffusion", "train", "eval"):
        c[section] = small[section]
    if variant == "decoder":
        with c.eval.unlocked():
            _real_data_eval(c)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _parse_arg(arg)
    tiny = "tiny" in options
    if variant == "clip":
        if tiny:
            raise ValueError("configs/clip_vit_l14.py: the clip variant has no tiny option (its sizes "
                             "come from the imported checkpoint)")
        config = clip_config()
    else:
        config = {"prior": prior_config, "decoder": decoder_config}[variant]()
        if tiny:
            _tiny_overrides(config, variant)
    config.lock()
    return config
