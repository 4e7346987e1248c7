"""Input pipeline: deterministic shuffling, per-slice batches of one global stream, resumable position, global batches."""
import jax
import numpy as np
import pytest

from unclip_jax import parallel
from unclip_jax.data import input_pipeline
from unclip_jax.data import shapes, tfds_builders


def index_source(n=64):
    return [{"index": np.int32(i)} for i in range(n)]


def first_batches(pipe, k):
    return [next(pipe)["index"].tolist() for _ in range(k)]


def make(source, seed=0, batch=8, process_index=0, process_count=1):
    return input_pipeline.make_pipeline(source, lambda e: e, local_batch_size=batch, shuffle_seed=seed,
                                      process_index=process_index, process_count=process_count,
                                      num_threads=2)


def test_same_seed_same_stream_and_new_order_each_epoch():
    a = first_batches(make(index_source()), 16)
    b = first_batches(make(index_source()), 16)
    assert a == b
    assert first_batches(make(index_source(), seed=1), 16) != a
    epoch1, epoch2 = sum(a[:8], []), sum(a[8:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(64))  # Every example once per epoch,
    assert epoch1 != epoch2  # in a new order.


def test_data_slices_split_the_global_batches_of_one_stream():
    """4 slices of 4 rows read, batch by batch, the rows of the 16-row global batches one
    process would read: the examples a step sees do not depend on the number of processes."""
    per_slice = [first_batches(make(index_source(), batch=4, process_index=i, process_count=4), 4)
                 for i in range(4)]
    one = first_batches(make(index_source(), batch=16), 4)
    for step in range(4):
        assert sum((per_slice[i][step] for i in range(4)), []) == one[step]
    assert sorted(sum(sum(per_slice, []), [])) == list(range(64))  # One epoch, each example once.


def test_restored_position_gives_the_same_next_batches():
    pipe = make(index_source())
    first_batches(pipe, 11)  # Into the second epoch.
    state = pipe.get_state()
    expected = first_batches(pipe, 5)
    fresh = make(index_source())
    fresh.set_state(state)
    assert first_batches(fresh, 5) == expected


def test_too_small_data_set_is_a_clear_error():
    with pytest.raises(ValueError, match="smaller than one global batch"):
        make(index_source(6), batch=8)


def test_global_batch_is_sharded_over_the_data_axes():
    mesh = parallel.make_mesh((2, 2, 2))
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    batch = parallel.global_batch_from_local(local, mesh)
    assert batch["x"].shape == (16, 3)
    assert batch["x"].sharding.spec == jax.P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    # Each device holds a quarter of the rows (tensor-axis devices hold replicas).
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(4, 3)}


def test_shapes_tfds_source_decodes_to_the_renderer_output(tmp_path):
    cfg = tfds_builders.ShapesConfig(name="pipe_test", side=32, num_train=16, num_validation=4,
                                     num_heldout=4, seed=3)
    source = tfds_builders.prepare(cfg, str(tmp_path)).as_data_source()["train"]
    image, caption = input_pipeline.decode_example(source[5], side=32)
    expected = shapes.example(3, "train", 5, 32)
    assert caption == expected["caption"]
    np.testing.assert_array_equal(image, expected["image"])
    # Resized on the way when the model wants another side.
    assert input_pipeline.decode_example(source[5], side=16)[0].shape == (16, 16, 3)


def test_stream_positions_seed_per_example_randomness_reproducibly():
    def with_position(position, example):
        return {"index": example["index"], "position": np.int64(position)}

    make_indexed = lambda: input_pipeline.make_pipeline(  # noqa: E731
        index_source(), with_position, local_batch_size=8, shuffle_seed=0, num_threads=2, with_index=True)
    pipe = make_indexed()
    positions = [next(pipe)["position"].tolist() for _ in range(10)]
    assert sum(positions, []) == list(range(80))  # Positions run on across epochs.
    state = pipe.get_state()
    expected = next(pipe)["position"].tolist()
    fresh = make_indexed()
    fresh.set_state(state)
    assert next(fresh)["position"].tolist() == expected
