"""Per-variable learning-rate scales (layer-wise decay for fine-tuning) on top of AdamW."""

import dataclasses
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfllm.classifier import build_classifier, head_variables, layer_lr_scales, make_loss_fn
from tfllm.config import ConfigError, FinetuneConfig, ModelConfig, OptimizerConfig
from tfllm.models import build_causal_lm
from tfllm.optimizer import ScaledAdamW, make_optimizer
from tfllm.step import TrainStep

VOCAB, SEQ, LR = 61, 16, 1e-3


def tiny_classifier(family):
    keras.utils.set_random_seed(1)
    backbone = build_causal_lm(ModelConfig(family=family, num_layers=2, num_heads=2, hidden_dim=32,
                                           max_sequence_length=SEQ, vocab_size=VOCAB, dropout=0.0)).backbone
    return build_classifier(backbone, 2, pooling="mean", dropout=0.0), backbone


@pytest.mark.parametrize("jit", [False, True])
def test_a_scaled_variable_steps_as_adamw_at_the_scaled_rate(jit):
    """Adam's moments and the decoupled weight decay both follow the scaled rate."""
    init = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    grads = [tf.constant(np.random.default_rng(s).normal(size=(3, 4)), tf.float32) for s in range(3)]
    scaled, full = keras.Variable(init, name="scaled"), keras.Variable(init, name="full")
    ours = ScaledAdamW({"scaled": 0.25}, learning_rate=0.01, weight_decay=0.1)
    ours.build([scaled, full])
    references = {}
    for name, lr in (("scaled", 0.0025), ("full", 0.01)):
        var = keras.Variable(init, name=name)
        references[name] = var, keras.optimizers.AdamW(learning_rate=lr, weight_decay=0.1)
        references[name][1].build([var])

    def stepper(optimizer, variables):  # variables are captured: a tf.function argument would be a tensor
        def apply(g):
            optimizer.apply([g] * len(variables), variables)
        return tf.function(apply, jit_compile=True) if jit else apply
    steppers = [stepper(ours, [scaled, full])] + [stepper(opt, [var]) for var, opt in references.values()]
    for g in grads:
        for apply in steppers:
            apply(g)
    np.testing.assert_allclose(scaled.numpy(), references["scaled"][0].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(full.numpy(), references["full"][0].numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(scaled.numpy(), full.numpy())
    # AdamW's variable paths (up to Keras's _N numbering of a process's optimizers), so that a
    # checkpoint resumes with or without --layer_lr_decay
    def paths(optimizer):
        return [re.sub(r"^adam_w_\d+/", "adam_w/", v.path) for v in optimizer.variables]
    assert paths(ours) == paths(_built_adamw([scaled, full]))


def _built_adamw(variables):
    optimizer = keras.optimizers.AdamW()
    optimizer.build(variables)
    return optimizer


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_scales_fall_by_depth_from_the_head_to_the_embeddings(family):
    model, backbone = tiny_classifier(family)
    assert layer_lr_scales(model, backbone, 1.0) == {}
    scales = layer_lr_scales(model, backbone, 0.5)
    top, bottom = backbone.transformer_layers[1], backbone.transformer_layers[0]
    assert {scales[v.path] for v in top.trainable_variables} == {0.5}
    assert {scales[v.path] for v in bottom.trainable_variables} == {0.25}
    assert {scales[v.path] for v in backbone.token_embedding.trainable_variables} == {0.125}
    unscaled = [v.path for v in model.trainable_variables if v.path not in scales]
    head = {v.path for v in head_variables(model, backbone)}
    assert head and head < set(unscaled)
    assert all("norm" in p for p in set(unscaled) - head)  # the final norm learns with the head


def test_a_compiled_step_moves_each_layer_by_its_share_of_the_rate():
    """Adam's first step moves an element with a gradient by about the rate itself, so the
    median move of each group shows the rate it was given."""
    model, backbone = tiny_classifier("gpt2")
    scales = layer_lr_scales(model, backbone, 0.5)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, warmup_steps=0, weight_decay=0.0), 10, 1, model,
                               "float32", lr_scales=scales)
    step = TrainStep(model, optimizer, 4, 1, 1, 0.0, jit_compile=True, loss_fn=make_loss_fn())
    step.build()
    groups = {"head": (head_variables(model, backbone), 1.0),
              "top layer": (backbone.transformer_layers[1].trainable_variables, 0.5),
              "bottom layer": (backbone.transformer_layers[0].trainable_variables, 0.25),
              "positions": (backbone.position_embedding.trainable_variables, 0.125)}
    before = {name: [v.numpy() for v in vs] for name, (vs, _) in groups.items()}
    rows = np.random.default_rng(2).integers(3, VOCAB, (4, 1 + SEQ)).astype(np.int32)
    rows[:, 0] = [0, 1, 1, 0]
    step(tf.constant(rows)[None])  # one micro-batch
    for name, (variables, scale) in groups.items():
        moves = np.concatenate([np.abs(v.numpy() - b).ravel() for v, b in zip(variables, before[name])])
        assert np.median(moves[moves > 0]) == pytest.approx(LR * scale, rel=0.05), name


def test_layer_lr_decay_is_validated():
    base = FinetuneConfig(pretrained_dir="p", model_dir="m", train_file="t", validation_file="v")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=f"--layer_lr_decay={bad}"):
            dataclasses.replace(base, layer_lr_decay=bad).validate()
    dataclasses.replace(base, layer_lr_decay=0.8).validate()
