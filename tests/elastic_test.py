"""Elastic mode's pieces that need no second process: failure recognition, commit and restore,
the accumulation that keeps a global batch, and the configurations refused."""

import numpy as np
import pytest
import tensorflow as tf

from tfllm import distributed
from tfllm.config import Config, ConfigError, ModelConfig, TrainConfig
from tfllm.elastic import ElasticState, accumulation_for, weights_digest
from tfllm.loop import LoopState


def test_grouped_allreduce_failures_count_as_collective_failures():
    # Horovod's own elastic.run lets this one through as a normal return (issue 20, fact 3).
    lost_peer = tf.errors.UnknownError(None, None, "HorovodGroupedAllreduce_grads_0_0: Connection reset by peer")
    assert distributed.is_collective_failure(lost_peer)
    assert distributed.is_collective_failure(tf.errors.InternalError(None, None, "Horovod has been shut down."))
    assert not distributed.is_collective_failure(tf.errors.InvalidArgumentError(None, None, "shape mismatch"))
    assert not distributed.is_collective_failure(ValueError("HorovodAllreduce"))


def test_accumulation_keeps_the_global_batch_where_it_divides():
    assert accumulation_for(48, 3, 8) == 2
    assert accumulation_for(48, 2, 8) == 3
    assert accumulation_for(48, 4, 8) is None


class _Loop:
    def __init__(self):
        self.variables = [tf.Variable(np.arange(4, dtype=np.float32)), tf.Variable(1.0)]
        self.state = LoopState(step=5, samples=80)


def test_restore_returns_to_the_commit_and_leaves_it_intact():
    loop = _Loop()
    state = ElasticState(loop, None, TrainConfig(model_dir="m", elastic=True), lambda *a: None, 10)
    state.commit()
    committed = weights_digest(loop.variables)
    loop.variables[0].assign_add(tf.ones(4))
    loop.state.step, loop.state.samples = 8, 128
    assert weights_digest(loop.variables) != committed
    state.restore()
    assert weights_digest(loop.variables) == committed and loop.state == LoopState(step=5, samples=80)
    loop.state.step = 6  # the restored state is a copy: training on must not change the commit
    state.restore()
    assert loop.state.step == 5


@pytest.mark.parametrize("train, message", [
    (dict(elastic_commit_every=0, elastic=True), "elastic_commit_every"),
    (dict(elastic_global_batch=12, batch_size=8, elastic=True), "multiple of --batch_size"),
    (dict(sample_log="x"), "--elastic runs only"),
])
def test_bad_elastic_flags_are_refused(train, message):
    cfg = Config(model=ModelConfig(num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64, vocab_size=64,
                                   max_sequence_length=32),
                 train=TrainConfig(model_dir="m", **train))
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_a_failure_before_the_first_commit_leaves_the_state_to_the_next_sync():
    loop = _Loop()
    state = ElasticState(loop, None, TrainConfig(model_dir="m", elastic=True), lambda *a: None, 10)
    before = weights_digest(loop.variables)
    state.restore()
    state.keep()
    assert weights_digest(loop.variables) == before and loop.state.step == 5
