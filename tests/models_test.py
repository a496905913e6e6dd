"""Models built from flags: GPT-2 weight initialisation and the optimizer's weight-decay groups."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfllm.config import ConfigError, ModelConfig, OptimizerConfig, model_mismatch
from tfllm.models import RESIDUAL_PROJECTIONS, build_causal_lm, lm_loss_sums
from tfllm.optimizer import make_optimizer

TINY = ModelConfig(num_layers=2, num_heads=2, hidden_dim=64, max_sequence_length=32, vocab_size=96)


def _stds(model) -> dict:
    return {v.path: float(np.std(v.numpy())) for v in model.backbone.weights}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpt2_init_scales_residual_projections_and_embeddings(family):
    keras.utils.set_random_seed(0)
    gpt2 = _stds(build_causal_lm(dataclasses.replace(TINY, family=family, weight_init="gpt2")))
    keras.utils.set_random_seed(0)
    plain = _stds(build_causal_lm(dataclasses.replace(TINY, family=family, weight_init="keras_hub")))
    residual = [p for p in gpt2 if p.endswith(RESIDUAL_PROJECTIONS)]
    assert len(residual) == 2 * TINY.num_layers
    for path in residual:  # 0.02 / sqrt(2 x 2 layers) against keras-hub's 0.02
        assert gpt2[path] == pytest.approx(0.01, rel=0.05)
        assert plain[path] == pytest.approx(0.02, rel=0.05)
    embedding = next(p for p in gpt2 if p.startswith("token_embedding"))
    assert gpt2[embedding] == pytest.approx(0.02, rel=0.1)
    assert plain[embedding] == pytest.approx(0.01, rel=0.1)
    untouched = [p for p in gpt2 if p.endswith("query/kernel")]
    assert untouched and all(gpt2[p] == pytest.approx(0.02, rel=0.1) for p in untouched)


def test_weight_init_is_validated_and_does_not_block_resume():
    with pytest.raises(ConfigError, match="--weight_init='xavier'"):
        dataclasses.replace(TINY, weight_init="xavier").validate()
    assert model_mismatch(TINY, dataclasses.replace(TINY, weight_init="keras_hub")) == []
    assert model_mismatch(TINY, dataclasses.replace(TINY, num_layers=3)) == ["num_layers: 2 -> 3"]


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_skips_biases_and_optionally_norms_and_embeddings(decay_all):
    model = build_causal_lm(TINY)
    optimizer = make_optimizer(OptimizerConfig(decay_embeddings_and_norms=decay_all), 100, 1, model, "float32")
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    biases = [v.path for v in model.trainable_variables if v.path.endswith("/bias")]
    assert any(len(v.shape) == 2 for v in model.trainable_variables if v.path in biases)  # attention biases
    assert not decayed & set(biases)
    kernels = {v.path for v in model.trainable_variables if v.path.endswith("/kernel")}
    assert kernels <= decayed
    others = {v.path for v in model.trainable_variables} - kernels - set(biases)  # norms, embeddings
    assert others and (others <= decayed if decay_all else not others & decayed)


def _matmul_input_dtypes(model, windows) -> dict:
    graph = tf.function(lambda w: lm_loss_sums(model, w, training=True)).get_concrete_function(windows).graph
    return {op.name: {t.dtype.name for t in op.inputs} for op in graph.get_operations()
            if op.type in ("MatMul", "BatchMatMulV2", "Einsum")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mixed_bfloat16_runs_every_matmul_including_the_tied_head_in_bfloat16(family):
    windows = tf.constant(np.random.default_rng(0).integers(3, 96, size=(2, 17)), tf.int32)
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = build_causal_lm(dataclasses.replace(TINY, family=family))
        dtypes = _matmul_input_dtypes(model, windows)
        loss_sum, _, _ = lm_loss_sums(model, windows, training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    head = [name for name in dtypes if "token_embedding" in name]
    assert len(head) == 1 and len(dtypes) > 4 * TINY.num_layers
    # Rotary position angles (positions x inverse frequencies) stay float32 on purpose.
    assert {name: d for name, d in dtypes.items() if d != {"bfloat16"} and "rotary" not in name} == {}
    assert model.backbone.token_embedding.embeddings.dtype == "float32"  # the table itself stays float32
    assert loss_sum.dtype == tf.float32 and np.isfinite(loss_sum.numpy())
    fp32 = _matmul_input_dtypes(build_causal_lm(dataclasses.replace(TINY, family=family)), windows)
    assert all(d == {"float32"} for d in fp32.values())
