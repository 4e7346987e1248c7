"""Loading a trained stage from its workdir (`stages.load`): the right params only, any mesh, clear
errors; and warm starts from another workdir (`train.restore`)."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train import tiny_clip
from unclip_jax import parallel
from unclip_jax.stages import load
from unclip_jax.stages.clip import ClipStage
from unclip_jax.train import checkpointing, restore
from unclip_jax.train import state as state_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_clip.trained_tiny_clip(tmp_path_factory)


def stored_state(workdir, step):
    """The checkpoint's state read by orbax directly (no model, no abstract tree)."""
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restores_the_ema_params_of_the_latest_checkpoint(workdir):
    trained = load.load_stage(workdir)
    stored = stored_state(workdir, 2)
    assert trained.step == 2 and trained.which == "ema"
    assert trained.config.stage == "clip" and trained.config.train.num_steps == 2
    assert isinstance(trained.stage, ClipStage) and trained.stage.tokenizer is not None
    assert_trees_equal(trained.params, stored["ema_params"])
    # The EMA differs from the raw params after two steps, so the choice is visible.
    assert any(not np.array_equal(e, p) for e, p in
               zip(jax.tree.leaves(stored["ema_params"]), jax.tree.leaves(stored["params"])))
    kernel = trained.params["visual_projection"]["kernel"]
    assert kernel.sharding.mesh.shape == trained.mesh.shape

    raw = load.load_stage(workdir, which="params", step=2)
    assert raw.which == "params"
    assert_trees_equal(raw.params, stored["params"])


def test_reads_only_the_requested_params_and_builds_no_optimiser(workdir, monkeypatch):
    def no_optimiser(*args, **kwargs):
        raise AssertionError("loading a stage must not build an optimiser")

    requested = []
    real = checkpointing.restore_entries

    def spy(directory, abstract, **kwargs):
        requested.append(sorted(abstract))
        return real(directory, abstract, **kwargs)

    monkeypatch.setattr(state_lib, "make_optimizer", no_optimiser)
    monkeypatch.setattr(checkpointing, "restore_entries", spy)
    trained = load.load_stage(workdir)
    assert requested == [["ema_params"]]  # The optimiser state and the raw params are never read.
    assert_trees_equal(trained.params, stored_state(workdir, 2)["ema_params"])


def test_the_workdir_records_what_rebuilds_its_model(workdir, tmp_path):
    record = json.loads(open(os.path.join(workdir, "stage.json")).read())
    assert record["stage"] == "clip" and record["depends_on"] == {"tokenizer": "tokenizer"}
    assert set(record["sizes"]) == {"vocab_size", "eot_token_id", "context_length", "eot_pooling"}
    # Recorded paths are relative to the workdir: a moved workdir still loads.
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved)
    assert load.load_stage(str(moved)).stage.tokenizer.path == str(moved / "tokenizer")
    # A workdir from before the record: one clear error naming the fix.
    os.remove(moved / "stage.json")
    with pytest.raises(load.NotTrainedError, match="no stage.json.*run its train.py command once more"):
        load.load_stage(str(moved))


def test_restores_onto_another_mesh(workdir):
    mesh = parallel.make_mesh((2, 2, 2))
    trained = load.load_stage(workdir, mesh=mesh)
    assert trained.mesh is mesh
    assert_trees_equal(trained.params, stored_state(workdir, 2)["ema_params"])
    # The restored params work with the task: unit embeddings come out.
    z = trained.stage.embed(trained.params, mesh, images=np.zeros((8, 32, 32, 3), np.uint8), batch_size=8)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)


def test_missing_workdir_config_or_checkpoint_are_clear_errors(workdir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(load.NotTrainedError, match=f"{missing} does not exist.*python train.py"):
        load.load_stage(str(missing))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(load.NotTrainedError, match=f"{empty} has no config.json"):
        load.load_stage(str(empty))

    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), untrained / "config.json")
    with pytest.raises(load.NotTrainedError,
                       match=rf"{untrained} has no checkpoint: train it first with python train.py "
                             rf"--config <config file>:clip --workdir {untrained}"):
        load.load_stage(str(untrained))
    (untrained / "checkpoints").mkdir()
    with pytest.raises(load.NotTrainedError, match="has no checkpoint"):
        load.load_stage(str(untrained))
    assert sorted(os.listdir(untrained)) == ["checkpoints", "config.json"]  # Nothing written.

    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .*available steps: \[2\]"):
        load.load_stage(workdir, step=7)
    with pytest.raises(ValueError, match="which='best'"):
        load.load_stage(workdir, which="best")


def test_checkpoint_incompatible_with_the_stored_config(workdir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["embed_dim"] = 16
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"is incompatible with the model(.|\n)*visual_projection"):
        load.load_stage(str(other))


# ---------------------------------------------------------------------------------------------
# Warm start (config.train.init_from): a new run seeded with another run's params.
# ---------------------------------------------------------------------------------------------
def test_merge_params_takes_shared_leaves_and_reports_new_ones():
    target = {"a": {"w": np.zeros((2, 3))}, "new": {"b": np.ones((4,))}}
    source = {"a": {"w": np.full((2, 3), 5.0)}}
    target = jax.tree.map(jax.numpy.asarray, target)
    merged, new = restore.merge_params(target, source)
    np.testing.assert_array_equal(merged["a"]["w"], 5.0)
    np.testing.assert_array_equal(merged["new"]["b"], 1.0)  # kept as initialised
    assert new == ["new/b"]


def test_merge_params_refuses_shape_changes_and_dropped_weights():
    target = {"a": {"w": jax.numpy.zeros((2, 3))}}
    with pytest.raises(ValueError, match=r"from src(.|\n)*a/w: checkpoint \(3, 3\) vs model \(2, 3\)"):
        restore.merge_params(target, {"a": {"w": np.zeros((3, 3))}}, what="src")
    with pytest.raises(ValueError, match=r"gone: in checkpoint \(1,\), missing from model"):
        restore.merge_params(target, {"a": {"w": np.zeros((2, 3))}, "gone": np.zeros(1)},
                             what="src")


@pytest.mark.slow
def test_init_from_seeds_a_new_run_with_the_source_params(workdir, tmp_path):
    from unclip_jax.train import loop

    config = tiny_clip.tiny_clip_config()
    with config.unlocked():
        config.train.num_steps = 1  # The first step's learning rate is 0 (linear warmup from 0).
        config.train.init_from = workdir
    new_dir = str(tmp_path / "finetune")
    result = loop.train_and_evaluate(config, new_dir)
    assert result["step"] == 1
    tuned = stored_state(new_dir, 1)
    assert_trees_equal(tuned["params"], stored_state(workdir, 2)["params"])
    assert int(tuned["step"]) == 1  # A new run: its own step count and optimizer.

    # A source that does not fit the model is one clear error, and the new workdir gets no checkpoint.
    with config.unlocked():
        config.model.embed_dim = 16
    bad_dir = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"cannot warm-start from (.|\n)*visual_projection"):
        loop.train_and_evaluate(config, str(bad_dir))
    assert not (bad_dir / "checkpoints").exists() or not os.listdir(bad_dir / "checkpoints")

    missing = str(tmp_path / "nowhere")
    with config.unlocked():
        config.model.embed_dim = tiny_clip.tiny_clip_config().model.embed_dim
        config.train.init_from = missing
    with pytest.raises(load.NotTrainedError, match="does not exist"):
        loop.train_and_evaluate(config, str(tmp_path / "bad2"))
