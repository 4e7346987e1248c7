"""End-to-end parity with diffusers' `UnCLIPPipeline` (Kakao Brain's Karlo): the three stages'
Karlo-mode sample bodies, on converted tiny random components, reproduce the pipeline's prior
embedding, decoder image and super-resolved image from the same noise.

Components: a tiny random `PriorTransformer`, `UnCLIPTextProjModel` + `UNet2DConditionModel`
(decoder), two `UNet2DModel`s (super_res_first / super_res_last), at Karlo's block types
(`tests/convert/karlo_tiny.py`), converted by `unclip_jax.convert.karlo_prior` / `karlo_unet` into
stages built by `stages.load.build_stage` from Karlo-mode configs (`diffusion.sampler="karlo"`).
The CLIP text encoder is not under test: a tiny random torch `CLIPTextModelWithProjection`
encodes the captions (handed to the pipeline as `text_model_output` / `text_attention_mask`) and
the empty caption (the pipeline tokenizes and encodes "" itself for guidance; the JAX side gets
the same arrays from the same tokenizer and encoder).

Noise: the pipeline runs with a fixed torch generator; every draw it makes (the initial latents in
`prepare_latents`, the per-step noise in `UnCLIPScheduler.step`) is recorded by wrapping the
`randn_tensor` those modules call, and the JAX stages replay them (`x_T`, `step_noise`).

Schedulers: as in tests/diffusion/test_unclip_scheduler.py, the strict comparison runs diffusers'
unchanged scheduler code on float64 tables (its float32 tables lose ~1e-3 relative in the last
step, see there), so what remains is float32 model round-off between two libraries; the stock
float32 schedulers are compared with a bound of their own table error.
"""
import functools

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pipeline_unclip = pytest.importorskip("diffusers.pipelines.deprecated.unclip.pipeline_unclip")
scheduling_unclip = pytest.importorskip("diffusers.schedulers.scheduling_unclip")

from tests.convert import hf_fixtures, karlo_tiny  # noqa: E402
from tests.convert.karlo_tiny import D, DECODER, SUPER_RES, TEXT_PROJ  # noqa: E402
from tests.diffusion.test_unclip_scheduler import _scheduler as unclip_scheduler  # noqa: E402
from unclip_jax.convert import karlo_prior, karlo_unet  # noqa: E402
from unclip_jax.diffusion import unclip  # noqa: E402
from unclip_jax.stages import load  # noqa: E402

L = 7  # caption length (the tokenizer's model_max_length = the prior's num_embeddings)
B = 2  # captions
PRIOR = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=D,
             num_embeddings=L, additional_embeddings=4)
DECODER_TINY = dict(DECODER, sample_size=8)  # 8 px "64 px" decoder ...
SUPER_RES_TINY = dict(SUPER_RES, sample_size=16)  # ... and a 2x "256 px" super-resolution
PRIOR_SCALE, DECODER_SCALE = 4.0, 8.0  # UnCLIPPipeline's (Karlo's) defaults
TOLERANCE = 1e-3  # required of the images; measured: ~1e-5 (the prior: ~3e-6, asserted < 1e-4)


# ---------------------------------------------------------------------------------------------
# The diffusers side.
# ---------------------------------------------------------------------------------------------
def _tokenizer(directory):
    """A CLIP tokenizer (byte-level BPE in CLIP's layout, trained on shapes captions) at context L."""
    from transformers import CLIPTokenizer

    hf_fixtures.write_tokenizer(str(directory))
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=L)


def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(5)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=D, intermediate_size=2 * D,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=L,
                            projection_dim=D, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    tokenizer = _tokenizer(tmp_path_factory.mktemp("karlo_tokenizer"))
    prior, _, prior_state = karlo_tiny.random_prior(10, PRIOR)
    return dict(
        tokenizer=tokenizer, text_encoder=_text_encoder(tokenizer), prior=prior,
        prior_state=prior_state,
        decoder=karlo_tiny.randomise(UNet2DConditionModel(**DECODER_TINY), seed=11),
        text_proj=karlo_tiny.randomise(UnCLIPTextProjModel(**TEXT_PROJ), seed=12),
        super_res_first=karlo_tiny.randomise(UNet2DModel(**SUPER_RES_TINY), seed=13),
        super_res_last=karlo_tiny.randomise(UNet2DModel(**SUPER_RES_TINY), seed=14))


def _encode(c, input_ids, mask):
    """(text_embeds [N, D], last_hidden_state [N, L, D], mask bool [N, L]) as numpy."""
    with torch.no_grad():
        out = c["text_encoder"](torch.as_tensor(input_ids))
    return (out.text_embeds.numpy(), out.last_hidden_state.numpy(), np.asarray(mask, bool))


def _captions(c):
    """Two captions' token ids (random words, then end of text, then padding) and masks."""
    tok = c["tokenizer"]
    rng = np.random.default_rng(0)
    ids = np.full((B, L), tok.pad_token_id, np.int64)
    mask = np.zeros((B, L), bool)
    for row, n in enumerate((3, 5)):  # words per caption
        ids[row, :n + 2] = [tok.bos_token_id, *rng.integers(5, 40, n), tok.eos_token_id]
        mask[row, :n + 2] = True
    return _encode(c, ids, mask)


def _empty_caption(c):
    """The empty caption exactly as UnCLIPPipeline._encode_prompt tokenizes and encodes it."""
    tok = c["tokenizer"]
    inputs = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                 return_tensors="pt")
    return _encode(c, inputs.input_ids, inputs.attention_mask.numpy().astype(bool))


class _Recorder:
    """Wraps a `randn_tensor`: records every draw (in call order, with its origin)."""

    def __init__(self, draws, origin, fn):
        self.draws, self.origin, self.fn = draws, origin, fn

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.draws.append((self.origin, out.detach().numpy().copy()))
        return out


def _run_pipeline(c, text, monkeypatch, *, exact, scales=(PRIOR_SCALE, DECODER_SCALE)):
    """UnCLIPPipeline on the components: (prior z_i, decoder image, final image in [-1, 1], draws),
    images NHWC; `exact` puts float64 tables in its schedulers; `scales`: the guidance scales;
    `text`: the captions' encodings (`_captions`), or a list of prompts the pipeline encodes."""
    pipe = diffusers.UnCLIPPipeline(
        prior=c["prior"], decoder=c["decoder"], text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"], text_proj=c["text_proj"], super_res_first=c["super_res_first"],
        super_res_last=c["super_res_last"],
        prior_scheduler=unclip_scheduler("prior", exact),
        decoder_scheduler=unclip_scheduler("decoder", exact),
        super_res_scheduler=unclip_scheduler("super_res", exact))
    pipe.set_progress_bar_config(disable=True)
    draws, seen = [], {}
    monkeypatch.setattr(pipeline_unclip, "randn_tensor",
                        _Recorder(draws, "latents", pipeline_unclip.randn_tensor))
    monkeypatch.setattr(scheduling_unclip, "randn_tensor",
                        _Recorder(draws, "step", scheduling_unclip.randn_tensor))
    proj_forward, interpolate = c["text_proj"].forward, torch.nn.functional.interpolate

    def text_proj(*args, image_embeddings, **kwargs):  # the prior's output, as the decoder gets it
        seen["z_i"] = image_embeddings.numpy().copy()
        return proj_forward(*args, image_embeddings=image_embeddings, **kwargs)

    @functools.wraps(interpolate)  # (keeps the signature: the pipeline asks it for `antialias`)
    def resize(image, *args, **kwargs):  # the decoder's (clamped) output, before the upsampling
        if kwargs.get("mode") == "bicubic":  # (the UNets' own upsampling is nearest)
            assert "decoded" not in seen
            seen["decoded"] = karlo_tiny.nhwc(image).copy()
        return interpolate(image, *args, **kwargs)

    monkeypatch.setattr(c["text_proj"], "forward", text_proj)
    monkeypatch.setattr(torch.nn.functional, "interpolate", resize)
    if isinstance(text[0], str):
        inputs = {"prompt": list(text)}
    else:
        z_t, hidden, mask = (torch.from_numpy(a) for a in text)
        inputs = {"text_model_output": (z_t, hidden), "text_attention_mask": mask}
    try:
        out = pipe(**inputs, generator=torch.Generator().manual_seed(0), output_type="np",
                   prior_guidance_scale=scales[0], decoder_guidance_scale=scales[1])
    finally:
        monkeypatch.undo()
    return seen["z_i"], seen["decoded"], out.images * 2.0 - 1.0, draws


def _stage_noise(draws):
    """The recorded draws split per stage: {stage: (x_T, step_noise)}, JAX layout (NHWC)."""
    steps = {s: unclip.KARLO_STAGES[s].num_inference_steps for s in unclip.KARLO_STAGES}
    out, k = {}, 0
    for stage in ("prior", "decoder", "super_res"):
        origin, x_T = draws[k]
        assert origin == "latents"
        noise = [a for _, a in draws[k + 1:k + steps[stage]]]
        assert [o for o, _ in draws[k + 1:k + steps[stage]]] == ["step"] * (steps[stage] - 1)
        k += steps[stage]
        layout = (lambda a: a.transpose(0, 2, 3, 1)) if x_T.ndim == 4 else (lambda a: a)
        out[stage] = (layout(x_T), np.stack([layout(a) for a in noise]))
    assert k == len(draws)
    return out


# ---------------------------------------------------------------------------------------------
# The JAX side: Karlo-mode stages from the converted components.
# ---------------------------------------------------------------------------------------------
def _config(stage, model, diffusion, **extra):
    return ml_collections.ConfigDict({"stage": stage, "model": model,
                                      "diffusion": {"sampler": "karlo", **diffusion}, **extra})


@pytest.fixture(scope="module")
def stages(components):
    """{name: (stage, params)} of the converted prior, decoder and super-resolution."""
    c, tok = components, components["tokenizer"]
    prior_cfg = dict(c["prior"].config)
    prior = load.build_stage(
        _config("prior", {**karlo_prior.prior_config(prior_cfg), "scan_layers": True,
                          "remat_policy": "none"},
                {"guidance_scale": PRIOR_SCALE, "best_of": 1}),
        {**karlo_prior.prior_sizes(prior_cfg), "eot_token_id": tok.eos_token_id})
    prior_params = karlo_prior.convert_prior(c["prior_state"], prior_cfg, scan_layers=True)

    unet_cfg, proj_cfg = dict(c["decoder"].config), dict(c["text_proj"].config)
    decoder = load.build_stage(
        _config("decoder", karlo_unet.decoder_config(unet_cfg, proj_cfg),
                {"guidance_scale": DECODER_SCALE, "learned_variance": True}),
        {"clip_dim": D, "text_length": L, "vocab_size": len(tok), "eot_token_id": tok.eos_token_id})
    decoder_params = karlo_unet.convert_decoder(karlo_tiny.state(c["decoder"]),
                                                karlo_tiny.state(c["text_proj"]), unet_cfg,
                                                proj_cfg)

    sr_cfg = dict(c["super_res_first"].config)
    side, low = SUPER_RES_TINY["sample_size"], DECODER_TINY["sample_size"]
    upsampler = load.build_stage(
        _config("upsampler", karlo_unet.super_res_config(sr_cfg), {"learned_variance": False},
                data={"side": side, "scale": side // low, "crop_size": side}), {})
    upsampler_params = {name: karlo_unet.convert_super_res(karlo_tiny.state(c[f"super_res_{name}"]),
                                                           sr_cfg)
                        for name in ("first", "last")}
    params = (prior_params, decoder_params, upsampler_params)
    for stage, p in zip((prior, decoder, upsampler), params):  # the trees init_params describes
        abstract = nn.meta.unbox(jax.eval_shape(stage.init_params, jax.random.key(0)))
        assert jax.tree.map(np.shape, p) == jax.tree.map(np.shape, abstract)
    return {"prior": (prior, prior_params), "decoder": (decoder, decoder_params),
            "super_res": (upsampler, upsampler_params)}


_SAMPLERS = {}  # (guidance scales) -> the jitted sample bodies (compiled once per module)


def _run_stages(stages, text, uncond, noise, *, scales=(PRIOR_SCALE, DECODER_SCALE)):
    """The three Karlo-mode sample bodies chained as the pipeline chains its stages."""
    prior, prior_params = stages["prior"]
    decoder, decoder_params = stages["decoder"]
    upsampler, upsampler_params = stages["super_res"]
    if scales not in _SAMPLERS:
        _SAMPLERS[scales] = (
            jax.jit(prior.sample_body(guidance_scale=scales[0], best_of=1, sampler="karlo")),
            jax.jit(decoder.sample_body(guidance_scale=scales[1])),
            jax.jit(upsampler.sample_body()))
    sample_prior, sample_decoder, sample_super_res = _SAMPLERS[scales]
    z_i = sample_prior(prior_params, *text, *uncond, None, *noise["prior"])
    decoded = sample_decoder(decoder_params, z_i, *text, *uncond, None, *noise["decoder"])
    final = sample_super_res(upsampler_params, decoded, None, *noise["super_res"])
    return np.asarray(z_i), np.asarray(decoded), np.asarray(final)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------
def _diffs(ours, theirs):
    return {stage: _max_diff(a, b) for stage, a, b in zip(("prior", "decoder", "super_res"),
                                                          ours, theirs)}


def test_stages_sample_as_unclip_pipeline(components, stages, monkeypatch):
    """Prior embedding, decoder image and final image equal the pipeline's (float64 scheduler
    tables on its side, the same noise), stage by stage along the chain; with its stock float32
    tables the pipeline moves away from both by the same amount (its table round-off)."""
    text, uncond = _captions(components), _empty_caption(components)
    assert uncond[2].sum() == 2  # "" is <|startoftext|> <|endoftext|>
    *exact, draws = _run_pipeline(components, text, monkeypatch, exact=True)
    noise = _stage_noise(draws)
    ours = _run_stages(stages, text, uncond, noise)
    diffs = _diffs(ours, exact)
    print("\nmax |ours - diffusers (float64 tables)| per stage:", diffs)
    z_i, decoded, final = ours
    assert final.shape == (B, 16, 16, 3) and decoded.shape == (B, 8, 8, 3) and z_i.shape == (B, D)
    # Not degenerate: the prior's output is denormalised (not unit), the images use their range.
    assert np.all(np.abs(np.linalg.norm(z_i, axis=-1) - 1.0) > 0.1)
    assert np.abs(exact[1]).max() > 0.5 and np.abs(exact[2]).max() > 0.5
    assert diffs["prior"] < 1e-4 and max(diffs.values()) < TOLERANCE, diffs

    # The sampling is sensitive to what the unconditional half sees: the caption's own encoding
    # there (guidance off in effect) is far from the pipeline.
    off = _diffs(_run_stages(stages, text, text, noise), exact)
    assert off["prior"] > 1e-2 and off["super_res"] > 1e-2, off

    *stock, stock_draws = _run_pipeline(components, text, monkeypatch, exact=False)
    for (origin, a), (origin_b, b) in zip(draws, stock_draws, strict=True):
        assert origin == origin_b
        np.testing.assert_array_equal(a, b)  # the tables do not change the draws
    tables = _diffs(stock, exact)  # diffusers' own float32-table error
    stock_diffs = _diffs(ours, stock)
    print("max |ours - diffusers (stock float32 tables)| per stage:", stock_diffs,
          "diffusers float32 vs float64 tables:", tables)
    for stage in tables:
        assert stock_diffs[stage] <= tables[stage] + 1e-4, (stage, stock_diffs, tables)


def test_unguided_stages_sample_as_unclip_pipeline(components, stages, monkeypatch):
    """Both guidance scales 1: the pipeline runs the conditional batch alone (it encodes no empty
    caption), as the sample bodies do at scale 1."""
    text, uncond = _captions(components), _empty_caption(components)
    *exact, draws = _run_pipeline(components, text, monkeypatch, exact=True, scales=(1.0, 1.0))
    ours = _run_stages(stages, text, uncond, _stage_noise(draws), scales=(1.0, 1.0))
    diffs = _diffs(ours, exact)
    print("\nunguided: max |ours - diffusers (float64 tables)| per stage:", diffs)
    assert diffs["prior"] < 1e-4 and max(diffs.values()) < TOLERANCE, diffs


def test_best_of_picks_among_the_candidates(components, stages):
    """best_of = k > 1 (not Karlo's default): k candidates per caption (rows of x_T), the one with
    the highest dot product with z_t kept; each candidate is the best_of = 1 sample of its noise."""
    prior, params = stages["prior"]
    text, uncond = _captions(components), _empty_caption(components)
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((2 * B, D)).astype(np.float32)  # candidates 2b, 2b + 1 of caption b
    noise = rng.standard_normal((24, 2 * B, D)).astype(np.float32)
    best = jax.jit(prior.sample_body(guidance_scale=PRIOR_SCALE, best_of=2, sampler="karlo"))(
        params, *text, *uncond, None, x_T, noise)
    rep = [np.repeat(a, 2, axis=0) for a in text]
    single = jax.jit(prior.sample_body(guidance_scale=PRIOR_SCALE, best_of=1, sampler=None))(
        params, *rep, *uncond[:2], uncond[2], None, x_T, noise)  # uncond batch 1: broadcast
    candidates = np.asarray(single).reshape(B, 2, D)
    pick = np.argmax(np.einsum("bkd,bd->bk", candidates, text[0]), axis=1)
    np.testing.assert_allclose(best, candidates[np.arange(B), pick], rtol=0, atol=1e-5)


def _rebuilt(stage, **changes):
    """The stage rebuilt from its config with `changes` ({"model.x": v, "diffusion.y": v})."""
    config = ml_collections.ConfigDict(stage.config.to_dict())
    for path, value in changes.items():
        block, name = path.split(".")
        config[block][name] = value
    return load.build_stage(config, stage.sizes)


def test_karlo_mode_checks_its_config_and_entry_points(stages):
    prior, _ = stages["prior"]
    decoder, _ = stages["decoder"]
    upsampler, up_params = stages["super_res"]
    assert prior.karlo and decoder.karlo and upsampler.karlo
    assert prior.sample_schedule.num_steps == 25 and upsampler.sample_schedule.num_steps == 7
    # The model options the converters set are required.
    with pytest.raises(ValueError, match="null_conditioning=False and embedding_stats=True"):
        _rebuilt(prior, **{"model.null_conditioning": True})
    with pytest.raises(ValueError, match="clip_text_width > 0"):
        _rebuilt(decoder, **{"model.clip_text_width": 0})
    with pytest.raises(ValueError, match="bicubically"):
        _rebuilt(upsampler, **{"model.low_res_resize": "bilinear"})
    # Settings that contradict Karlo's sampling, each listed.
    with pytest.raises(ValueError, match=r"diffusion.schedule='linear' \(Karlo's decoder: "
                                         r"'cosine'\); diffusion.param='v' \(Karlo's decoder: 'eps'\)"):
        _rebuilt(decoder, **{"diffusion.param": "v", "diffusion.schedule": "linear"})
    with pytest.raises(ValueError, match="diffusion.residual=True"):
        _rebuilt(upsampler, **{"diffusion.residual": True})
    # Steps: a number of inference steps (config or argument), not a respacing spec.
    assert _rebuilt(prior, **{"diffusion.sample_steps": "10"}).sample_schedule.num_steps == 10
    with pytest.raises(ValueError, match="not a respacing spec"):
        decoder.sample_body(guidance_scale=DECODER_SCALE, steps="ddim25")
    # Only Karlo's own sampler (and the decoder's DDIM, for the manipulations).
    for stage, kwargs in ((prior, dict(guidance_scale=4.0, best_of=1, sampler="ddpm")),
                          (decoder, dict(guidance_scale=8.0, sampler="dpm++2m")),
                          (upsampler, dict(sampler="ddpm"))):
        with pytest.raises(ValueError, match="is in Karlo mode"):
            stage.sample_body(**kwargs)
    decoder.sample_body(guidance_scale=8.0, sampler="ddim", eta=0.5)
    decoder.invert_body(guidance_scale=8.0)
    # Only the decoder trains (fine-tuning, given the empty caption's encodings); no token-based
    # entry points.
    for stage in (prior, upsampler):
        with pytest.raises(ValueError, match="Karlo mode"):
            stage.loss(None, {}, jax.random.key(0))
    with pytest.raises(ValueError, match="Karlo-mode training needs the empty caption"):
        decoder.loss(None, {}, jax.random.key(0))
    with pytest.raises(ValueError, match="Karlo mode"):
        decoder.guided_model_fn(None, None, None, 2.0)
    # The super-resolution needs both UNets' params.
    with pytest.raises(ValueError, match="'first': super_res_first"):
        upsampler.sample_body()(up_params["first"], np.zeros((1, 8, 8, 3), np.float32),
                                jax.random.key(0))
