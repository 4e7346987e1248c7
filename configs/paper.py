"""unCLIP at the paper's sizes (Ramesh et al. 2022, App. C, Table 3), on your own image-text shards.

    python train.py --config configs/paper.py:decoder,v5p256 --workdir gs://bucket/paper_decoder \
        --config.data.shards='gs://bucket/shards/{00000..09999}.tar'
    python benchmarks/compile_only.py --config configs/paper.py:decoder,v5p256 --topology v5p-256

Variants (the part after `:`), each the paper's model and optimiser settings:
  `clip`         ViT-H/16 at 256 px (width 1280, 32 blocks) + text 1024 x 24, trained contrastively.
  `prior`        the 1B diffusion prior: causal transformer 2048 x 24, 32 heads, text context 256.
  `ar_prior`     the 1B autoregressive prior: text encoder 2048 x 24 x 32 heads over 256 tokens,
                 causal latent decoder 1664 x 24 x 26 heads over 384 positions, 319 PCA codes of
                 1024 buckets.
  `decoder`      the 3.5B GLIDE decoder at 64 px: ADM UNet base 512, mults 1,2,3,4, 3 res blocks,
                 head channels 64, attention at 32/16/8, text transformer 2048 x 24 x 32 heads.
  `upsampler64`  700M, 64 -> 256: base 320, mults 1,2,3,4, 3 res blocks, blur, cosine, 64 px crops.
  `upsampler256` 300M, 256 -> 1024: base 192, mults 1,1,2,2,4,4, 2 res blocks, BSR, linear, 256 px crops.

Options after the variant, comma-separated:
  `tiny`    the same structure at test size (every width, depth and batch shrunk).
  `v5p256`  mesh, sharding rules and remat that fit a TPU v5p-256 slice (128 chips, 95 GiB each).
  `v5e256`  the same for TPU v5e-256 (256 chips, 16 GiB each).
  `gpu8`    one node of 8 80 GB GPUs (H100 / A100-80G), with gradient accumulation.
Without a topology option the mesh is plain data parallelism over every device.

The prior and decoder read the embedding cache of the CLIP in `clip_workdir` (`embed.py`); its
sizes (`clip_sizes`) are the paper CLIP's and let `benchmarks/compile_only.py` build a stage with no
CLIP on disk. The data come from WebDataset shards (img2dataset's output) or a captioned folder, as
in `configs/clip_vit_l14.py`.
"""
from __future__ import annotations

import ml_collections

from configs import clip_vit_l14, shapes

VARIANTS = ("clip", "prior", "decoder", "upsampler64", "upsampler256", "ar_prior")
TOPOLOGIES = ("v5p256", "v5e256", "gpu8")
OPTIONS = ("tiny",) + TOPOLOGIES
CLIP_WORKDIR = "runs/paper_clip"


def _parse_arg(arg: str | None) -> tuple[str, set[str]]:
    return shapes.parse_variant(arg, where="configs/paper.py", variants=VARIANTS, options=OPTIONS,
                                exclusive=TOPOLOGIES, default="decoder")


def clip_sizes(*, embed_dim: int = 1024, text_length: int = 256, text_width: int = 1024,
               vocab_size: int = 49408) -> ml_collections.ConfigDict:
    """The CLIP the generative stages are conditioned on (what its workdir would report); the
    defaults are the paper CLIP's."""
    s = ml_collections.ConfigDict()
    s.embed_dim = embed_dim  # z_i / z_t width (ViT-H: 1024).
    s.text_length = text_length  # Caption tokens (paper: text context 256).
    s.text_width = text_width  # Width of the CLIP text tower's hidden states (prior input).
    s.vocab_size = vocab_size  # Tokenizer ids (OpenAI's BPE: 49408).
    s.eot_token_id = s.vocab_size - 1  # End-of-text id (OpenAI's BPE: 49407).
    return s


def _paper_train(*, batch_size, num_steps, learning_rate, weight_decay, b2, eps, ema_decay):
    return shapes.train_config(
        batch_size=batch_size, num_steps=num_steps, learning_rate=learning_rate,
        warmup_steps=10_000, weight_decay=weight_decay, b2=b2, eps=eps, ema_decay=ema_decay,
        log_every=100, checkpoint_every=5_000)


def clip_config() -> ml_collections.ConfigDict:
    """The paper's CLIP: ViT-H/16 at 256 px and a 1024 x 24 causal text tower (App. C)."""
    c = ml_collections.ConfigDict()
    c.stage = "clip"  # Which task trains (unclip_jax/tasks/<stage>.py).
    c.seed = 0  # Model init and training RNG seed.
    c.data = clip_vit_l14.data_config()
    sizes = clip_sizes()
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.dir = "tokenizers/openai_clip"  # HF CLIP tokenizer directory (OpenAI's BPE).
    c.tokenizer.vocab_size = sizes.vocab_size  # Ids of that tokenizer.
    c.tokenizer.context_length = sizes.text_length  # Text tokens per caption.
    c.model = ml_collections.ConfigDict()
    c.model.embed_dim = sizes.embed_dim  # Shared embedding width (z_i, z_t).
    c.model.image_size = 256  # Input side in pixels.
    c.model.patch_size = 16  # ViT patch side.
    c.model.vision_width = 1280  # ViT width.
    c.model.vision_depth = 32  # ViT blocks.
    c.model.vision_heads = 16  # ViT heads (head width 80).
    c.model.text_width = sizes.text_width  # Text transformer width.
    c.model.text_depth = 24  # Text transformer blocks.
    c.model.text_heads = 16  # Text heads.
    c.model.mlp_ratio = 4.0  # MLP hidden width / width.
    c.model.activation = "gelu"  # MLP activation.
    c.model.dtype = "bfloat16"  # Activations; params stay float32.
    c.model.matmul_dtype = ""  # Projection operand dtype ("" = dtype).
    c.model.scan_layers = True  # nn.scan over blocks (one compiled block).
    c.model.remat_policy = "nothing_saveable"  # Per-block remat.
    # Paper: lr 3e-4 with SAM (rho 0.1; not implemented here), otherwise as OpenAI's CLIP.
    c.train = _paper_train(batch_size=32_768, num_steps=400_000, learning_rate=3e-4, weight_decay=0.2,
                           b2=0.98, eps=1e-6, ema_decay=0.0)
    c.eval = ml_collections.ConfigDict()
    c.eval.num_examples = 1_000  # Images per split for retrieval.
    c.eval.num_candidates = 32  # Captions each image chooses among.
    c.eval.batch_size = 256  # Evaluation batch.
    c.eval.use_ema = False  # Evaluate the raw params (EMA off, as OpenAI's CLIP).
    c.eval.splits = ("validation",)  # Splits evaluated (missing ones are skipped).
    c.eval.probe_train_examples = 0  # The shapes attribute probes do not apply to real data.
    c.mesh = shapes.mesh_config()
    return c


def prior_config() -> ml_collections.ConfigDict:
    """The 1B diffusion prior (Table 3): 2048 x 24, 32 heads over the caption and z_t, z_i."""
    c = shapes.prior_config()
    c.clip_workdir = CLIP_WORKDIR  # The frozen CLIP and its embedding cache (embed.py).
    c.clip_sizes = clip_sizes()
    c.data.num_threads = 8
    c.model.width = 2048  # Transformer width.
    c.model.depth = 24  # Blocks.
    c.model.num_heads = 32  # Heads (head width 64).
    c.model.dtype = "bfloat16"  # Activations; params stay float32.
    c.model.matmul_dtype = ""  # Projection operands ("" = dtype).
    c.model.remat_policy = "nothing_saveable"  # Per-block remat.
    c.diffusion.embedding_scale = 17.2  # Paper: unit z_i times 17.2 (ImageNet pixel variance).
    c.diffusion.sampler = "ddpm"  # Paper: Analytic-DPM; fixed small variance here.
    c.diffusion.sample_steps = 64  # Paper: 64 strided steps.
    c.train = _paper_train(batch_size=4_096, num_steps=600_000, learning_rate=1.1e-4,
                           weight_decay=6e-2, b2=0.96, eps=1e-6, ema_decay=0.9999)
    _prior_eval(c)
    return c


def _prior_eval(c: ml_collections.ConfigDict) -> None:
    """Both priors' evaluation: cosine to the true z_i and retrieval among 32 on 1,000 validation
    captions, next to the nearest of 100,000 training z_i."""
    c.eval.splits = ("validation",)
    c.eval.num_examples = 1_000
    c.eval.num_candidates = 32
    c.eval.num_train_neighbours = 100_000
    c.eval.batch_size = 512


def ar_prior_config() -> ml_collections.ConfigDict:
    """The 1B AR prior (App. C, Table 3): text encoder 2048 x 24 (32 heads) over the caption, a
    causal latent decoder 1664 x 24 (26 heads of 64) over [caption, z_t, dot token, 319 codes].

    The decoder's sequence is 256 + 2 + 319 positions here (the caption's encoded tokens are its
    prefix); the paper's latent context is 384, which the codes and conditioning tokens fit in.
    """
    c = shapes.ar_prior_config()
    c.clip_workdir = CLIP_WORKDIR  # The frozen CLIP and its embedding cache (embed.py).
    c.clip_sizes = clip_sizes()
    c.data.num_threads = 8
    c.model.width, c.model.depth, c.model.num_heads = 1664, 24, 26  # Latent decoder (head width 64).
    c.model.text_encoder_width = 2048  # Text encoder.
    c.model.text_encoder_depth = 24
    c.model.text_encoder_heads = 32
    c.model.dtype = "bfloat16"  # Activations; params stay float32.
    c.model.matmul_dtype = ""  # Projection operands ("" = dtype).
    c.model.remat_policy = "nothing_saveable"  # Per-block remat.
    c.codes.num_components = 319  # Paper: 319 of 1024 principal components ...
    c.codes.num_buckets = 1024  # ... each quantised into 1024 buckets.
    c.codes.fit_examples = 1_000_000  # Embeddings the PCA and quantiles are fitted on.
    c.ar.dot_percentile = 0.5  # Paper: the top half (best of 50/70/85/95%).
    c.train = _paper_train(batch_size=4_096, num_steps=1_000_000, learning_rate=1.6e-4,
                           weight_decay=4e-2, b2=0.91, eps=1e-10, ema_decay=0.999)
    _prior_eval(c)
    return c


def decoder_config() -> ml_collections.ConfigDict:
    """The 3.5B decoder: GLIDE's 64 px UNet (2.3B) + its text transformer (1.2B), z_i conditioning."""
    c = shapes.decoder_config()
    c.clip_workdir = CLIP_WORKDIR  # The frozen CLIP: its data set, tokenizer and embedding cache.
    c.clip_sizes = clip_sizes()
    c.data.num_threads = 16
    unet = shapes.unet_config(base=512, mult=(1, 2, 3, 4), res_blocks=3, attention=(32, 16, 8),
                              image_size=64)
    for key, value in unet.items():
        c.model[key] = value
    c.model.head_channels = 64  # Channels per attention head.
    c.model.clip_spatial = 0  # The paper's conditioning only (no z_i bottleneck map).
    c.model.coord_channels = False  # Not in the paper.
    c.model.dropout = 0.1  # Paper: 0.1.
    c.model.dtype = "bfloat16"  # Activations; params stay float32.
    c.model.remat = True  # Rematerialise every block in the backward pass.
    c.model.text_width = 2048  # GLIDE's caption transformer.
    c.model.text_depth = 24
    c.model.text_heads = 32
    c.diffusion.param = "eps"  # Paper (GLIDE): epsilon with learned sigma (hybrid loss).
    c.diffusion.learned_variance = True
    c.diffusion.sampler = "ddpm"  # Paper: 250 strided steps with the learned variance.
    c.diffusion.sample_steps = 250
    c.diffusion.guidance_scale = 1.25  # Paper Table 2 (MS-COCO FID).
    c.diffusion.z_i_drop_prob = 0.1  # Paper §2.1: z_i dropped 10% of the time.
    c.diffusion.text_drop_prob = 0.5  # Paper: caption dropped 50% of the time.
    c.train = _paper_train(batch_size=2_048, num_steps=800_000, learning_rate=1.2e-4, weight_decay=0.0,
                           b2=0.999, eps=1e-8, ema_decay=0.9999)
    c.eval.splits = ()  # The shapes judge does not apply to real captions.
    return c


def upsampler_config(stage: str) -> ml_collections.ConfigDict:
    """The conv-only upsamplers (Table 3): 64 -> 256 (700M) and 256 -> 1024 (300M)."""
    first = stage == "upsampler64"
    c = shapes.upsampler_config()
    c.data = clip_vit_l14.data_config()
    c.data.side = 256 if first else 1024  # Target side (px).
    c.data.scale = 4  # Upsampling factor.
    c.data.crop_size = c.data.side // 4  # Training crops: a quarter of the target side (paper).
    c.data.corruption = "blur" if first else "bsr"  # Paper: blur (64->256), BSR (256->1024).
    c.data.crop_seed = 0  # Seed of the per-example crops and corruptions.
    base, mult, blocks = (320, (1, 2, 3, 4), 3) if first else (192, (1, 1, 2, 2, 4, 4), 2)
    unet = shapes.unet_config(base=base, mult=mult, res_blocks=blocks, attention=(),
                              image_size=c.data.crop_size)
    for key, value in unet.items():
        c.model[key] = value
    c.model.dropout = 0.1 if first else 0.0  # Paper: 0.1 for 64 -> 256 only.
    c.model.dtype = "bfloat16"  # Activations; params stay float32.
    c.model.remat = True  # Rematerialise every block in the backward pass.
    c.diffusion.schedule = "cosine" if first else "linear"  # Paper: cosine, then linear.
    c.diffusion.residual = False  # Paper: the image itself is diffused.
    c.diffusion.param = "eps"
    c.diffusion.sampler = "ddim"  # Paper: DDIM, 27 and 15 steps.
    c.diffusion.sample_steps = 27 if first else 15
    c.train = _paper_train(batch_size=1_024 if first else 512, num_steps=1_000_000,
                           learning_rate=1.2e-4 if first else 1e-4, weight_decay=0.0, b2=0.999,
                           eps=1e-8, ema_decay=0.9999)
    c.eval.splits = ()  # PSNR and the judge need shapes data; real-data evaluation is separate.
    return c


def _tiny_overrides(c: ml_collections.ConfigDict, variant: str) -> None:
    """The `tiny` option: the same structure at test size (every width, depth and batch shrunk),
    in float32."""
    c.data.num_threads = 2
    c.model.dtype = "float32"
    c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 8, 4, 2
    c.train.log_every, c.train.checkpoint_every = 1, 2
    sizes = clip_sizes(embed_dim=32, text_length=16, text_width=32, vocab_size=1024)
    if variant == "clip":
        c.tokenizer.vocab_size, c.tokenizer.context_length = sizes.vocab_size, sizes.text_length
        c.model.embed_dim, c.model.image_size, c.model.patch_size = sizes.embed_dim, 32, 8
        c.model.vision_width, c.model.vision_depth, c.model.vision_heads = 32, 2, 2
        c.model.text_width, c.model.text_depth, c.model.text_heads = sizes.text_width, 2, 2
        c.eval.num_examples, c.eval.num_candidates, c.eval.batch_size = 16, 4, 16
    elif variant in ("prior", "ar_prior"):
        c.clip_sizes = sizes
        c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
        c.eval.num_examples, c.eval.num_candidates, c.eval.batch_size = 16, 4, 16
        c.eval.num_train_neighbours = 64
        if variant == "ar_prior":
            c.model.text_encoder_width, c.model.text_encoder_depth = 32, 1
            c.model.text_encoder_heads = 2
            c.codes.num_components, c.codes.num_buckets, c.codes.fit_examples = 8, 8, 0
    elif variant == "decoder":
        c.clip_sizes = sizes
        c.model.base_channels, c.model.num_res_blocks, c.model.image_size = 16, 1, 16
        c.model.attention_resolutions = (8, 4, 2)
        c.model.head_channels, c.model.num_groups = 8, 8
        c.model.text_width, c.model.text_depth, c.model.text_heads = 32, 1, 2
        c.diffusion.sample_steps = 8
        c.eval.num_examples, c.eval.batch_size = 16, 16
    else:  # upsampler64: 16 -> 64 px; upsampler256: 32 -> 128 px.
        first = variant == "upsampler64"
        c.data.side = 64 if first else 128
        c.data.crop_size = c.data.side // 4
        c.model.base_channels, c.model.num_res_blocks = (16 if first else 8), 1
        c.model.image_size = c.data.crop_size
        c.model.head_channels, c.model.num_groups = 8, 8
        c.model.remat = False
        c.diffusion.sample_steps = 5
        c.eval.num_examples, c.eval.batch_size = 4, 8


def topology_config(c: ml_collections.ConfigDict, variant: str, topology: str) -> None:
    """Mesh, rules and memory settings that fit `variant` on `topology` (README, compile-only JSON).

    Every stage is fully sharded data parallel (ZeRO-3: params, EMA and Adam state split over all
    chips along `fsdp`), which keeps the per-chip state of the 3.5B decoder (~56 GB in float32)
    under 1 GB on 128 or 256 chips; the per-chip batch is what remains to fit.
    """
    if topology in ("v5p256", "v5e256"):
        c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor): every chip on fsdp.
    if topology == "v5e256" and variant == "decoder":
        # 16 GiB chips: with per-block remat the decoder's temporaries grow ~3.6 GB an example (57 GB
        # for 16 a chip on v5p-256), so the 8 a chip of the paper's batch go as 4 micro-batches of 2.
        c.train.grad_accum_steps = 4
    elif topology == "gpu8":
        c.mesh.shape = (1, 8, 1)
        # 8 GPUs cannot hold the paper's batch at once: accumulate micro-batches, 8 images a GPU
        # for the decoder (16 a GPU compiled to ~87 GiB of 80 in the CPU-backend estimate), 16
        # for the other stages.
        per_step = 8 * (8 if variant == "decoder" else 16)
        c.train.grad_accum_steps = max(1, int(c.train.batch_size) // per_step)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _parse_arg(arg)
    if variant == "clip":
        config = clip_config()
    elif variant == "prior":
        config = prior_config()
    elif variant == "ar_prior":
        config = ar_prior_config()
    elif variant == "decoder":
        config = decoder_config()
    else:
        config = upsampler_config(variant)
    if "tiny" in options:
        _tiny_overrides(config, variant)
    config.variant = variant  # The paper stage this config is (parameter-count targets, README).
    for topology in options & set(TOPOLOGIES):
        topology_config(config, variant, topology)
    config.lock()
    return config
