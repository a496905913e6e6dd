"""Loading a trained model dir (config.json, tokenizer/, checkpoints/) for inference, or an export
of one (export.json, model.keras, tokenizer/: see `tfllm.export`), quantized or not."""

from __future__ import annotations

import dataclasses
import json
import os

import keras

from tfllm.checkpoint import CheckpointError, CheckpointManager
from tfllm.config import Config, ConfigError
from tfllm.models import build_causal_lm
from tfllm.tokenizers import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
EXPORT_FILE = "export.json"


@dataclasses.dataclass
class TrainedModel:
    model: keras.Model
    tokenizer: Tokenizer
    config: Config
    checkpoint: str
    step: int
    quantization: str | None = None  # an export's (its int8 model is served by a float twin)


def read_model_dir(model_dir: str) -> tuple[Config, Tokenizer]:
    """The config and tokenizer of a model dir, checked against each other; no weights."""
    if not model_dir:
        raise ConfigError("--model_dir is required")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model_dir={model_dir}: no such directory")
    config_path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise ConfigError(f"{model_dir}: no {CONFIG_FILE} (not a model dir written by pipelines.pretrain)")
    cfg = Config.load(config_path)
    tokenizer = load_tokenizer(os.path.join(model_dir, TOKENIZER_DIR))
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens, the model "
                              f"{cfg.model.vocab_size}")
    return cfg, tokenizer


def is_export(path: str) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, EXPORT_FILE))


def load_export(export_dir: str, checkpoint: str | None = "latest") -> TrainedModel:
    """The model an export holds, from its model.keras (quantized layers included)."""
    if checkpoint not in (None, "latest"):
        raise ConfigError(f"{export_dir} is an export, which holds one set of weights: --checkpoint={checkpoint} "
                          f"does not apply")
    try:
        with open(os.path.join(export_dir, EXPORT_FILE)) as f:
            record = json.load(f)
        if record.get("kind") == "classifier":
            raise ConfigError(f"{export_dir} is a classifier's export: pipelines.finetune --mode=evaluate or "
                              "--mode=predict takes it")
        record["config"], record["step"], record["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{export_dir}/{EXPORT_FILE}: not an export record ({type(e).__name__}: {e})") from None
    keras.mixed_precision.set_global_policy("float32")
    cfg = Config.from_dict(record["config"])
    model = keras.saving.load_model(os.path.join(export_dir, "model.keras"), compile=False)
    if record.get("quantization") == "int8":  # computed as the SavedModel serves it
        from tfllm.quantize import FloatTwin

        model = FloatTwin(model, build_causal_lm(cfg.model)).materialize()
    tokenizer = load_tokenizer(os.path.join(export_dir, TOKENIZER_DIR))
    return TrainedModel(model, tokenizer, cfg, record["checkpoint"], record["step"], record.get("quantization"))


def load_trained_model(model_dir: str, checkpoint: str | None = "latest") -> TrainedModel:
    """A pretraining model dir's checkpoint, or the model of an export dir."""
    if is_export(model_dir):
        return load_export(model_dir, checkpoint)
    cfg, tokenizer = read_model_dir(model_dir)
    manager = CheckpointManager(model_dir)
    path = manager.resolve(checkpoint)
    # Inference runs in float32 whatever the training policy was; the variables are float32 anyway.
    keras.mixed_precision.set_global_policy("float32")
    model = build_causal_lm(cfg.model)
    state = manager.restore(path, model.variables, model_only=True)
    return TrainedModel(model, tokenizer, cfg, path, int(state.get("step", 0)))
