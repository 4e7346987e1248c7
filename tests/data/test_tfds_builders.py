"""TFDS builders (no TensorFlow): shapes and captioned folder, written as array_record."""
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.data import images, shapes, tfds_builders

TINY = dict(name="tiny", side=32, num_train=64, num_validation=8, num_heldout=8, seed=3)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_builders.prepare(tfds_builders.ShapesConfig(**TINY), data_dir)
    return data_dir


def test_tiny_shapes_reads_back_through_data_source(shapes_dir):
    sources = tfds.data_source("shapes/tiny", data_dir=shapes_dir)
    assert {split: len(sources[split]) for split in sources} == {
        "train": 64, "validation": 8, "heldout": 8}
    for split in sources:
        for i in range(len(sources[split])):
            record = sources[split][i]
            expected = shapes.example(TINY["seed"], split, int(record["index"]), TINY["side"])
            image = images.decode_image(record["image"])
            assert image.shape == (32, 32, 3)
            assert np.array_equal(image, expected["image"])
            caption = record["caption"].decode()
            assert caption == expected["caption"]
            assert record["kind"].decode() == shapes.parse_caption(caption)["kind"]
            assert (caption in shapes.heldout_captions()) == (split == "heldout")
    # Shuffling is disabled, so record i is example i.
    assert [int(sources["train"][i]["index"]) for i in range(5)] == list(range(5))


def test_prepare_does_not_rebuild(shapes_dir, monkeypatch):
    files = sorted((shapes_dir / "shapes" / "tiny").rglob("*.array_record*"))
    assert files
    stamps = [f.stat().st_mtime_ns for f in files]

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt an existing data set")

    monkeypatch.setattr(tfds_builders.Shapes, "_generate_examples", fail)
    builder = tfds_builders.prepare(tfds_builders.ShapesConfig(**TINY), shapes_dir)
    assert builder.is_prepared()
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert len(builder.as_data_source()["train"]) == 64


def test_default_configs_and_bad_names():
    names = [c.name for c in tfds_builders.Shapes.BUILDER_CONFIGS]
    assert names == ["32px", "64px", "128px"]
    config = tfds_builders.Shapes.BUILDER_CONFIGS[1]
    assert (config.side, config.num_train, config.num_validation, config.num_heldout) == (
        64, 50_000, 2_000, 2_000)
    with pytest.raises(ValueError, match="'shapes/48px'"):
        tfds_builders.prepare("shapes/48px", "/nonexistent")
    with pytest.raises(ValueError, match="'mnist'"):
        tfds_builders.prepare("mnist", "/nonexistent")
    with pytest.raises(ValueError, match="side"):
        tfds_builders.ShapesConfig(name="bad", side=8)
    with pytest.raises(ValueError, match="num_train"):
        tfds_builders.ShapesConfig(name="bad", num_train=-1)


def _write_image(path, fmt, size=(24, 20), seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format=fmt)
    return path.read_bytes()


@pytest.fixture()
def pairs_folder(tmp_path):
    root = tmp_path / "pairs"
    (root / "sub").mkdir(parents=True)
    good = {
        "good.png": _write_image(root / "good.png", "PNG"),
        "sub/photo.JPG": _write_image(root / "sub" / "photo.JPG", "JPEG", seed=1),
        "art.webp": _write_image(root / "art.webp", "WEBP", seed=2),
    }
    (root / "good.txt").write_text("a  good\npng ")
    (root / "sub" / "photo.txt").write_text("a photo")
    (root / "art.txt").write_text("a webp")
    (root / "corrupt.png").write_bytes(b"this is not an image")
    (root / "corrupt.txt").write_text("corrupt")
    png = good["good.png"]
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "truncated.txt").write_text("truncated")
    _write_image(root / "uncaptioned.png", "PNG")
    _write_image(root / "blank.jpeg", "JPEG")
    (root / "blank.txt").write_text(" \n ")
    (root / "orphan.txt").write_text("no image")
    (root / "notes.md").write_text("ignored")
    return root, good


def test_captioned_folder_keeps_good_pairs_and_counts_bad_ones(pairs_folder, tmp_path):
    root, good = pairs_folder
    config = tfds_builders.CaptionedFolderConfig(name="pairs", folder=str(root))
    builder = tfds_builders.prepare(config, tmp_path / "data")
    train = builder.as_data_source()["train"]
    records = {r["filename"].decode(): r for r in (train[i] for i in range(len(train)))}
    assert set(records) == set(good)
    for name, data in good.items():
        assert records[name]["image"] == data  # the original bytes
    assert records["good.png"]["caption"] == b"a good png"
    assert records["sub/photo.JPG"]["caption"] == b"a photo"
    assert images.decode_image(records["art.webp"]["image"]).shape == (24, 20, 3)

    expected = {"corrupt_image": 2, "missing_caption": 1, "empty_caption": 1,
                "orphan_caption": 1}
    report = tfds_builders.skipped_report(builder)
    assert report["counts"] == expected and report["num_skipped"] == 4
    assert {f["file"]: f["reason"] for f in report["files"]} == {
        "corrupt.png": "corrupt_image", "truncated.png": "corrupt_image",
        "uncaptioned.png": "missing_caption", "blank.jpeg": "empty_caption",
        "orphan.txt": "orphan_caption"}
    assert builder.info.metadata["skipped"] == expected

    # Read back by name, and the counts survive in the stored metadata.
    reloaded = tfds.builder("captioned_folder/pairs", data_dir=tmp_path / "data")
    assert reloaded.info.metadata["skipped"] == expected
    assert len(tfds.data_source("captioned_folder/pairs", data_dir=tmp_path / "data")["train"]) == 3

    # Preparing again does not rebuild, even though the folder changed.
    (root / "more.png").write_bytes(good["good.png"])
    (root / "more.txt").write_text("more")
    again = tfds_builders.prepare(config, tmp_path / "data")
    assert len(again.as_data_source()["train"]) == 3


def test_captioned_folder_validation_fraction(pairs_folder, tmp_path):
    root, good = pairs_folder
    for i in range(12):
        (root / f"extra{i}.png").write_bytes(good["good.png"])
        (root / f"extra{i}.txt").write_text(f"extra {i}")
    config = tfds_builders.CaptionedFolderConfig(name="split", folder=str(root),
                                                 validation_fraction=0.3)
    sources = tfds_builders.prepare(config, tmp_path / "data").as_data_source()
    sizes = {split: len(source) for split, source in sources.items()}
    assert sum(sizes.values()) == 15 and sizes["train"] > 0 and sizes.get("validation", 0) > 0


def test_captioned_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        tfds_builders.prepare(tfds_builders.CaptionedFolderConfig(
            name="missing", folder=str(tmp_path / "missing")), tmp_path / "data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad.png").write_bytes(b"junk")
    (tmp_path / "empty" / "bad.txt").write_text("junk")
    with pytest.raises(ValueError, match="no usable image/caption pairs"):
        tfds_builders.prepare(tfds_builders.CaptionedFolderConfig(
            name="empty", folder=str(tmp_path / "empty")), tmp_path / "data")
    # The failed build left no data set behind.
    assert not list((tmp_path / "data").rglob("*.array_record*"))
    with pytest.raises(ValueError, match="folder"):
        tfds_builders.CaptionedFolderConfig(name="nofolder")
    with pytest.raises(ValueError, match="captioned folder needs"):
        tfds_builders.prepare("captioned_folder/x", tmp_path / "data")


def test_prepare_refuses_a_different_data_set_under_the_same_name(shapes_dir):
    other = dict(TINY, num_train=65)
    with pytest.raises(ValueError, match="already holds a different shapes data set"):
        tfds_builders.prepare(tfds_builders.ShapesConfig(**other), shapes_dir)
    assert len(tfds.data_source("shapes/tiny", data_dir=shapes_dir)["train"]) == 64


def test_load_source_for_the_input_pipeline(shapes_dir, tmp_path):
    data = types.SimpleNamespace(side=32, num_train=64, num_eval=8, seed=3)
    source = tfds_builders.load_source("shapes/tiny", split="heldout", data_dir=shapes_dir,
                                       data=data)
    assert len(source) == 8  # reused, not rebuilt
    # A custom name builds from the data config.
    data = types.SimpleNamespace(side=16, num_train=5, num_eval=2, seed=0)
    source = tfds_builders.load_source("shapes/small16", split="validation",
                                       data_dir=tmp_path, data=data)
    assert len(source) == 2
    assert images.decode_image(source[1]["image"]).shape == (16, 16, 3)
    # A registered name must agree with the data config.
    with pytest.raises(ValueError, match="'shapes/64px'"):
        tfds_builders.load_source("shapes/64px", split="train", data_dir=tmp_path, data=data)
    with pytest.raises(ValueError, match="no split 'test'"):
        tfds_builders.load_source("shapes/small16", split="test", data_dir=tmp_path, data=data)
    with pytest.raises(ValueError, match="not prepared"):
        tfds_builders.load_source("captioned_folder/none", split="train", data_dir=tmp_path)
