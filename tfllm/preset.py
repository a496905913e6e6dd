"""keras-hub presets in local directories: writing them on export, starting pretraining from one.

A preset directory is keras-hub's layout (`config.json` with the backbone's class and config,
`task.json`, `metadata.json`, `model.weights.h5`), so `keras_hub.models.CausalLM.from_preset(dir,
preprocessor=None)` loads the GPT-2 ones as they are. tfllm adds its own `tokenizer/` inside, which
keras-hub ignores, so that a run started from the preset can tokenize its data the same way.

Reading is ours rather than `Backbone.from_preset`: keras-hub 0.32 leaves `tie_word_embeddings` out
of LlamaBackbone's saved config and then cannot load its own tied Llama presets. tfllm builds the
model from the config (always tied), checks that the rebuilt backbone's config equals the saved
one, and loads the weights file into it. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import re
import os

import keras

from tfllm import atomic
from tfllm.config import ConfigError, ModelConfig
from tfllm.tokenizers import TOKENIZER_FILE, Tokenizer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "config.json", "model.weights.h5", "tokenizer"
# Saved-config keys that describe the run rather than the architecture.
_NOT_ARCHITECTURE = ("name", "trainable", "dtype", "dropout")


def _backbone_config(path: str) -> tuple[str, dict]:
    if not os.path.isdir(path):
        raise ConfigError(f"--init_preset={path}: no such directory")
    config_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(config_path) as f:
            saved = json.load(f)
        return saved["class_name"], saved["config"]
    except FileNotFoundError:
        raise ConfigError(f"--init_preset={path}: no {CONFIG_FILE} (not a keras-hub preset directory)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{config_path}: not a keras-hub backbone config ({type(e).__name__}: {e})") from None


def model_config(path: str) -> ModelConfig:
    """The architecture of the preset at `path`, as tfllm's ModelConfig."""
    class_name, c = _backbone_config(path)
    # int8 layers save a QuantizedDTypePolicy, int4 an Int4DTypePolicy (and float8, GPTQ, AWQ their own).
    if re.search(r"Quantized|Int4|Float8|GPTQ|AWQ", json.dumps(c.get("dtype"))):
        raise ConfigError(f"--init_preset={path}: a quantized preset (pipelines.export --quantize) serves; "
                          f"training starts from a float one")
    try:
        if class_name == "GPT2Backbone":
            return ModelConfig(family="gpt2", num_layers=c["num_layers"], num_heads=c["num_heads"],
                               hidden_dim=c["hidden_dim"], intermediate_dim=c["intermediate_dim"],
                               dropout=c.get("dropout", 0.0), max_sequence_length=c["max_sequence_length"],
                               vocab_size=c["vocabulary_size"])
        if class_name == "LlamaBackbone":
            if not c.get("tie_word_embeddings", True):
                raise ConfigError(f"--init_preset={path}: an untied language-model head; tfllm's models tie it "
                                  "to the token embedding")
            return ModelConfig(family="llama", num_layers=c["num_layers"], num_heads=c["num_query_heads"],
                               num_kv_heads=c["num_key_value_heads"], hidden_dim=c["hidden_dim"],
                               intermediate_dim=c["intermediate_dim"], dropout=c.get("dropout", 0.0),
                               vocab_size=c["vocabulary_size"])
    except KeyError as e:
        raise ConfigError(f"--init_preset={path}: {CONFIG_FILE} lacks {e} for {class_name}") from None
    raise ConfigError(f"--init_preset={path}: backbone {class_name} is not supported (GPT2Backbone, LlamaBackbone)")


def load_weights(model: keras.Model, path: str) -> None:
    """Loads the preset's weights into `model` (built by `build_causal_lm(model_config(path))`)."""
    _, saved = _backbone_config(path)
    built = model.backbone.get_config()
    diffs = sorted(k for k in saved if k not in _NOT_ARCHITECTURE and saved[k] != built.get(k))
    if diffs:
        raise ConfigError(f"--init_preset={path}: the model differs from the preset in "
                          + ", ".join(f"{k} ({built.get(k)} vs {saved.get(k)})" for k in diffs))
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise ConfigError(f"--init_preset={path}: no {WEIGHTS_FILE}")
    try:
        model.backbone.load_weights(weights)
    except (ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{weights}: does not load into the model ({first_line})") from None


def tokenizer_dir(path: str) -> str:
    """The tfllm tokenizer saved inside the preset, or '' when it has none."""
    candidate = os.path.join(path, TOKENIZER_DIR)
    return candidate if os.path.exists(os.path.join(candidate, TOKENIZER_FILE)) else ""


def save(model: keras.Model, tokenizer: Tokenizer, out_dir: str) -> str:
    """Writes a keras-hub preset of `model` with tfllm's tokenizer inside, atomically."""
    def build(tmp: str) -> None:
        model.save_to_preset(tmp)
        tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
    return atomic.build_dir(out_dir, build)
