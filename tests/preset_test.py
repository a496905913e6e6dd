"""keras-hub presets in local directories: round trips, keras-hub's own loader, and clear refusals."""

import contextlib
import dataclasses
import json

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from tfllm import preset
from tfllm.config import ConfigError, ModelConfig
from tfllm.models import build_causal_lm, split_window
from tfllm.tokenizers import load_tokenizer, train_tokenizer

TINY = ModelConfig(num_layers=2, num_heads=2, hidden_dim=32, max_sequence_length=32, vocab_size=60)
WINDOWS = tf.constant(np.random.default_rng(0).integers(3, 60, size=(2, 17)), tf.int32)


def _logits(model):
    return model(split_window(WINDOWS)[0]).numpy()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_preset_rebuilds_the_same_model_and_tokenizer(family, tmp_path):
    cfg = dataclasses.replace(TINY, family=family, num_kv_heads=1 if family == "llama" else 0, dropout=0.1)
    keras.utils.set_random_seed(1)
    original = build_causal_lm(cfg)
    tokenizer = train_tokenizer("char", iter(["abcdefg hij"]), 0)
    preset.save(original, tokenizer, str(tmp_path / "p"))

    read = preset.model_config(str(tmp_path / "p"))
    assert read.family == family and read.num_layers == 2 and read.hidden_dim == 32 and read.vocab_size == 60
    assert read.ffn_dim == cfg.ffn_dim and read.dropout == 0.1
    assert (read.num_kv_heads or read.num_heads) == (cfg.num_kv_heads or cfg.num_heads)
    if family == "gpt2":
        assert read.max_sequence_length == 32
    keras.utils.set_random_seed(2)  # a different initialisation, replaced by the preset's weights
    rebuilt = build_causal_lm(read)
    assert not np.allclose(_logits(rebuilt), _logits(original))
    preset.load_weights(rebuilt, str(tmp_path / "p"))
    np.testing.assert_array_equal(_logits(rebuilt), _logits(original))
    assert load_tokenizer(preset.tokenizer_dir(str(tmp_path / "p"))).encode("hij") == tokenizer.encode("hij")


def test_gpt2_preset_loads_with_keras_hub_itself(tmp_path):
    original = build_causal_lm(TINY)
    preset.save(original, train_tokenizer("char", iter(["abc"]), 0), str(tmp_path / "p"))
    loaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "p"), preprocessor=None)
    assert type(loaded).__name__ == "GPT2CausalLM"
    np.testing.assert_allclose(_logits(loaded), _logits(original), atol=1e-6)


@contextlib.contextmanager
def _one_line_error(match: str):
    with pytest.raises(ConfigError, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def test_bad_presets_are_refused_with_one_line(tmp_path):
    with _one_line_error(match="no such directory"):
        preset.model_config(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with _one_line_error(match="no config.json"):
        preset.model_config(str(tmp_path / "empty"))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{not json")
    with _one_line_error(match="not a keras-hub backbone config"):
        preset.model_config(str(tmp_path / "garbled"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"class_name": "BertBackbone", "config": {}}))
    with _one_line_error(match="BertBackbone is not supported"):
        preset.model_config(str(tmp_path / "bert"))
    assert preset.tokenizer_dir(str(tmp_path / "bert")) == ""

    preset.save(build_causal_lm(TINY), train_tokenizer("char", iter(["abc"]), 0), str(tmp_path / "p"))
    wider = build_causal_lm(dataclasses.replace(TINY, hidden_dim=64))
    with _one_line_error(match=r"differs from the preset in hidden_dim \(64 vs 32\)"):
        preset.load_weights(wider, str(tmp_path / "p"))
    (tmp_path / "p" / "model.weights.h5").write_bytes(b"not hdf5")
    with _one_line_error(match="does not load into the model"):
        preset.load_weights(build_causal_lm(TINY), str(tmp_path / "p"))


def test_preset_whose_vocabulary_or_context_does_not_fit_the_data_is_refused():
    from tfllm.config import Config
    from tfllm.train import resolve_config

    cfg = Config(model=dataclasses.replace(TINY))
    cfg.train.init_preset = "/presets/p"
    with _one_line_error(match=r"vocab_size=60 \(from --init_preset=/presets/p\) does not match the data's tokenizer "
                               r"\(70 tokens"):
        resolve_config(cfg, {"vocab_size": 70, "seq_len": 16})
    with _one_line_error(match=r"--max_sequence_length=32 \(from --init_preset=/presets/p\) is shorter than the "
                               r"data's windows \(--seq_len=64\)"):
        resolve_config(cfg, {"vocab_size": 60, "seq_len": 64})
    assert resolve_config(cfg, {"vocab_size": 60, "seq_len": 32}).model.vocab_size == 60
