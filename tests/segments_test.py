"""The chain of segments computes the model, and its buckets cover every variable once."""

import numpy as np
import keras
import pytest
import tensorflow as tf

from tfllm.config import ModelConfig
from tfllm.models import build_causal_lm, lm_chain, lm_loss_sums, split_window
from tfllm.segments import gelu_tanh, plan_buckets
from tfllm.step import TrainStep

VOCAB, SEQ = 61, 16


def tiny(family, seed=1):
    keras.utils.set_random_seed(seed)
    return build_causal_lm(ModelConfig(family=family, num_layers=2, num_heads=2, hidden_dim=32,
                                       max_sequence_length=SEQ, vocab_size=VOCAB, dropout=0.0))


def windows(n=4, seed=0):
    return tf.constant(np.random.default_rng(seed).integers(3, VOCAB, (n, SEQ + 1)), tf.int32)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chain_computes_the_models_logits(family):
    model, w = tiny(family), windows()
    chain = lm_chain(model)
    hidden = None
    for unit in [chain.embed, *chain.blocks, chain.top]:
        hidden = unit.call(hidden, w, False)
    np.testing.assert_array_equal(hidden.numpy(), model(split_window(w)[0]).numpy())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_buckets_go_top_down_cover_each_variable_once_and_keep_the_tied_embedding_last(family):
    model = tiny(family)
    variables = model.trainable_variables
    for b in range(1, 5):
        plan = plan_buckets(lm_chain(model), variables, b)
        assert len(plan) == b
        owned = [i for bucket in plan for i in bucket.variable_indices]
        assert sorted(owned) == list(range(len(variables)))
        embedding = next(i for i, v in enumerate(variables) if v is model.backbone.token_embedding.embeddings)
        assert embedding in plan[-1].variable_indices  # read by the head too, complete only at the bottom
        norm = {i for i, v in enumerate(variables) if v.path.startswith(model.backbone.layer_norm.path)}
        assert norm <= set(plan[0].variable_indices)
    with pytest.raises(ValueError, match="use 1 to 4"):
        plan_buckets(lm_chain(model), variables, 5)


def test_gelu_gradient_from_its_input_matches_autodiff():
    x = tf.constant(np.linspace(-6, 6, 1001), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours, reference = gelu_tanh(x), tf.nn.gelu(x, approximate=True)
    np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    # Deep in the tails both forms lose digits to 1 + tanh(x) ~ 0 in float32.
    np.testing.assert_allclose(tape.gradient(ours, x).numpy(), tape.gradient(reference, x).numpy(), rtol=1e-6,
                               atol=5e-6)


@pytest.mark.parametrize("family,jit", [("gpt2", True), ("llama", False)])
def test_bucketed_step_equals_the_one_piece_step_on_one_process(family, jit):
    """Accumulation, slices and clipping included; the counter says B collectives per step."""
    data = np.random.default_rng(7).integers(3, VOCAB, (3, 2, 4, SEQ + 1)).astype(np.int32)
    results = {}
    for b in (1, 3):
        model = tiny(family)
        step = TrainStep(model, keras.optimizers.SGD(0.5), 4, SEQ, grad_accum_steps=2, clip_norm=0.05,
                         jit_compile=jit, parallel_slices=2, allreduce_buckets=b, chain=lm_chain(model))
        step.build()
        losses = [float(step(d)["loss"]) for d in data]
        results[b] = losses, [v.numpy() for v in model.trainable_variables], int(step.allreduce_calls.numpy())
    np.testing.assert_allclose(results[3][0], results[1][0], rtol=1e-6)
    for x, y in zip(results[3][1], results[1][1]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert (results[1][2], results[3][2]) == (3, 9)


def test_classifier_bucketed_step_with_the_lm_loss_equals_the_one_piece_step():
    """Fine-tuning's step with the auxiliary LM loss: a NO_LABEL row (LM loss too) counts for nothing."""
    from tfllm.classifier import build_classifier, classifier_chain, make_loss_fn
    from tfllm.labelled import NO_LABEL

    rng = np.random.default_rng(5)
    data = rng.integers(3, VOCAB, (3, 1, 4, 1 + SEQ)).astype(np.int32)
    data[..., 0] = rng.integers(0, 2, data.shape[:-1])
    data[:, 0, 1, 9:] = 0  # padding
    data[:, 0, 3, 0] = NO_LABEL
    results = {}
    for b in (1, 3):
        backbone = tiny("gpt2").backbone
        keras.utils.set_random_seed(2)
        model = build_classifier(backbone, 2, pooling="mean", dropout=0.0)
        step = TrainStep(model, keras.optimizers.SGD(0.5), 4, 1, jit_compile=True, extra_stats=("lm_loss",),
                         loss_fn=make_loss_fn(None, 0.5, backbone), allreduce_buckets=b,
                         chain=classifier_chain(model, backbone, None, 0.5))
        step.build()
        metrics = [step(d) for d in data]
        results[b] = ([(float(m["loss"]), float(m["lm_loss"]), float(m["tokens"])) for m in metrics],
                      [v.numpy() for v in model.trainable_variables])
    np.testing.assert_allclose(results[3][0], results[1][0], rtol=1e-6)
    assert [t for _, _, t in results[1][0]] == [3.0, 3.0, 3.0]
    for x, y in zip(results[3][1], results[1][1]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_more_buckets_without_a_chain_are_refused():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="chain"):
        TrainStep(model, keras.optimizers.SGD(0.5), 4, SEQ, allreduce_buckets=2)


@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_classifier_chain_computes_the_classifiers_loss_sums(lm_weight):
    from tfllm.classifier import build_classifier, classifier_chain, make_loss_fn
    from tfllm.labelled import NO_LABEL

    lm = tiny("gpt2")
    backbone = lm.backbone
    model = build_classifier(backbone, 3, pooling="last", dropout=0.0)
    weights = np.array([0.5, 1.0, 2.0], np.float32)
    rng = np.random.default_rng(3)
    rows = rng.integers(3, VOCAB, (4, 1 + SEQ)).astype(np.int32)
    rows[:, 0] = [0, 1, 2, NO_LABEL]  # the last row counts for nothing, its LM loss included
    rows[1, 10:] = 0  # padding: the pooled position depends on the mask
    rows = tf.constant(rows)
    chain = classifier_chain(model, backbone, weights, lm_weight)
    hidden = None
    for unit in [chain.embed, *chain.blocks, chain.top]:
        hidden = unit.call(hidden, rows, False)
    ours, reference = chain.sums(hidden, rows), make_loss_fn(weights, lm_weight, backbone)(model, rows, training=False)
    np.testing.assert_allclose([float(x) for x in ours], [float(x) for x in reference], rtol=1e-6)
    if lm_weight:
        # The auxiliary part against the language model's own loss, each row's tokens one window:
        # the mean next-token loss per example, padding excluded, weighted into the objective.
        nll, _, count = lm_loss_sums(lm, rows[:, 1:], training=False, per_window=True)
        lm_loss = float(tf.reduce_sum((nll / count)[:3]))
        classification = float(make_loss_fn(weights)(model, rows, training=False)[0])
        assert float(ours[3]) == pytest.approx(lm_loss, rel=1e-5)
        assert float(ours[0]) == pytest.approx(classification + lm_weight * lm_loss, rel=1e-5)
