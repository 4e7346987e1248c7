"""Image manipulations with unCLIP's bipartite latent (z_i, x_T) (paper §3, research notes §1.9).

- `encode`: z_i = the CLIP image embedding; x_T = DDIM inversion of the image through the decoder
  conditioned on z_i (ADM App. F), so that DDIM at eta = 0 from x_T reconstructs the image.
- `variations`: decode the same (z_i, x_T) with DDIM at eta > 0 (eta = 0 reconstructs).
- `interpolate`: z_i slerped between two images, x_T either slerped between their inverted latents
  (the end frames reconstruct the inputs) or one fixed noise for every frame (the paper's Fig. 4).
- `text_diff`: z_theta = slerp(z_i, z_d, theta) toward z_d = norm(z_t(new) - z_t(old)), decoded
  from the inverted x_T (theta = 0 reconstructs the input; the paper goes up to 0.25-0.5).
- `inpaint`: RePaint-style (Lugmayr et al. 2022) sampling with the trained decoder, no training:
  at every ancestral step the known pixels are replaced by the original forward-noised to that
  step, and each step is redone `num_resample` times (re-noising one step between tries) so that
  the generated region harmonises with the known one. z_i comes from the prior for the caption.

The decoder always samples with DDIM here (inversion is a DDIM notion) with the pipeline's
decoder guidance scale and steps; inversion and decoding use the same (guided) model, and unless
captions are given it conditions on z_i alone (the caption replaced by its learned null, as in
the decoder's training). Outputs are uint8, upsampled by the pipeline's upsamplers unless
`upsample=False`.

Imported Karlo stages: the same, with the CLIP's image tower imported beside Karlo's text encoder
(`convert_karlo.py --clip_dir`); z_i is CLIP's projection unnormalised (as Karlo's decoder takes
it): interpolation and text diffs move its direction on the sphere and keep (interpolate) its
norm; "no caption" means the empty caption in both halves of the guidance (Karlo has no learned
null caption).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unclip_jax import pipeline as pipeline_lib
from unclip_jax.diffusion import pixels, samplers
from unclip_jax.pipeline import DecoderSettings, UnCLIPPipeline, check_images, row_keys, slerp

INPAINT_STREAM = 7  # Stream id of inpainting's decoder noise (see pipeline.row_keys).


@dataclasses.dataclass
class Encoded:
    """The bipartite latent of N images: z_i unit [N, D], x_T float32 [N, s, s, 3] (s: decoder side),
    the caption tokens the decoder was conditioned on ([N, L], or None: z_i alone), and the images
    at the decoder's side (uint8 [N, s, s, 3])."""

    z_i: np.ndarray
    x_T: np.ndarray
    tokens: np.ndarray | None
    images: np.ndarray


def _ddim(pipe: UnCLIPPipeline, settings: DecoderSettings | None, eta: float = 0.0) -> DecoderSettings:
    base = settings or pipe.settings.decoder
    return dataclasses.replace(base, sampler="ddim", eta=float(eta))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _on_sphere(pipe: UnCLIPPipeline, z: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """z [N, D] as the decoder takes it: unit, or (Karlo, whose decoder takes CLIP's projections
    unnormalised) scaled to `norms` [N] (the inputs' norms, interpolated)."""
    return _unit(z) * (np.asarray(norms, np.float32)[:, None] if pipe.karlo else 1.0)


def _finish(pipe: UnCLIPPipeline, base: np.ndarray, keys: np.ndarray, upsample: bool) -> np.ndarray:
    return pipe.upsample(base, keys) if upsample and pipe.upsamplers else base


def encode(pipe: UnCLIPPipeline, images, captions: Sequence[str] | None = None, *,
           settings: DecoderSettings | None = None, num_fixed_point_iters: int = 0) -> Encoded:
    """Images uint8 [N, H, W, 3] (any size) -> their (z_i, x_T) (see `Encoded`).

    captions: optional, one per image, for the decoder's caption pathway (None: z_i alone).
    num_fixed_point_iters: refinements of each inversion step (`samplers.ddim_invert`): more
    model calls, closer reconstruction.
    """
    images = check_images(images)
    tokens = None
    if captions is not None:
        captions = list(captions)
        if len(captions) != len(images):
            raise ValueError(f"got {len(captions)} captions for {len(images)} images")
        tokens = pipe.tokenize(captions)
    z_i = pipe.encode_image(images)
    small = pipeline_lib.resize(images, pipe.base_size)
    x_T = pipe.invert(small, z_i, tokens, _ddim(pipe, settings), num_fixed_point_iters=num_fixed_point_iters)
    return Encoded(z_i=z_i, x_T=x_T, tokens=tokens, images=small)


def reconstruct(pipe: UnCLIPPipeline, encoded: Encoded, *, settings: DecoderSettings | None = None,
                upsample: bool = False, seed: int = 0) -> np.ndarray:
    """DDIM (eta = 0) from the inverted x_T: the images back, uint8 [N, S, S, 3]."""
    keys = row_keys(seed, np.arange(len(encoded.z_i)), np.zeros(len(encoded.z_i), int))
    base = pipe.decode(encoded.z_i, encoded.tokens, keys, _ddim(pipe, settings), x_T=encoded.x_T)
    return _finish(pipe, base, keys, upsample)


def variations(pipe: UnCLIPPipeline, images, *, num_variations: int = 4, eta: float = 1.0,
               seed: int = 0, captions: Sequence[str] | None = None,
               settings: DecoderSettings | None = None, upsample: bool = True,
               encoded: Encoded | None = None, first_index: int = 0) -> np.ndarray:
    """`num_variations` variations of each image: uint8 [N, V, S, S, 3].

    Each decodes the image's (z_i, x_T) with DDIM at `eta` > 0 and its own noise: variation v of
    image n uses the row key (first_index + n, v) of `seed` (so a batch of a longer list of images
    passes its offset). `encoded` reuses an earlier `encode` of the same images.
    """
    if not float(eta) > 0:
        raise ValueError(f"eta={eta!r}: variations need eta > 0 (eta = 0 reconstructs the image)")
    if isinstance(num_variations, bool) or int(num_variations) < 1:
        raise ValueError(f"num_variations={num_variations!r}: expected an int >= 1")
    enc = encoded or encode(pipe, images, captions, settings=settings)
    n, v = len(enc.z_i), int(num_variations)
    rep = lambda x: None if x is None else np.repeat(x, v, axis=0)  # noqa: E731
    keys = row_keys(seed, first_index + np.repeat(np.arange(n), v), np.tile(np.arange(v), n))
    base = pipe.decode(rep(enc.z_i), rep(enc.tokens), keys, _ddim(pipe, settings, eta), x_T=rep(enc.x_T))
    out = _finish(pipe, base, keys, upsample)
    return out.reshape((n, v) + out.shape[1:])


def interpolation_thetas(num_frames: int) -> np.ndarray:
    """num_frames evenly spaced fractions from 0 to 1 (both ends)."""
    if isinstance(num_frames, bool) or int(num_frames) < 2:
        raise ValueError(f"num_frames={num_frames!r}: expected an int >= 2")
    return np.linspace(0.0, 1.0, int(num_frames))


def interpolate(pipe: UnCLIPPipeline, image_a, image_b, *, num_frames: int = 8, noise: str = "inverted",
                seed: int = 0, settings: DecoderSettings | None = None, upsample: bool = True,
                captions: Sequence[str] | None = None) -> np.ndarray:
    """Frames between two images: uint8 [num_frames, S, S, 3].

    z_i = slerp(z_i(a), z_i(b), theta), theta from 0 to 1. noise="inverted": x_T slerped between
    the two inverted latents (end frames reconstruct the inputs); noise="fixed": one random x_T
    (from `seed`) for every frame, as the paper's Fig. 4. Decoded with DDIM at eta = 0.
    """
    if noise not in ("inverted", "fixed"):
        raise ValueError(f"noise={noise!r}: expected 'inverted' or 'fixed'")
    thetas = interpolation_thetas(num_frames)
    images = np.concatenate([check_images(image_a), check_images(image_b)])
    if len(images) != 2:
        raise ValueError("interpolate takes one image_a and one image_b ([H, W, 3] each)")
    z_i = pipe.encode_image(images)
    frames_z = slerp(np.repeat(z_i[:1], len(thetas), 0), np.repeat(z_i[1:], len(thetas), 0), thetas)
    norms = np.linalg.norm(z_i, axis=-1)
    frames_z = _on_sphere(pipe, frames_z, (1.0 - thetas) * norms[0] + thetas * norms[1])
    s = pipe.base_size
    if noise == "inverted":
        enc = encode(pipe, images, captions, settings=settings)
        flat = enc.x_T.reshape(2, -1)
        x_T = slerp(np.repeat(flat[:1], len(thetas), 0), np.repeat(flat[1:], len(thetas), 0), thetas)
        x_T = x_T.reshape(len(thetas), s, s, 3)
    else:
        x_T = np.asarray(jax.random.normal(jax.random.key(int(seed)), (1, s, s, 3)), np.float32)
        x_T = np.repeat(x_T, len(thetas), axis=0)
    tokens = None
    if captions is not None:  # The caption pathway follows the nearer end.
        tok = pipe.tokenize(list(captions))
        tokens = tok[(thetas >= 0.5).astype(int)]
    keys = row_keys(seed, np.zeros(len(thetas), int), np.arange(len(thetas)))
    base = pipe.decode(frames_z, tokens, keys, _ddim(pipe, settings), x_T=x_T)
    return _finish(pipe, base, keys, upsample)


def text_diff_direction(pipe: UnCLIPPipeline, caption_from, caption_to) -> np.ndarray:
    """z_d = norm(z_t(caption_to) - z_t(caption_from)): unit [D] for two captions, [N, D] for two
    lists of N captions."""
    single = isinstance(caption_from, str) and isinstance(caption_to, str)
    old = [caption_from] if isinstance(caption_from, str) else list(caption_from)
    new = [caption_to] if isinstance(caption_to, str) else list(caption_to)
    if len(old) != len(new):
        raise ValueError(f"got {len(old)} caption_from but {len(new)} caption_to")
    z_t, _ = pipe.encode_text(pipe.tokenize(old + new))
    z_t = _unit(z_t)  # (Karlo's z_t are not unit)
    d = z_t[len(old):] - z_t[:len(old)]
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    if np.any(norm < 1e-6):
        i = int(np.argmin(norm[:, 0]))
        raise ValueError(f"caption_from={old[i]!r} and caption_to={new[i]!r} have the same text "
                         "embedding: nothing to move toward")
    d = (d / norm).astype(np.float32)
    return d[0] if single else d


def text_diff(pipe: UnCLIPPipeline, images, caption_from, caption_to, *,
              thetas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), seed: int = 0,
              settings: DecoderSettings | None = None, upsample: bool = True,
              encoded: Encoded | None = None, first_index: int = 0) -> np.ndarray:
    """Moves images toward `caption_to` and away from `caption_from`: uint8 [N, len(thetas), S, S, 3].

    caption_from / caption_to: one caption each for every image, or one per image. z_theta =
    slerp(z_i, z_d, theta) (unit), decoded with DDIM at eta = 0 from the image's inverted x_T and
    z_i alone (the caption dropped), so theta = 0 reconstructs the image. The upsamplers' noise of
    frame t of image n uses the row key (first_index + n, t) of `seed`.
    """
    thetas = np.asarray(thetas, np.float64).reshape(-1)
    if thetas.size == 0 or np.any(thetas < 0) or np.any(thetas > 1):
        raise ValueError(f"thetas={list(thetas)}: expected at least one value in [0, 1]")
    enc = encoded or encode(pipe, images, settings=settings)
    n, t = len(enc.z_i), len(thetas)
    z_d = text_diff_direction(pipe, caption_from, caption_to)
    if z_d.ndim == 2 and len(z_d) != n:
        raise ValueError(f"got {len(z_d)} caption pairs for {n} images")
    z_d = np.broadcast_to(z_d, enc.z_i.shape)
    z_i = np.repeat(enc.z_i, t, 0)
    z = _on_sphere(pipe, slerp(_unit(z_i), np.repeat(z_d, t, 0), np.tile(thetas, n)),
                   np.linalg.norm(z_i, axis=-1))
    keys = row_keys(seed, first_index + np.repeat(np.arange(n), t), np.tile(np.arange(t), n))
    base = pipe.decode(z, None, keys, _ddim(pipe, settings), x_T=np.repeat(enc.x_T, t, 0))
    out = _finish(pipe, base, keys, upsample)
    return out.reshape((n, t) + out.shape[1:])


# ---------------------------------------------------------------------------------------------
# Inpainting
# ---------------------------------------------------------------------------------------------
def check_masks(masks, images: np.ndarray) -> np.ndarray:
    """Masks [N, H, W] (or [H, W] for one image; bool, or 0/255 uint8) -> bool, True = regenerate."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim == 4 and masks.shape[-1] in (1, 3):
        masks = masks.max(axis=-1)
    if masks.ndim != 3 or masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be [N, H, W] matching the images {list(images.shape[:3])}, got "
                         f"{list(masks.shape)}")
    return masks > (0 if masks.dtype == bool else 127)


def _downsample_mask(masks: np.ndarray, side: int) -> np.ndarray:
    """A low-res pixel is regenerated when any of the pixels it covers is (box filter > 0)."""
    out = []
    for m in masks:
        img = Image.fromarray(m.astype(np.uint8) * 255).resize((side, side), Image.Resampling.BOX)
        out.append(np.asarray(img) > 0)
    return np.stack(out)


def _repaint_body(decoder, *, guidance_scale: float, steps, num_resample: int, use_text: bool):
    """Per-batch RePaint sampler `(params, rng, x0_known, mask, z_i, tokens) -> x_0 in [-1, 1]`
    with a `stages.decoder.DecoderStage`."""
    diff = decoder.config.diffusion
    schedule = decoder.schedule_for(steps)
    learned = bool(diff.learned_variance)
    n = schedule.num_steps
    sqrt_abar_prev = jnp.sqrt(schedule.alphas_cumprod_prev)
    sqrt_1m_abar_prev = jnp.sqrt(1.0 - schedule.alphas_cumprod_prev)

    def body(params, rng, known, mask, z_i, tokens):
        model_fn = decoder.guided_model_fn(params, z_i, tokens, guidance_scale, drop_text=not use_text)
        mask = mask[..., None].astype(jnp.float32)  # 1 = regenerate.
        noise_rng, rng = jax.random.split(rng)
        x = jax.random.normal(noise_rng, known.shape, jnp.float32)

        def step(k, x):
            i = n - 1 - k

            def attempt(u, x):
                key = jax.random.fold_in(jax.random.fold_in(rng, i), u)
                z1, z2, z3 = (jax.random.normal(k_, x.shape, jnp.float32) for k_ in jax.random.split(key, 3))
                gen = samplers.ddpm_step(model_fn, schedule, x, i, z1, param=diff.param,
                                         learned_variance=learned, clip_x0=1.0)
                kept = sqrt_abar_prev[i] * known + sqrt_1m_abar_prev[i] * z2
                x_prev = mask * gen + (1.0 - mask) * kept
                # Between tries, go back up one step: x_i ~ q(x_i | x_{i-1}).
                beta = schedule.betas[i]
                renoised = jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * z3
                last = (u == num_resample - 1) | (i == 0)
                return jnp.where(last, x_prev, renoised)

            # The last try of each step returns x_{i-1}; the earlier ones a re-noised x_i.
            return jax.lax.fori_loop(0, num_resample, attempt, x)

        return jax.lax.fori_loop(0, n, step, x)

    return body


def inpaint(pipe: UnCLIPPipeline, images, masks, captions: Sequence[str], *, num_per_image: int = 1,
            num_resample: int = 5, seed: int = 0, settings: pipeline_lib.Settings | None = None,
            upsample: bool = True, first_index: int = 0) -> np.ndarray:
    """Regenerates the masked region of each image to fit the rest and its caption (RePaint).

    images uint8 [N, H, W, 3] at the pipeline's output size (or any square size: it is resized);
    masks [N, H, W] bool or uint8 (True / > 127 = regenerate); captions: one per image.
    z_i is sampled by the prior for the caption (result k of image n uses the row key
    (first_index + n, k) of `seed`); the decoder runs the RePaint
    loop (see the module docstring) with the pipeline's decoder guidance and steps and
    `num_resample` tries per step, on the decoder's grid; a decoder pixel is regenerated when any
    pixel it covers is masked. After the upsamplers the known pixels are pasted back at full size.
    Returns uint8 [N, num_per_image, S, S, 3].
    """
    if pipe.karlo:
        raise ValueError("inpainting is not supported with imported Karlo stages (their decoder "
                         "conditions on CLIP text encodings, which RePaint here does not pass)")
    images = check_images(images)
    masks = check_masks(masks, images)
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"got {len(captions)} captions for {len(images)} images")
    if isinstance(num_resample, bool) or int(num_resample) < 1:
        raise ValueError(f"num_resample={num_resample!r}: expected an int >= 1")
    if isinstance(num_per_image, bool) or int(num_per_image) < 1:
        raise ValueError(f"num_per_image={num_per_image!r}: expected an int >= 1")
    settings = settings or pipe.settings
    n, k = len(images), int(num_per_image)
    keys = row_keys(seed, first_index + np.repeat(np.arange(n), k), np.tile(np.arange(k), n))
    rep = lambda x: np.repeat(x, k, axis=0)  # noqa: E731
    tokens = rep(pipe.tokenize(captions))
    z_t, hidden = pipe.encode_text(tokens)
    z_i = pipe.sample_z_i(z_t, hidden, tokens, keys, settings.prior)

    s = pipe.base_size
    small = rep(pipeline_lib.resize(images, s))
    small_mask = rep(_downsample_mask(masks, s))
    dec = pipeline_lib.resolve(settings.decoder, pipe.decoder.config.diffusion)
    key = ("inpaint", INPAINT_STREAM, dec["guidance_scale"], dec["steps"], int(num_resample))
    def build():
        body = _repaint_body(pipe.decoder.stage, guidance_scale=float(dec["guidance_scale"]), steps=dec["steps"],
                             num_resample=int(num_resample), use_text=True)
        return lambda params, rng, known, m, z, tok: pixels.to_uint8(
            body(params, rng, known.astype(jnp.float32) / 127.5 - 1.0, m, z, tok))

    base = pipe.map_rows(pipe.program(key, pipe.decoder, build), pipe.decoder.params, keys,
                         [small, small_mask, z_i, tokens])
    out = _finish(pipe, base, keys, upsample)
    side = out.shape[1]
    full = rep(pipeline_lib.resize(images, side))
    full_mask = rep(np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
        (side, side), Image.Resampling.NEAREST)) > 127 for m in masks]))
    out = np.where(full_mask[..., None], out, full)
    return out.reshape((n, k) + out.shape[1:])
