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


_EXPORT_KINDS = {  # what each kind of export's record holds, and which pipelines take it
    "language_model": (("config", "step", "checkpoint"), "pipelines.evaluate and pipelines.generate take it"),
    "classifier": (("config", "classes", "backbone", "checkpoint"),
                   "pipelines.finetune --mode=evaluate or --mode=predict takes it"),
}


def read_export_record(export_dir: str, checkpoint: str | None, kind: str, default: str) -> dict:
    """An export's export.json, checked to be of `kind`; `checkpoint` may only be None or the
    pipeline's `default` (an export holds one set of weights)."""
    if checkpoint not in (None, default):
        raise ConfigError(f"{export_dir} is an export, which holds one set of weights: --checkpoint={checkpoint} "
                          f"does not apply")
    try:
        with open(os.path.join(export_dir, EXPORT_FILE)) as f:
            record = json.load(f)
        found = record.get("kind", "language_model")  # exports before classifiers had one carry no kind
        if found != kind:
            raise ConfigError(f"{export_dir} is a {found.replace('_', ' ')}'s export: {_EXPORT_KINDS[found][1]}")
        for key in _EXPORT_KINDS[kind][0]:
            record[key]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{export_dir}/{EXPORT_FILE}: not an export record ({type(e).__name__}: {e})") from None
    return record


def load_export_model(export_dir: str, record: dict, float_model) -> keras.Model:
    """An export's model.keras; an int8 one as its SavedModel computes it, through the float twin
    that `float_model()` builds."""
    keras.mixed_precision.set_global_policy("float32")
    model = keras.saving.load_model(os.path.join(export_dir, "model.keras"), compile=False)
    if record.get("quantization") == "int8":
        from tfllm.quantize import FloatTwin

        model = FloatTwin(model, float_model()).materialize()
    return model


def load_export(export_dir: str, checkpoint: str | None = "latest") -> TrainedModel:
    """The model a language model's export holds (quantized layers included)."""
    record = read_export_record(export_dir, checkpoint, "language_model", "latest")
    cfg = Config.from_dict(record["config"])
    model = load_export_model(export_dir, record, lambda: build_causal_lm(cfg.model))
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
