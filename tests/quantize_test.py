import warnings

import numpy as np
import pytest

from tfllm.config import ConfigError, ModelConfig


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request):
    return _models(request.param)


@pytest.fixture(scope="module")
def gpt2_models():
    return _models("gpt2")


def _models(family: str):
    """A tiny float model, the same weights quantized by tfllm, and Keras's weight-only int8 of them."""
    import keras

    from tfllm.models import build_causal_lm
    from tfllm.quantize import quantize

    cfg = ModelConfig(family=family, vocab_size=97, num_layers=2, num_heads=2, hidden_dim=64,
                      max_sequence_length=32)
    keras.utils.set_random_seed(0)
    float_model = build_causal_lm(cfg)
    quantized, weight_only = build_causal_lm(cfg), build_causal_lm(cfg)
    quantized.set_weights(float_model.get_weights())
    weight_only.set_weights(float_model.get_weights())
    quantize(quantized, "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight_only.quantize(config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
    return cfg, float_model, quantized, weight_only


def _batch():
    import tensorflow as tf

    ids = tf.constant([[0, 5, 9, 14, 20, 33, 41, 60, 7, 2]])
    return {"token_ids": ids, "padding_mask": tf.ones_like(ids, tf.bool)}


def test_the_float_twin_computes_kerass_weight_only_int8(models):
    import tensorflow as tf

    from tfllm.models import build_causal_lm
    from tfllm.quantize import FloatTwin

    cfg, float_model, quantized, weight_only = models
    twin = FloatTwin(quantized, build_causal_lm(cfg))

    @tf.function
    def served(batch):
        with twin.scope():
            return twin.model(batch)
    expected = weight_only(_batch()).numpy()
    assert np.abs(served(_batch()).numpy() - expected).max() < 1e-4
    assert np.abs(twin.materialize()(_batch()).numpy() - expected).max() < 1e-4
    # and int8 is a close but not equal copy of the float model
    error = np.abs(expected - float_model(_batch()).numpy()).max()
    assert 0 < error < 0.05


def test_a_saved_model_served_by_the_twin_stores_only_the_int8_weights(gpt2_models, tmp_path):
    import tensorflow as tf

    from tfllm.export import ServingModule
    from tfllm.models import build_causal_lm
    from tfllm.quantize import FloatTwin, weight_bytes
    from tfllm.tokenizers import train_tokenizer

    cfg, float_model, quantized, _ = gpt2_models
    tokenizer = train_tokenizer("char", ["".join(chr(c) for c in range(32, 120))], 0)
    module = ServingModule(quantized, tokenizer, 32, FloatTwin(quantized, build_causal_lm(cfg)))
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"score": module.score})
    reader = tf.train.load_checkpoint(str(tmp_path / "sm" / "variables" / "variables"))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    stored = sum(int(np.prod(shapes[k])) * dtypes[k].size for k in shapes if "VARIABLE_VALUE" in k)
    # the int8 weights and scales, a few bytes of serving state, and no float copy
    assert weight_bytes(quantized) <= stored < weight_bytes(quantized) + 1024 < weight_bytes(float_model) / 3


def test_twin_and_mode_checks(models):
    from tfllm.models import build_causal_lm
    from tfllm.quantize import FloatTwin, check_mode, quantize

    cfg, float_model, quantized, _ = models
    with pytest.raises(ConfigError, match="expected one of int8, int4"):
        check_mode("fp8")
    with pytest.raises(ConfigError, match=r"already quantized \(int8\)"):
        quantize(quantized, "int8", source="m")
    with pytest.raises(ConfigError, match="a float twin serves int8 models, not None"):
        FloatTwin(float_model, build_causal_lm(cfg))


def test_an_int4_export_serves_what_its_model_keras_computes_and_its_preset_is_refused(gpt2_models, tmp_path):
    import tensorflow as tf

    from tfllm import preset
    from tfllm.config import Config
    from tfllm.export import export
    from tfllm.models import build_causal_lm, lm_loss_sums
    from tfllm.quantize import quantize
    from tfllm.restore import load_export
    from tfllm.tokenizers import EOD_ID, train_tokenizer

    cfg, float_model, _, _ = gpt2_models
    model = build_causal_lm(cfg)
    model.set_weights(float_model.get_weights())
    quantize(model, "int4")
    tokenizer = train_tokenizer("char", ["".join(chr(c) for c in range(32, 120))], 0)
    out = tmp_path / "int4"
    export(model, tokenizer, 32, str(out), record={"config": Config(model=cfg).to_dict(), "step": 0, "checkpoint": ""})
    trained = load_export(str(out))
    assert trained.quantization == "int4"
    text = "def add(a, b): return a + b"
    ids = [EOD_ID] + tokenizer.encode(text)
    loss_sum, _, _ = lm_loss_sums(trained.model, tf.constant([ids]), training=False)
    served = tf.saved_model.load(str(out / "saved_model")).signatures["score"](texts=tf.constant([text]))
    assert abs(float(served["log_prob"][0]) + float(loss_sum)) < 1e-3
    with pytest.raises(ConfigError, match="a quantized preset"):
        preset.model_config(str(out / "preset"))
