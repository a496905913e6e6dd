"""GlobalOrder: windows read in place from the shards, and an order that resizes cannot break."""

import numpy as np
import pytest
import tensorflow as tf

from prepare_test import config, make_corpus
from tfllm.data.pipeline import DataError, WindowDataset
from tfllm.data.prepare import prepare
from tfllm.data.sampler import GlobalOrder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampler")
    prepare(config(make_corpus(tmp / "corpus")), str(tmp / "data"), log=lambda *a: None)
    return WindowDataset(str(tmp / "data"), "train")


def test_reads_the_same_windows_as_tf_data(dataset):
    order = GlobalOrder(dataset, seed=0)
    records = [np.frombuffer(r.numpy(), np.uint16).astype(np.int32)
               for path in dataset.paths for r in tf.data.TFRecordDataset(path)]
    ids = np.array([0, len(records) - 1, 5, 5, len(records) // 2])
    np.testing.assert_array_equal(order.read(ids), np.stack([records[i] for i in ids]))


def test_each_window_once_per_epoch_through_resizes(dataset):
    order = GlobalOrder(dataset, seed=3)
    windows = order.num_windows
    taken, position = [], 0
    # World sizes change between steps, batch 16, accumulation 1 or 2: positions run on across
    # epoch ends, so a step may finish one epoch and start the next.
    for step, (size, accumulation) in enumerate([(3, 1)] * 7 + [(2, 2)] * 9 + [(1, 1)] * 5 + [(4, 1)] * 20):
        shares = [order.step_ids(position, r, size, 16, accumulation) for r in range(size)]
        taken += [w for k in range(accumulation) for share in shares for w in share[k]]
        position += size * 16 * accumulation
    assert len(taken) > 2 * windows
    for e in range(2):
        assert sorted(taken[e * windows:(e + 1) * windows]) == list(range(windows))
    assert not np.array_equal(order.window_ids(0, windows), order.window_ids(windows, windows))  # reshuffled


def test_same_order_for_any_world_size(dataset):
    order = GlobalOrder(dataset, seed=0)
    one = order.step_ids(10, 0, 1, 6, 1)[0]
    three = np.concatenate([order.step_ids(10, r, 3, 2, 1)[0] for r in range(3)])
    np.testing.assert_array_equal(one, three)


def test_a_replaced_shard_is_refused(dataset, tmp_path):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(dataset.data_dir, copy)
    path = copy / dataset.shards[0]["file"]
    data = bytearray(path.read_bytes())
    data[:8] = (999).to_bytes(8, "little")  # a record of another size, same file size
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="records of"):
        GlobalOrder(WindowDataset(str(copy), "train"), seed=0)
