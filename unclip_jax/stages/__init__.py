"""The stages of unCLIP, one module each: the model built from explicit sizes, its loss, its samplers.

    clip.ClipStage            CLIP towers, preprocessing, the contrastive loss, embedding
    prior.PriorStage          the diffusion prior: loss, guided sampling, best-of-k
    ar_prior.ARPriorStage     the autoregressive prior: PCA codes, cross-entropy, KV-cached sampling
    decoder.DecoderStage      the z_i-conditioned UNet: loss, guided sampling, DDIM inversion
    upsampler.UpsamplerStage  the conv-only super-resolution UNets
    load                      rebuild a stage from its workdir and restore only its params

Nothing here reads data sets, builds optimisers or runs training: the training tasks
(`unclip_jax/tasks/`) call these for their loss and evaluation, and the pipeline and the
manipulations use them with `load.load_stage`.
"""
