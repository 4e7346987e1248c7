"""TFDS builders for the embedded shapes data set and for a folder of captioned images.

Both write `array_record` files and need no TensorFlow: images are stored as encoded bytes
(`image`, a scalar `np.object_` tensor; TFDS's `Image` feature would need TensorFlow) and text as
`tfds.features.Text`, which reads back as UTF-8 `bytes`. Decode images with
`unclip_jax.data.images.decode_image`.

Usage (importing this module registers the builders with TFDS):

    from unclip_jax.data import tfds_builders
    tfds_builders.prepare("shapes/64px", data_dir)                  # builds once, then reuses
    source = tfds.data_source("shapes/64px", data_dir=data_dir)["train"]
    record = source[0]  # {"image": PNG bytes, "caption": b"...", "kind": b"single", "index": 0}

    config = tfds_builders.CaptionedFolderConfig(name="mine", folder="/path/to/pairs")
    builder = tfds_builders.prepare(config, data_dir)
    source = builder.as_data_source()["train"]
    tfds_builders.skipped_report(builder)  # what was skipped, and why

Custom configs (any `ShapesConfig` / `CaptionedFolderConfig`) are prepared the same way; read them
back with `builder.as_data_source()` or, once built, `tfds.data_source("shapes/<name>", ...)`.
`prepare` never rebuilds nor deletes a complete data set (and refuses a config whose parameters
differ from the stored one of the same name): to change one, give the config a new name.
`load_source(name, split=..., data_dir=..., data=config.data)` is the input pipeline's entry: it
prepares on first use and returns one split's random-access source.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from unclip_jax import parallel
from unclip_jax.data import images, shapes
from unclip_jax.data.checks import checked_int

SKIPPED_FILE = "skipped.json"


class MissingSplitError(ValueError):
    """The data set has no such split (e.g. `heldout` of a captioned folder)."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_MAX_LOGGED_SKIPS = 20


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders."""

    # TFDS 4.9.x derives code_path through `importlib_resources`, which it only requires (and
    # pip only installs) on Python < 3.9; for a builder in a package that lookup fails. The
    # module's own path is what it would compute.
    code_path = epath.Path(__file__)


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """A rendered shapes data set: image side in pixels, examples per split, and the seed.

    Example `i` of split `s` is `shapes.example(seed, s, i, side)`; a split of size 0 is omitted.
    """

    side: int = 64
    num_train: int = 50_000
    num_validation: int = 2_000
    num_heldout: int = 2_000
    seed: int = 0

    def __post_init__(self):
        self.side = checked_int("side", self.side, shapes.MIN_SIDE)
        self.num_train = checked_int("num_train", self.num_train)
        self.num_validation = checked_int("num_validation", self.num_validation)
        self.num_heldout = checked_int("num_heldout", self.num_heldout)
        self.seed = checked_int("seed", self.seed)
        if self.num_train + self.num_validation + self.num_heldout == 0:
            raise ValueError(f"shapes config {self.name!r} has no examples in any split")
        # The description names every parameter: `prepare` compares it with the stored one.
        params = (f"{self.side}x{self.side} captioned shapes, seed {self.seed}: "
                  f"{self.num_train} train, {self.num_validation} validation, "
                  f"{self.num_heldout} heldout")
        self.description = f"{self.description} ({params})" if self.description else params

    def split_sizes(self) -> dict[str, int]:
        """Non-empty splits -> number of examples."""
        sizes = {"train": self.num_train, "validation": self.num_validation,
                 "heldout": self.num_heldout}
        return {split: n for split, n in sizes.items() if n}


class Shapes(_Builder):
    """The embedded captioned-shapes data set (see unclip_jax/data/shapes.py)."""

    name = "shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name=f"{side}px", side=side) for side in (32, 64, 128)
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "64px"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned shapes: one or two flat shapes on a plain background, with "
                        "captions from a closed grammar that a judge can check on the pixels.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
                "caption": tfds.features.Text(),
                "kind": tfds.features.Text(),  # "single" or "pair"
                "index": tfds.features.Scalar(dtype=np.int64),  # example index in its split
            }),
            disable_shuffling=True,  # record i is example i
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.split_sizes().items()}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        for index in range(num_examples):
            ex = shapes.example(config.seed, split, index, config.side)
            kind = shapes.parse_caption(ex["caption"])["kind"]
            yield index, {"image": images.encode_png(ex["image"]), "caption": ex["caption"],
                          "kind": kind, "index": index}


# ----------------------------------------------------------------------------------------------
# Captioned folder
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class CaptionedFolderConfig(tfds.core.BuilderConfig):
    """A folder of `name.{jpg,jpeg,png,webp}` images, each with its caption in `name.txt`.

    The folder is searched recursively (hidden files and folders skipped); the caption file sits
    beside its image. `validation_fraction` of the pairs, chosen by the SHA-256 of their relative
    path, go to a `validation` split (none by default).
    """

    folder: str = ""
    validation_fraction: float = 0.0

    def __post_init__(self):
        if not self.folder:
            raise ValueError(f"captioned folder config {self.name!r} needs a folder")
        self.folder = os.fspath(self.folder)
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got "
                             f"{self.validation_fraction!r}")
        self.validation_fraction = float(self.validation_fraction)
        params = (f"Captioned images from {self.folder}, validation fraction "
                  f"{self.validation_fraction}")
        self.description = f"{self.description} ({params})" if self.description else params


def _read_caption(path: epath.Path) -> str:
    """Caption text with runs of whitespace (including newlines) collapsed to one space."""
    return " ".join(path.read_text(encoding="utf-8").split())


def _in_validation(relative: str, fraction: float) -> bool:
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def scan_captioned_folder(folder) -> tuple[list[dict], list[dict]]:
    """Reads a folder of image/caption pairs: (good examples, skipped files).

    Each good example is {"path", "filename" (relative path), "caption", "sha256" (of the bytes
    that decoded)};
    each skipped one is {"file", "reason", "detail"} with reason one of `missing_caption`,
    `empty_caption`, `unreadable_caption`, `unreadable_image`, `corrupt_image`. Caption files
    with no image are reported with reason `orphan_caption` (they hold no example).
    """
    root = epath.Path(folder)
    if not root.is_dir():
        raise ValueError(f"captioned folder {os.fspath(folder)!r} is not a directory")
    good, skipped = [], []
    used_captions = set()
    files = []
    for dirpath, dirnames, filenames in os.walk(os.fspath(root)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    files.sort()
    for path in files:
        stem, ext = os.path.splitext(path)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        relative = os.path.relpath(path, os.fspath(root)).replace(os.sep, "/")

        def skip(reason: str, detail: str = ""):
            skipped.append({"file": relative, "reason": reason, "detail": detail})

        caption_path = epath.Path(stem + ".txt")
        if not caption_path.is_file():
            skip("missing_caption", f"no {os.path.basename(stem)}.txt beside it")
            continue
        used_captions.add(os.fspath(caption_path))
        try:
            caption = _read_caption(caption_path)
        except (OSError, UnicodeDecodeError) as error:
            skip("unreadable_caption", f"{type(error).__name__}: {error}")
            continue
        if not caption:
            skip("empty_caption")
            continue
        try:
            data = epath.Path(path).read_bytes()
        except OSError as error:
            skip("unreadable_image", f"{type(error).__name__}: {error}")
            continue
        try:
            images.decode_image(data)
        except ValueError as error:
            skip("corrupt_image", str(error))
            continue
        # Only the path is kept (not the bytes), so a large folder is never held in memory.
        good.append({"path": path, "filename": relative, "caption": caption,
                     "sha256": hashlib.sha256(data).hexdigest()})
    for path in files:
        if path.endswith(".txt") and path not in used_captions:
            relative = os.path.relpath(path, os.fspath(root)).replace(os.sep, "/")
            skipped.append({"file": relative, "reason": "orphan_caption",
                            "detail": "no image with this name"})
    return good, skipped


class CaptionedFolder(_Builder):
    """Captioned images from a local folder (see `CaptionedFolderConfig`).

    Unusable files are skipped, never fatal: they are logged, counted in
    `info.metadata["skipped"]` and listed in `skipped.json` beside the data
    (`skipped_report(builder)` reads it).
    """

    name = "captioned_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images and captions from a folder of name.{jpg,jpeg,png,webp} + "
                        "name.txt pairs.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # original bytes
                "caption": tfds.features.Text(),
                "filename": tfds.features.Text(),  # path relative to the folder
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        if not isinstance(config, CaptionedFolderConfig):
            raise ValueError("captioned_folder needs a CaptionedFolderConfig(name=..., "
                             "folder=...)")
        good, skipped = scan_captioned_folder(config.folder)
        counts = collections.Counter(s["reason"] for s in skipped)
        for s in skipped[:_MAX_LOGGED_SKIPS]:
            logging.warning("captioned_folder: skipping %s (%s) %s", s["file"], s["reason"],
                            s["detail"])
        if len(skipped) > _MAX_LOGGED_SKIPS:
            logging.warning("captioned_folder: ... and %d more skipped files",
                            len(skipped) - _MAX_LOGGED_SKIPS)
        splits = {"train": [], "validation": []}
        for ex in good:
            valid = _in_validation(ex["filename"], config.validation_fraction)
            splits["validation" if valid else "train"].append(ex)
        if not splits["train"]:
            raise ValueError(f"captioned folder {config.folder!r} has no usable image/caption "
                             f"pairs for train (skipped: {dict(counts)})")
        report = {
            "folder": config.folder,
            "counts": dict(sorted(counts.items())),
            "num_skipped": sum(n for r, n in counts.items() if r != "orphan_caption"),
            "num_examples": {split: len(exs) for split, exs in splits.items() if exs},
            "files": skipped,
        }
        logging.info("captioned_folder %s: %s examples, skipped %s", config.folder,
                     report["num_examples"], report["counts"])
        self.info.metadata["skipped"] = report["counts"]
        self.info.metadata["num_skipped"] = report["num_skipped"]
        # During download_and_prepare, data_dir is the incomplete directory that becomes the
        # final one, so the report lands beside the data only when the build succeeds.
        epath.Path(self.data_dir, SKIPPED_FILE).write_text(json.dumps(report, indent=1))
        return {split: self._generate_examples(exs) for split, exs in splits.items() if exs}

    def _generate_examples(self, examples: list[dict]) -> Iterator[tuple[str, dict]]:
        for ex in examples:
            data = epath.Path(ex["path"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != ex["sha256"]:
                raise ValueError(f"{ex['path']} changed while the data set was being built")
            yield ex["filename"], {"image": data, "caption": ex["caption"],
                                   "filename": ex["filename"]}


def skipped_report(builder: tfds.core.DatasetBuilder) -> dict:
    """The `skipped.json` written beside a prepared captioned-folder data set."""
    path = epath.Path(builder.data_dir, SKIPPED_FILE)
    if not path.exists():
        raise ValueError(f"no {SKIPPED_FILE} in {builder.data_dir}: is it a prepared "
                         f"captioned_folder data set?")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Prepare
# ----------------------------------------------------------------------------------------------
_BUILDERS = {"shapes": Shapes, "captioned_folder": CaptionedFolder}


def prepare(dataset, data_dir=None) -> tfds.core.DatasetBuilder:
    """Builds a data set unless it is already prepared; returns its builder.

    dataset: a name ("shapes", "shapes/32px"), a `ShapesConfig`, a `CaptionedFolderConfig`, or a
    builder. data_dir: where data sets live (TFDS's default when None). A complete data set is
    never rebuilt nor deleted; read it with `builder.as_data_source()` or `tfds.data_source`.
    With several processes, process 0 builds it and the others open it once it is complete.
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    name = getattr(dataset, "name", dataset)
    return parallel.process_zero_first(lambda: _prepare(_builder(dataset, data_dir)),
                                       f"prepare data set {name}")


def _builder(dataset, data_dir) -> tfds.core.DatasetBuilder:
    if isinstance(dataset, tfds.core.DatasetBuilder):
        return dataset
    if isinstance(dataset, ShapesConfig):
        return Shapes(config=dataset, data_dir=data_dir, file_format="array_record")
    if isinstance(dataset, CaptionedFolderConfig):
        return CaptionedFolder(config=dataset, data_dir=data_dir, file_format="array_record")
    if isinstance(dataset, str):
        name, _, config = dataset.partition("/")
        if name not in _BUILDERS:
            raise ValueError(f"unknown data set {dataset!r}: expected one of "
                             f"{sorted(_BUILDERS)}, optionally with '/<config>'")
        if name == "captioned_folder":
            raise ValueError(f"{dataset!r}: a captioned folder needs a "
                             f"CaptionedFolderConfig(name=..., folder=...)")
        names = [c.name for c in Shapes.BUILDER_CONFIGS]
        if config and config not in names:
            raise ValueError(f"unknown shapes config {config!r} in {dataset!r}: expected one "
                             f"of {names}, or pass a ShapesConfig")
        return Shapes(config=config or None, data_dir=data_dir, file_format="array_record")
    raise ValueError(f"prepare() takes a data set name, config or builder, got "
                     f"{type(dataset).__name__}")


def _prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    if builder.is_prepared():
        stored, wanted = builder.info.config_description, builder.builder_config.description
        if isinstance(builder.builder_config, (ShapesConfig, CaptionedFolderConfig)) \
                and stored != wanted:
            raise ValueError(
                f"{builder.data_dir} already holds a different {builder.name} data set named "
                f"{builder.builder_config.name!r}: it is {stored!r}, not {wanted!r}. Give the "
                f"config another name (the existing data set is left as it is).")
        logging.info("%s is already prepared in %s", builder.info.full_name, builder.data_dir)
    else:
        builder.download_and_prepare(file_format="array_record")
    return builder


def load_source(name: str, *, split: str, data_dir=None, data=None):
    """Random-access source of one split of a TFDS data set, preparing ours on first use.

    name: "shapes/<config>" (built here if missing), "captioned_folder/<config>" (built from
    `data.folder` if missing) or any prepared TFDS data set. data: optional config (e.g.
    `config.data`) whose `side`, `num_train`, `num_eval` (validation and heldout sizes) and
    `seed` define a shapes build, and `folder` / `validation_fraction` a folder build. A
    registered shapes config ("shapes/64px") must agree with `data`; another name builds a custom
    config with `data`'s values. Records are {"image": bytes, "caption": bytes, ...}.
    """
    data_dir = None if data_dir is None else os.fspath(data_dir)
    family, _, config_name = name.partition("/")
    get = (lambda key, default=None: getattr(data, key, default)) if data is not None \
        else (lambda key, default=None: default)
    if family == "shapes":
        registered = {c.name: c for c in Shapes.BUILDER_CONFIGS}
        config_name = config_name or Shapes.DEFAULT_BUILDER_CONFIG_NAME
        base = registered.get(config_name)
        if base is None and get("side") is None:
            raise ValueError(f"{name!r} is not one of the shapes configs {sorted(registered)}; "
                             f"a custom one needs data.side/num_train/num_eval/seed")
        values = dict(side=get("side", base and base.side),
                      num_train=get("num_train", base and base.num_train),
                      num_validation=get("num_eval", base and base.num_validation),
                      num_heldout=get("num_eval", base and base.num_heldout),
                      seed=get("seed", base and base.seed))
        if base is not None:
            stored = {key: getattr(base, key) for key in values}
            if stored != values:
                raise ValueError(f"{name!r} is {stored}, but the data config asks for {values}: "
                                 f"name a custom config instead, e.g. "
                                 f"'shapes/my_{values['side']}px'")
            config = base
        else:
            config = ShapesConfig(name=config_name, **values)
        builder = prepare(config, data_dir)
    elif family == "captioned_folder":
        if get("folder"):
            builder = prepare(CaptionedFolderConfig(
                name=config_name, folder=get("folder"),
                validation_fraction=get("validation_fraction", 0.0)), data_dir)
        else:
            try:
                builder = tfds.builder(name, data_dir=data_dir)
                prepared = builder.is_prepared()
            except Exception:  # TFDS raises several kinds for an unknown config
                prepared = False
            if not prepared:
                raise ValueError(f"{name!r} is not prepared in {data_dir}; set data.folder to "
                                 f"build it from a folder of image/caption pairs")
    else:
        builder = tfds.builder(name, data_dir=data_dir)
    sources = builder.as_data_source()
    if split not in sources:
        raise MissingSplitError(f"{name!r} has no split {split!r}; it has {sorted(sources)}")
    return sources[split]
