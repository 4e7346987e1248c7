"""Parity with transformers' torch CLIPModel: an imported random CLIP gives the same embeddings.

A small random `CLIPModel` is saved by transformers (safetensors), imported here, and both run on
the same token ids and the same images; each side preprocesses the images with its own code (ours:
`ClipTask.decode` + `normalize`; theirs: `CLIPImageProcessor`, Pillow backend). Needs the
`[parity]` extra (CPU torch); skipped without torch.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from configs import clip_vit_l14  # noqa: E402
from tests import numerics  # noqa: E402
from tests.convert import hf_fixtures  # noqa: E402
from unclip_jax.convert import hf_clip  # noqa: E402
from unclip_jax.data import images as image_lib  # noqa: E402
from unclip_jax.stages import load  # noqa: E402

# Odd sides, upscaling, and long sides that round differently from nearest (41 * 37 / 29 = 52.3).
IMAGE_SHAPES = [(29, 41), (64, 64), (20, 33), (70, 35), (38, 37)]


def _images(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for h, w in IMAGE_SHAPES:
        # Smooth content plus noise, so resampling matters but nothing is degenerate.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / 5.0 + c) * np.cos(yy / 7.0 - c) for c in range(3)], -1)
        noisy = 127.5 + 90 * base + rng.normal(0, 20, (h, w, 3))
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def _random_clip(hf_dir, *, seed, resize, **config_kwargs):
    """A transformers CLIPModel with every parameter randomised, saved with save_pretrained."""
    from transformers import CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = hf_fixtures.write_tokenizer(hf_dir)
    config = hf_fixtures.clip_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
    model.save_pretrained(hf_dir)  # model.safetensors
    size = config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": resize}, crop_size={"height": size, "width": size},
                          image_mean=[0.45, 0.46, 0.41], image_std=[0.27, 0.26, 0.28]).save_pretrained(hf_dir)
    return model, CLIPImageProcessorPil.from_pretrained(hf_dir), tokenizer


@pytest.mark.parametrize("activation,image_size,patch_size,resize,legacy_eos", [
    ("quick_gelu", 35, 7, 37, True),  # OpenAI style; legacy eos_token_id=2 (argmax pooling)
    ("gelu", 30, 6, 30, False),  # LAION ViT-H style; eos_token_id pooling
])
@pytest.mark.slow
def test_embeddings_and_logits_match_transformers(tmp_path, activation, image_size, patch_size,
                                                  resize, legacy_eos):
    hf_dir = str(tmp_path / "hf")
    hf_model, processor, _ = _random_clip(hf_dir, seed=1, resize=resize, activation=activation,
                                          image_size=image_size, patch_size=patch_size, width=48,
                                          text_width=40, embed_dim=24, depth=2, heads=4,
                                          context_length=20, legacy_eos=legacy_eos, mlp_ratio=4)
    workdir = str(tmp_path / "imported")
    hf_clip.write_clip_workdir(hf_dir, workdir, clip_vit_l14.get_config("clip"))
    trained = load.load_stage(workdir)
    task, params = trained.stage, trained.params
    assert task.model.activation == activation
    assert task.model.eot_pooling == ("argmax" if legacy_eos else "eot_id")

    captions = hf_fixtures.CAPTIONS[:5] + ["a cat", "the lazy dog sitting above a small star " * 3]
    tokens = task.tokenizer(captions)  # the last one is truncated to the context length
    images = _images()
    # Ours: the bytes a data set holds, decoded and preprocessed by ClipTask.
    ours = np.stack([task.decode({"image": image_lib.encode_png(im), "caption": ""})[0]
                     for im in images])
    assert ours.shape == (len(images), image_size, image_size, 3)
    theirs = processor(images=list(images), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(np.asarray(task.normalize(ours)), theirs.permute(0, 2, 3, 1).numpy(),
                               atol=1e-5)

    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)), pixel_values=theirs)
        image_features = hf_model.get_image_features(pixel_values=theirs).pooler_output.numpy()
        text_features = hf_model.get_text_features(
            input_ids=torch.from_numpy(tokens.astype(np.int64))).pooler_output.numpy()

    z_i = task.embed(params, trained.mesh, images=ours)
    z_t = task.embed(params, trained.mesh, tokens=tokens)
    # Two libraries in float32 (oneDNN vs XLA kernels): the same math, round-off apart.
    numerics.assert_close(z_i, out.image_embeds.numpy())
    numerics.assert_close(z_t, out.text_embeds.numpy())

    model, variables = task.model, {"params": params}
    raw_i = model.apply(variables, task.normalize(ours), normalize=False, method=model.encode_image)
    raw_t = model.apply(variables, tokens, normalize=False, method=model.encode_text)
    numerics.assert_close(raw_i, image_features)
    numerics.assert_close(raw_t, text_features)

    a, b, logit_scale = model.apply(variables, task.normalize(ours), tokens)
    logits_per_image = float(logit_scale) * np.asarray(a) @ np.asarray(b).T
    numerics.assert_close(logits_per_image, out.logits_per_image.numpy())
