"""CLIP image-encoding throughput at ViT-B/32 shape, alone and inside the embedding-cache writer.

    python benchmarks/embed.py [--batch_size 64] [--num_batches 4]

Prints one JSON object: images/s of the jitted float32 image tower (random weights, this project's
CLIP module, batch 64 at 224 px, uint8 normalised on device); of the image + text towers (what the
cache computes per example); and of `embedding_cache.build_cache` end to end with that encoder
(reading examples, batching, encoding, serialising, writing array_record chunks), once with images
already at 224 px and once from 256 x 320 JPEG bytes (decode, resize, crop on its threads).
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import machine_info  # noqa: E402
from unclip_jax.data import embedding_cache  # noqa: E402
from unclip_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from unclip_jax.models import clip as clip_lib  # noqa: E402
from unclip_jax.stages import clip as clip_stage  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 64, "Images per encoder call.")
flags.DEFINE_integer("num_batches", 4, "Timed batches per measurement (after one warm-up).")
flags.DEFINE_integer("image_size", 224, "Input side (ViT-B/32: 224).")
flags.DEFINE_integer("num_threads", 4, "Cache-writer threads reading and decoding examples.")

CAPTIONS = ["a photo of a cat", "a red bicycle leaning on a wall", "two dogs playing in the snow",
            "an aerial view of a city at night", "a bowl of soup with bread on a table"]


def vit_b32(image_size: int) -> clip_lib.CLIP:
    """OpenAI CLIP ViT-B/32's shape (151M parameters)."""
    return clip_lib.CLIP(embed_dim=512, image_size=image_size, patch_size=32, vision_width=768,
                         vision_depth=12, vision_heads=12, vocab_size=49408, context_length=77,
                         text_width=512, text_depth=12, text_heads=8, activation="quick_gelu",
                         eot_pooling="eot_id", eot_token_id=49407)


def _rate(fn, num_batches: int, batch_size: int) -> float:
    jax.block_until_ready(fn())  # Warm-up (and compile).
    t0 = time.perf_counter()
    for _ in range(num_batches):
        out = fn()
    jax.block_until_ready(out)
    return num_batches * batch_size / (time.perf_counter() - t0)


def _jpeg(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main(argv):
    del argv
    b, side = FLAGS.batch_size, FLAGS.image_size
    model = vit_b32(side)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (b, side, side, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_lib.train_tokenizer(CAPTIONS * 4, os.path.join(tmp, "tok"), vocab_size=1024)
        tokenizer = tokenizer_lib.Tokenizer.from_dir(os.path.join(tmp, "tok"), context_length=77)
        tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(b)])
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, side, side, 3)),
                                     jnp.zeros((1, 77), jnp.int32))["params"]
        num_params = int(sum(x.size for x in jax.tree.leaves(params)))

        @jax.jit
        def encode_images(params, images):
            return model.apply({"params": params}, clip_stage.normalize(images), method=model.encode_image)

        @jax.jit
        def encode_both(params, images, tokens):
            z_i = model.apply({"params": params}, clip_stage.normalize(images), method=model.encode_image)
            z_t, hidden = model.apply({"params": params}, tokens, return_hidden=True,
                                      method=model.encode_text)
            return z_i, z_t, hidden.astype(jnp.float16)

        device_images = jax.device_put(images)
        device_tokens = jax.device_put(tokens)
        image_rate = _rate(lambda: encode_images(params, device_images), FLAGS.num_batches, b)
        both_rate = _rate(lambda: encode_both(params, device_images, device_tokens), FLAGS.num_batches, b)

        def encode_fn(batch, captions):
            ids = tokenizer(list(captions))
            z_i, z_t, hidden = encode_both(params, batch, ids)
            return {"z_i": np.asarray(z_i), "z_t": np.asarray(z_t), "text_hidden": np.asarray(hidden),
                    "tokens": ids}

        n = FLAGS.num_batches * b
        metadata = {"embed_dim": 512, "context_length": 77, "text_width": 512}
        big = rng.integers(0, 256, (8, 256, 320, 3), np.uint8)
        jpegs = [_jpeg(im) for im in big]
        sources = {
            "preresized": [{"image": images[i % b], "caption": CAPTIONS[i % 5]} for i in range(n)],
            "jpeg_256x320": [{"image": jpegs[i % 8], "caption": CAPTIONS[i % 5]} for i in range(n)],
        }
        cache_rates = {}
        for name, source in sources.items():
            t0 = time.perf_counter()
            embedding_cache.build_cache(source, encode_fn, os.path.join(tmp, name), "train",
                                        chunk_size=2 * b, batch_size=b, metadata=metadata,
                                        image_size=side, num_threads=FLAGS.num_threads)
            cache_rates[name] = n / (time.perf_counter() - t0)

    print(json.dumps({
        "benchmark": "clip_image_encoding",
        "shape": "ViT-B/32 (random weights), float32", "params": num_params,
        "batch_size": b, "image_size": side, "timed_batches": FLAGS.num_batches,
        "images_per_sec_image_tower": round(image_rate, 2),
        "images_per_sec_image_and_text_towers": round(both_rate, 2),
        "images_per_sec_cache_writer_preresized": round(cache_rates["preresized"], 2),
        "images_per_sec_cache_writer_jpeg_256x320": round(cache_rates["jpeg_256x320"], 2),
        "machine": machine_info(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }, indent=1))


if __name__ == "__main__":
    app.run(main)
