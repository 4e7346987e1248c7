"""The embedded default: the unCLIP stack on procedurally rendered captioned shapes, sized for a CPU.

Usage: `python train.py --config configs/shapes.py:clip --workdir runs/shapes_clip`
Variants (the part after `:`): `clip` (default), `prior`, `decoder`, `upsampler`, `ar_prior` (the
paper's autoregressive alternative to the diffusion `prior`).
Comma-separated options after the variant: `clip,tiny` shrinks everything for tests and smoke runs
(see `_tiny_overrides`); `clip,fast` is the short stack that `train_stack.py` trains by default
(~28 minutes on a 2-core CPU: fewer steps, a smaller upsampler, shapes rendered on the fly; see
`fast_config`).
Any field can be overridden on the command line: `--config.train.num_steps=100`.
"""
from __future__ import annotations

import ml_collections

from unclip_jax import parallel


VARIANTS = ("clip", "prior", "decoder", "upsampler", "ar_prior")
OPTIONS = ("tiny", "fast")


def parse_variant(arg: str | None, *, where: str, variants, options, exclusive,
                  default: str) -> tuple[str, set[str]]:
    """`"variant,opt1,opt2"` -> (variant, {options}), with one clear error for an unknown variant or
    option, or for two options of `exclusive` together."""
    parts = [p.strip() for p in (arg or default).split(",") if p.strip()]
    variant, chosen = (parts[0] if parts else default), set(parts[1:])
    if variant not in variants:
        raise ValueError(f"{where}: unknown variant {variant!r}; expected one of: {', '.join(variants)}")
    unknown = chosen - set(options)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown)}; expected any of: "
                         f"{', '.join(options)}")
    if len(chosen & set(exclusive)) > 1:
        raise ValueError(f"{where}: options {sorted(chosen & set(exclusive))} exclude each other; pick one")
    return variant, chosen


def _parse_arg(arg: str | None) -> tuple[str, set[str]]:
    return parse_variant(arg, where="configs/shapes.py", variants=VARIANTS, options=OPTIONS,
                         exclusive=OPTIONS, default="clip")


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
    # Of that shape, the part across hosts (GPU nodes, CPU hosts) or TPU slices, which talk over the
    # slower data-centre network; -1: the number of them. Ignored on one host or one slice.
    m.dcn_shape = (-1, 1, 1)
    m.num_devices = 0  # Use only the first N devices of each process (0: all of them).
    # Logical axis -> mesh axes, first match wins (see unclip_jax/parallel.py for the vocabulary).
    m.rules = tuple((name, axes) for name, axes in parallel.DEFAULT_RULES)
    return m


def train_config(*, batch_size, num_steps, learning_rate, warmup_steps, weight_decay, b2, eps,
                 ema_decay, log_every, checkpoint_every) -> ml_collections.ConfigDict:
    """Optimisation, logging and checkpointing of one stage."""
    t = ml_collections.ConfigDict()
    t.batch_size = batch_size  # Global batch (all hosts).
    t.num_steps = num_steps  # Optimizer steps.
    t.grad_accum_steps = 1  # Micro-batches per step (a contrastive loss sees one micro-batch at a time).
    t.learning_rate = learning_rate  # Peak learning rate.
    t.warmup_steps = warmup_steps  # Linear warmup, then cosine decay to end_lr_fraction.
    t.end_lr_fraction = 0.02  # Final learning rate / peak.
    t.weight_decay = weight_decay  # AdamW decoupled weight decay (kernels only).
    t.b1 = 0.9  # Adam beta1.
    t.b2 = b2  # Adam beta2.
    t.eps = eps  # Adam epsilon.
    t.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
    t.ema_decay = ema_decay  # EMA of params (warmed up as min(decay, (1+t)/(10+t))).
    t.log_every = log_every  # Steps between metric logs (and NaN checks).
    t.checkpoint_every = checkpoint_every  # Steps between checkpoints.
    t.keep_checkpoints = 3  # Checkpoints kept (older ones are deleted).
    t.init_from = ""  # Warm start: a workdir whose latest params + EMA seed a new run (new modules: init).
    t.eval_every = 0  # Steps between evaluations during training (0: only at the end).
    return t


def clip_config() -> ml_collections.ConfigDict:
    """CLIP: ViT image tower + causal text tower trained contrastively on 64 px shapes."""
    c = ml_collections.ConfigDict()
    c.stage = "clip"  # Which task trains (unclip_jax/tasks/<stage>.py).
    c.seed = 0  # Model init and training RNG seed.
    c.data = data_config(side=64)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.dir = ""  # Tokenizer directory (HF CLIP format); "" trains a BPE on the shapes captions into <workdir>/tokenizer.
    c.tokenizer.vocab_size = 1024  # Vocabulary cap of the BPE trained on the shapes captions.
    c.tokenizer.context_length = 20  # Text tokens (shapes captions need at most 16) per caption; longer captions are truncated with a warning.

    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = 128  # Shared image/text embedding width (z_i, z_t).
    c.model.image_size = c.data.side  # Input side in pixels.
    c.model.patch_size = 16  # ViT patch side (16 px: 4x4 patches + class token at 64 px).
    c.model.vision_width = 128  # ViT width.
    c.model.vision_depth = 4  # ViT blocks.
    c.model.vision_heads = 4  # ViT attention heads.
    c.model.text_width = 128  # Text transformer width.
    c.model.text_depth = 3  # Text transformer blocks.
    c.model.text_heads = 4  # Text attention heads.
    c.model.mlp_ratio = 4.0  # MLP hidden width / model width.
    c.model.activation = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu".
    c.model.dtype = "float32"  # Activation dtype ("bfloat16" on accelerators); params stay float32.
    # Transformer projection operands, forward and backward: "" = dtype; "bfloat16" with float32
    # accumulation; "auto" = bfloat16 on CPUs with bfloat16 matrix units, dtype elsewhere
    # (unclip_jax/cpu.py).
    c.model.matmul_dtype = "auto"
    c.model.scan_layers = False  # nn.scan over transformer blocks (faster compiles for deep stacks).
    c.model.remat_policy = "none"  # Rematerialisation: none | full | dots_saveable | nothing_saveable.

    c.train = train_config(
        # More steps than retrieval needs: z_i must also encode where things are (docs/results.md).
        batch_size=128, num_steps=2_400, learning_rate=1e-3, warmup_steps=100, weight_decay=0.1,
        b2=0.98, eps=1e-6, ema_decay=0.999, log_every=50, checkpoint_every=400)

    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 1_000  # Images per split for retrieval evaluation.
    c.eval.num_candidates = 32  # Captions each image chooses among (its own + distractors).
    c.eval.batch_size = 250  # Evaluation batch.
    c.eval.use_ema = True  # Evaluate the EMA params.
    c.eval.splits = ("validation", "heldout")  # Splits evaluated (missing splits are skipped).
    # Training images fitting the linear / 1-NN probes of z_i's attributes (position, shape, ...); 0: off.
    c.eval.probe_train_examples = 6_000

    c.mesh = mesh_config()
    return c


def prior_config() -> ml_collections.ConfigDict:
    """The diffusion prior: caption (CLIP text hidden states + z_t) -> CLIP image embedding z_i."""
    c = ml_collections.ConfigDict()
    c.stage = "prior"  # Which task trains (unclip_jax/tasks/<stage>.py).
    c.seed = 0  # Model init and training RNG seed.
    c.clip_workdir = "runs/shapes_clip"  # The trained (frozen) CLIP: its tokenizer and embedding cache.
    c.cache_dir = ""  # CLIP embedding cache (embed.py); "" = <clip_workdir>/cache.
    c.data = ml_collections.ConfigDict()
    c.data.shuffle_seed = 0  # Seed of the (per-epoch) shuffle of the training stream.
    c.data.num_threads = 2  # Grain threads reading cache records.

    c.model = ml_collections.ConfigDict()
    c.model.width = 128  # Transformer width.
    c.model.depth = 4  # Transformer blocks.
    c.model.num_heads = 4  # Attention heads.
    c.model.head_dim = 0  # Per-head width (0: width // num_heads).
    c.model.mlp_ratio = 4.0  # MLP hidden width / width.
    c.model.activation = "gelu"  # MLP activation.
    c.model.dtype = "float32"  # Activation dtype ("bfloat16" on accelerators); params stay float32.
    c.model.scan_layers = True  # nn.scan over blocks (one compiled block, faster compiles).
    c.model.remat_policy = "nothing_saveable"  # Per-block remat: none | full | dots_saveable | nothing_saveable (this one: fastest on CPU).
    # Projection operands, forward and backward: "" = dtype; "bfloat16" with float32
    # accumulation; "auto" = bfloat16 on CPUs with bfloat16 matrix units, dtype elsewhere.
    c.model.matmul_dtype = "auto"

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"  # Noise schedule (paper: cosine).
    c.diffusion.num_timesteps = 1000  # Training diffusion steps (paper: 1000).
    c.diffusion.embedding_scale = 0.0  # Unit CLIP embeddings times this; 0 = sqrt(D) (paper: 17.2 for D=1024).
    c.diffusion.text_drop_prob = 0.1  # Caption + z_t replaced by learned nulls this often (guidance).
    c.diffusion.sample_steps = 64  # Strided sampling steps (paper: 64).
    c.diffusion.sampler = "ddpm"  # ddpm (fixed small variance) | ddim | dpm++2m.
    c.diffusion.guidance_scale = 1.0  # Classifier-free guidance (paper: guiding the prior hurt).
    c.diffusion.best_of = 2  # Samples per caption; keep the highest dot product with z_t (paper: 2).

    c.train = train_config(
        batch_size=128, num_steps=1_200, learning_rate=1e-3, warmup_steps=200, weight_decay=6e-2,
        b2=0.96, eps=1e-6, ema_decay=0.999, log_every=50, checkpoint_every=500)

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("validation", "heldout")  # Splits evaluated (missing ones are skipped).
    c.eval.num_examples = 1_000  # Captions per split.
    c.eval.num_candidates = 32  # Images the sampled z_i picks among (retrieval).
    c.eval.num_train_neighbours = 50_000  # Training z_i searched for the nearest-neighbour baseline.
    c.eval.batch_size = 500  # Captions sampled per batch.
    c.eval.seed = 0  # Sampling seed of the evaluation.
    c.eval.use_ema = True  # Evaluate the EMA params.

    c.mesh = mesh_config()
    return c


def ar_prior_config() -> ml_collections.ConfigDict:
    """The autoregressive prior: caption -> the quantised principal components of z_i, one by one.

    The diffusion prior's data, optimiser and evaluation; the model is a causal transformer of the
    same width and depth over [caption, z_t, dot-product token, codes] (stages/ar_prior.py).
    """
    c = prior_config()
    c.stage = "ar_prior"
    del c.diffusion
    c.model.text_encoder_width = 0  # Text encoder width (0: width).
    # Bidirectional blocks over the caption before the decoder (0: none; the cached CLIP hidden
    # states are already contextual).
    c.model.text_encoder_depth = 0
    c.model.text_encoder_heads = 0  # Text encoder heads (0: num_heads).

    c.codes = ml_collections.ConfigDict()
    # Principal components of z_i kept, by decreasing eigenvalue (paper: 319 of 1024, under 1%
    # mean squared reconstruction error). 48 of the shapes CLIP's 128 hold 99.5% of the variance;
    # quantised, z_i's reconstruction has a mean cosine of 0.997 to it (docs/ar_prior_pca.json,
    # benchmarks/ar_prior_pca.py).
    c.codes.num_components = 48
    # Quantile buckets per component, and for z_i . z_t (paper: 1024). 64 lose little to 256
    # (mean cosine 0.9968 against 0.9974) and each holds ~780 of the 50,000 training embeddings:
    # with 256, a 600-step run sat at the uniform loss (log 256) for its first 200 steps.
    c.codes.num_buckets = 64
    c.codes.fit_examples = 0  # Training embeddings the PCA and the buckets are fitted on (0: all).

    c.ar = ml_collections.ConfigDict()
    c.ar.text_drop_prob = 0.1  # Caption + z_t replaced by learned nulls this often (guidance).
    c.ar.guidance_scale = 1.0  # Classifier-free guidance on the log-probabilities (1: off).
    c.ar.temperature = 1.0  # Softmax temperature (0: greedy).
    c.ar.top_k = 0  # Draw among the k most likely tokens (0: all).
    c.ar.top_p = 1.0  # Draw within the smallest set holding this probability (1: all).
    c.ar.dot_percentile = 0.5  # The dot token is drawn above this percentile of its distribution (paper: 0.5, the top half).
    return c


def diffusion_config(*, learned_variance: bool, sampler: str, sample_steps: int,
                     guidance_scale: float) -> ml_collections.ConfigDict:
    """Noise schedule, parameterisation, variance and sampling of an image diffusion stage."""
    d = ml_collections.ConfigDict()
    d.schedule = "cosine"  # Noise schedule: cosine | linear (paper: cosine; linear for 256->1024).
    d.num_timesteps = 1000  # Training diffusion steps.
    d.logsnr_shift = 0.0  # Added to every step's log-SNR (Hoogeboom et al. 2023: 2 log(64 / side)); 0 = the named schedule.
    d.param = "eps"  # What the UNet predicts: eps | x0 | v.
    d.t_sampling = "uniform"  # Training noise levels: uniform (DDPM) | lognormal (EDM: ln sigma ~ N(mean, std^2)).
    d.t_lognormal_mean = -1.2  # EDM's P_mean (t_sampling="lognormal").
    d.t_lognormal_std = 1.2  # EDM's P_std.
    d.min_snr_gamma = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their choice); 0 = plain MSE.
    d.learned_variance = learned_variance  # Learned sigma with the hybrid loss (paper), or fixed variance.
    d.sampler = sampler  # ddpm | ddim | dpm++2m.
    d.sample_steps = sample_steps  # Strided sampling steps (int, "ddimK" or "10,10,3,2,2").
    d.eta = 0.0  # DDIM stochasticity.
    d.guidance_scale = guidance_scale  # Classifier-free guidance (1 = none).
    return d


def unet_config(*, base: int, mult: tuple, res_blocks: int, attention: tuple,
                image_size: int) -> ml_collections.ConfigDict:
    """The ADM UNet block (unclip_jax/models/unet.py field names)."""
    m = ml_collections.ConfigDict()
    m.image_size = image_size  # Training resolution in pixels (attention resolutions refer to it).
    m.patch_size = 1  # Fold p x p pixel blocks into channels: every level at 1/p of the side.
    m.base_channels = base  # Channels at the first level (ADM model_channels).
    m.channel_mult = mult  # Channel multiplier per level.
    m.num_res_blocks = res_blocks  # Residual blocks per level.
    m.attention_resolutions = attention  # Resolutions (px) with self + context attention.
    m.head_channels = 32  # Channels per attention head.
    m.num_groups = 32  # GroupNorm groups (capped to divide the channels).
    m.dropout = 0.0  # Dropout in residual blocks (paper: 0.1).
    m.dtype = "float32"  # Activation dtype ("bfloat16" on accelerators); params stay float32.
    m.remat = False  # Rematerialise each block in the backward pass.
    m.coord_channels = False  # Append pixel (x, y) to the input (CoordConv; not in the paper).
    m.num_timesteps = 1000  # Timestep embedding scale (1000-step model).
    return m


def decoder_config() -> ml_collections.ConfigDict:
    """The decoder: CLIP image embedding z_i (+ caption) -> 32 px image, classifier-free guidance."""
    c = ml_collections.ConfigDict()
    c.stage = "decoder"  # Which task trains (unclip_jax/tasks/<stage>.py).
    c.seed = 0  # Model init and training RNG seed.
    c.clip_workdir = "runs/shapes_clip"  # The frozen CLIP: tokenizer, data set and embedding cache.
    c.cache_dir = ""  # CLIP embedding cache (embed.py); "" = <clip_workdir>/cache.
    c.data = ml_collections.ConfigDict()
    c.data.shuffle_seed = 0  # Seed of the (per-epoch) shuffle of the training stream.
    c.data.num_threads = 4  # Grain threads decoding images.
    # Sized for a 2-core CPU.
    c.model = unet_config(base=32, mult=(1, 2, 2), res_blocks=1, attention=(8,), image_size=32)
    c.model.clip_tokens = 4  # Extra context tokens projected from z_i (paper: 4).
    c.model.clip_scale = 0.0  # Unit z_i times this before its projections; 0 = sqrt(D) (unit-variance entries).
    # Not in the paper: z_i also as an 8 x 8 map at the bottleneck, and pixel (x, y) input channels,
    # so that the decoder learns early where to draw (docs/results.md).
    c.model.clip_spatial = 8  # Side of the z_i-projected bottleneck map; 0 = none.
    c.model.clip_map_resolutions = ()  # Levels (px) whose entry adds a full-size z_i map.
    c.model.coord_channels = True  # Append pixel (x, y) to the input.
    # Not in the paper either, and off (a short trial did not help, README): the caption's pooled
    # embedding as a bottleneck map too.
    c.model.text_spatial = 0  # Side of the caption-projected bottleneck map; 0 = none.
    c.model.text_width = 64  # The decoder's own caption transformer (GLIDE's pathway).
    c.model.text_depth = 2  # Its blocks (0 disables the text pathway).
    c.model.text_heads = 2  # Its heads.
    c.diffusion = diffusion_config(learned_variance=True, sampler="ddim", sample_steps=50,
                                   guidance_scale=1.5)
    # v-prediction with plain MSE on v: Min-SNR-5 would all but ignore the high noise levels where
    # the layout is decided.
    c.diffusion.param, c.diffusion.min_snr_gamma = "v", 0.0
    # Uniform noise levels on the unshifted cosine schedule: EDM's log-normal levels
    # (t_sampling="lognormal") and log-SNR shifts of +-1.39 learned shapes no faster (docs/results.md).
    c.diffusion.z_i_drop_prob = 0.1  # z_i replaced by its learned null (paper §2.1: 10%; §5.1 says 5%).
    c.diffusion.text_drop_prob = 0.5  # Caption dropped (paper: 50%).
    # What guidance's unconditional half drops: "all" (z_i and caption, the paper) | "z_i" (keeps
    # the caption: guides along z_i alone).
    c.diffusion.guidance_drops = "all"
    c.train = train_config(
        batch_size=32, num_steps=8_000, learning_rate=1e-3, warmup_steps=100, weight_decay=0.0,
        b2=0.999, eps=1e-8, ema_decay=0.999, log_every=50, checkpoint_every=200)
    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("validation",)  # Splits whose true z_i are decoded and judged.
    c.eval.metrics = ("judge",)  # judge (shapes captions) | fd_clip | clip_score (any data; docs/evaluation.md).
    c.eval.num_examples = 200  # Images per split.
    c.eval.batch_size = 100  # Decoding batch.
    c.eval.seed = 0  # Sampling seed.
    c.eval.use_ema = True  # Evaluate the EMA params.
    c.mesh = mesh_config()
    return c


def upsampler_config() -> ml_collections.ConfigDict:
    """The first upsampler on shapes: 32 -> 128 px, conv-only, blurred low-res conditioning."""
    c = ml_collections.ConfigDict()
    c.stage = "upsampler"  # Which task trains (unclip_jax/tasks/<stage>.py).
    c.seed = 0  # Model init and training RNG seed.
    c.data = data_config(side=128)
    c.data.scale = 4  # Upsampling factor.
    c.data.crop_size = 32  # Training crops of the high-res image (paper: a quarter of the side).
    c.data.corruption = "blur"  # Low-res corruption: blur (64->256) | bsr (256->1024) | none.
    c.data.crop_seed = 0  # Seed of the per-example crops and corruptions.
    c.model = unet_config(base=32, mult=(1, 2, 4), res_blocks=2, attention=(),
                          image_size=c.data.crop_size)
    c.diffusion = diffusion_config(learned_variance=False, sampler="ddim", sample_steps=27,
                                   guidance_scale=1.0)
    # Diffuse the high-res image minus the resized input (SRDiff; not the paper's choice), predicting
    # v: short runs of the paper's target (the image, with epsilon) left tinted backgrounds (docs/results.md).
    c.diffusion.residual = True
    c.diffusion.param = "v"
    c.train = train_config(
        batch_size=64, num_steps=3_000, learning_rate=3e-4, warmup_steps=200, weight_decay=0.0,
        b2=0.999, eps=1e-8, ema_decay=0.999, log_every=50, checkpoint_every=500)
    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("validation",)  # Splits upsampled at full size and judged.
    c.eval.num_examples = 100  # Images per split.
    c.eval.batch_size = 50  # Upsampling batch.
    c.eval.seed = 0  # Sampling seed.
    c.eval.use_ema = True  # Evaluate the EMA params.
    c.mesh = mesh_config()
    return c


def _tiny_overrides(c: ml_collections.ConfigDict, variant: str) -> None:
    """The `tiny` option: every stage shrunk for tests and smoke runs.

    Images are rendered on the fly; projections stay float32 (matmul_dtype "") because the tests
    compare tiny models exactly.
    """
    c.train.batch_size, c.train.num_steps, c.train.warmup_steps = {
        "clip": (32, 20, 5), "prior": (32, 20, 5), "decoder": (16, 10, 2), "upsampler": (16, 10, 2),
        "ar_prior": (32, 20, 5),
    }[variant]
    c.train.log_every, c.train.checkpoint_every = 5, 10
    if variant == "clip":
        c.data.side, c.data.tfds_name = 32, "shapes/32px"
        c.data.source = "procedural"
        c.data.num_train, c.data.num_eval = 512, 64
        c.model.embed_dim, c.model.image_size, c.model.patch_size = 32, c.data.side, 8
        c.model.vision_width, c.model.vision_depth, c.model.vision_heads = 32, 1, 2
        c.model.text_width, c.model.text_depth, c.model.text_heads = 32, 1, 2
        c.model.matmul_dtype = ""
        c.eval.num_examples, c.eval.num_candidates, c.eval.batch_size = 64, 8, 64
        c.eval.probe_train_examples = 512
    elif variant in ("prior", "ar_prior"):
        c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
        c.model.matmul_dtype = ""
        c.eval.num_examples, c.eval.num_candidates, c.eval.batch_size = 32, 8, 32
        c.eval.num_train_neighbours = 256
        if variant == "ar_prior":  # The tiny cache has 64 training embeddings of 32 dims.
            c.codes.num_components, c.codes.num_buckets = 8, 8
    elif variant == "decoder":
        c.model.base_channels, c.model.channel_mult, c.model.image_size = 16, (1, 2), 16
        c.model.head_channels, c.model.num_groups = 8, 8
        c.model.clip_spatial, c.model.coord_channels = 0, False
        c.model.text_width, c.model.text_depth = 32, 1
        c.diffusion.sample_steps = 8
        c.eval.num_examples, c.eval.batch_size = 16, 16
    elif variant == "upsampler":
        # 16 -> 64 px: the judge needs at least 16 px.
        c.data.side, c.data.tfds_name = 64, "shapes/64px"
        c.data.crop_size = 16
        c.data.source = "procedural"
        c.data.num_train, c.data.num_eval = 256, 4
        c.model.base_channels, c.model.channel_mult, c.model.num_res_blocks = 16, (1, 2), 1
        c.model.image_size = c.data.crop_size
        c.model.head_channels, c.model.num_groups = 8, 8
        c.diffusion.sample_steps = 5
        c.eval.num_examples, c.eval.batch_size = 4, 8


def fast_config(variant: str, c: ml_collections.ConfigDict) -> None:
    """The `fast` option: the whole stack (train_stack.py's default) in ~28 minutes on 2 CPU cores.

    Same models except a smaller upsampler; fewer steps; every stage's own evaluation smaller (the
    stack is judged end to end afterwards); shapes rendered on the fly (no TFDS build). What this
    costs in quality is measured in docs/results.md (the defaults are the quality runs): the
    decoder is the bottleneck, and 1,400 steps draw colours in place and half the shapes.
    """
    if variant == "clip":
        c.data.source = "procedural"
        c.train.num_steps, c.train.checkpoint_every = 1_200, 400
        c.eval.num_examples, c.eval.probe_train_examples = 500, 3_000
    elif variant in ("prior", "ar_prior"):
        c.train.num_steps, c.train.warmup_steps = 600, 100
        c.eval.num_examples, c.eval.num_train_neighbours = 500, 20_000
    elif variant == "decoder":
        c.train.num_steps, c.train.warmup_steps = 1_400, 50
        c.diffusion.sample_steps = 25
        c.eval.num_examples = 100
    elif variant == "upsampler":
        c.data.source = "procedural"
        c.model.base_channels, c.model.channel_mult, c.model.num_res_blocks = 32, (1, 2), 1
        c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 32, 400, 50
        c.train.learning_rate = 1e-3  # the default's 3e-4 is for its 3,000 steps
        # DDIM steps (paper: 27 and 15): fewer for speed, at a small cost in PSNR (docs/results.md).
        c.diffusion.sample_steps = 5
        c.eval.num_examples = 32


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _parse_arg(arg)
    builders = {"clip": clip_config, "prior": prior_config, "decoder": decoder_config,
                "upsampler": upsampler_config, "ar_prior": ar_prior_config}
    config = builders[variant]()
    if "tiny" in options:
        _tiny_overrides(config, variant)
    if "fast" in options:
        fast_config(variant, config)
    config.lock()
    return config
