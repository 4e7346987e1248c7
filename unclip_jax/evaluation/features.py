"""Feature networks of the image-quality metrics: the FID InceptionV3 and any CLIP workdir.

    inception = features.InceptionFeatures("weights/fid_inception.safetensors")
    clip = features.ClipFeatures("runs/clip_vit_l14")
    f = inception.images(images)                  # float32 [N, 2048] (pool3) of uint8 [N, H, W, 3]
    z_i, z_t = clip.images(images), clip.texts(captions)   # unit [N, D]

Both run sharded over a mesh (the batch over the data axes, `parallel.map_batches`) and read
their weights from local files only: the InceptionV3 from the safetensors file that
`convert_inception.py` writes (never a pickle), a CLIP from a trained or imported workdir through
`stages.load`. Each extractor has an `identity` (its name and a SHA-256 of its weights) that is
stored with reference statistics, so that statistics of two different networks are never compared
(`evaluation.frechet`).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from unclip_jax import parallel, paths
from unclip_jax.data import images as image_lib
from unclip_jax.models import inception as inception_lib

INCEPTION_NAME = "inception_v3_fid"  # pytorch-fid's pool3 features.


class WeightsError(ValueError):
    """A feature network's weights file is missing or does not fit the network."""


def weights_hash(arrays: dict[str, Any]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every array in name order: the weights'
    identity, independent of the file format and of how the arrays are sharded."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _flatten(tree: Any) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


@functools.lru_cache(maxsize=4)
def read_inception_weights(path: str) -> tuple[dict[str, np.ndarray], str]:
    """(flat params, weights hash) of a `convert_inception.py` safetensors file, checked against
    the network (every missing, extra or misshapen tensor listed in one WeightsError)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise WeightsError(f"InceptionV3 weights {path} do not exist: convert pytorch-fid's weights "
                           "file once with python convert_inception.py --torch_weights "
                           "pt_inception-2015-12-05-6726825d.pth --output <this path>")
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"InceptionV3 weights {path} are not a readable safetensors file "
                           f"(convert_inception.py writes one): {e}") from e
    expected = inception_lib.param_shapes()
    problems = [f"missing {k} {list(s)}" for k, s in expected.items() if k not in flat]
    problems += [f"{k}: shape {list(flat[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in flat and tuple(flat[k].shape) != s]
    problems += [f"unexpected tensor {k}" for k in flat if k not in expected]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise WeightsError(f"InceptionV3 weights {path} do not fit the FID InceptionV3 "
                           f"({len(problems)} problems):\n  {shown}")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    return flat, weights_hash(flat)


class InceptionFeatures:
    """pool3 features (2048-d) of pytorch-fid's FID InceptionV3, from a safetensors weights file.

    `images(uint8 [N, H, W, 3])` -> float32 [N, 2048]: pixels / 255, bilinear resize to 299 and
    [-1, 1] inside the network (as pytorch-fid does for its `ToTensor()` images).
    """

    dim = inception_lib.FEATURE_DIM

    def __init__(self, weights: str, *, mesh: Mesh | None = None, batch_size: int = 50,
                 rules: Sequence[tuple[str, Any]] = parallel.DEFAULT_RULES):
        from flax import traverse_util

        flat, digest = read_inception_weights(os.path.abspath(os.path.expanduser(weights)))
        self.identity = {"name": INCEPTION_NAME, "weights_sha256": digest}
        self.mesh = mesh if mesh is not None else parallel.make_mesh((-1, 1, 1))
        self.batch_size = int(batch_size)
        self.rules = tuple(rules)
        self.model = inception_lib.InceptionV3()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), np.zeros((1, 75, 75, 3), np.float32))["params"])
            shardings = parallel.logical_shardings(boxed, self.mesh, self.rules)
        params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
        self.params = jax.tree.map(jax.device_put, params, shardings)
        self._fn = jax.jit(lambda p, x: self.model.apply({"params": p}, x.astype(np.float32) / 255.0),
                           out_shardings=jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def images(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)

        def run(_, chunk):
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                return self._fn(self.params, chunk)

        return parallel.map_batches(run, [images], self.mesh, self.batch_size).astype(np.float32)


class ClipFeatures:
    """Unit CLIP image and text embeddings of a trained or imported CLIP workdir (EMA params).

    Images are brought to the CLIP's input as its training data was: its own preprocessing when
    imported (shorter side resized, centre crop), else a bicubic resize and centre crop.
    """

    def __init__(self, workdir: str, *, mesh: Mesh | None = None, batch_size: int = 64, loaded=None):
        from unclip_jax.stages import load

        self.workdir = paths.resolve(workdir) if loaded is None else loaded.workdir
        self.loaded = loaded if loaded is not None else load.load_stage(self.workdir, "ema", mesh=mesh)
        if self.loaded.config.get("stage") != "clip":
            raise ValueError(f"{self.workdir} holds a trained {self.loaded.config.get('stage')!r} "
                             "stage, not a CLIP: give a CLIP workdir (trained, or imported with "
                             "convert_clip.py)")
        self.stage = self.loaded.stage
        if not self.stage.model.has_vision:
            raise ValueError(f"the CLIP of {self.workdir} has no image tower (a text encoder alone): "
                             "image metrics need a full CLIP")
        self.batch_size = int(batch_size)
        self.dim = int(self.stage.model.embed_dim)
        host = jax.tree.map(parallel.to_host, self.loaded.params)
        self.identity = {"name": f"clip:{os.path.basename(self.workdir.rstrip('/'))}",
                         "weights_sha256": weights_hash(_flatten(host))}

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> uint8 [N, side, side, 3] as the CLIP's data was prepared."""
        return self.stage.prepare_images(check_images(images))

    def images(self, images: np.ndarray) -> np.ndarray:
        """Unit image embeddings float32 [N, D]."""
        with jax.set_mesh(self.loaded.mesh), nn.logical_axis_rules(self.loaded.rules):
            z = self.stage.embed(self.loaded.params, self.loaded.mesh, images=self.preprocess(images),
                                 batch_size=self.batch_size)
        return _unit(z)

    def texts(self, captions: Sequence[str]) -> np.ndarray:
        """Unit text embeddings float32 [N, D] (over-long captions truncated by the tokenizer)."""
        tokens = np.asarray(self.stage.tokenizer(list(captions)), np.int32)
        with jax.set_mesh(self.loaded.mesh), nn.logical_axis_rules(self.loaded.rules):
            z = self.stage.embed(self.loaded.params, self.loaded.mesh, tokens=tokens, batch_size=self.batch_size)
        return _unit(z)


def _unit(z) -> np.ndarray:
    z = np.asarray(z, np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Per-pair CLIP score, 100 * max(cos(image, text), 0), as commonly reported (Hessel et al.
    2021 with w = 100, torchmetrics' CLIPScore): float64 [N]. Average it for the set's score."""
    a, b = _unit(image_embeddings), _unit(text_embeddings)
    if a.shape != b.shape:
        raise ValueError(f"clip_score needs one caption per image: got image embeddings "
                         f"{list(a.shape)} and text embeddings {list(b.shape)}")
    return 100.0 * np.maximum(np.sum(a.astype(np.float64) * b, axis=-1), 0.0)


def check_images(images) -> np.ndarray:
    """uint8 [N, H, W, 3] with N >= 1, or one clear error."""
    return image_lib.check_image_batch(images, allow_single=False)
