"""Post-training weight quantization of a trained causal LM, for export.

Keras 3 quantizes its own layers in place (`Model.quantize`): Dense and EinsumDense kernels and
Embedding tables become int8 (or packed int4) variables with one float32 scale per output
channel, and their calls dequantize on the fly. Everything a keras-hub GPT-2 or Llama spends its
parameters on is such a layer: the attention and MLP projections, and the token embedding, whose
transpose is also the tied LM head. Layer norms, biases and GPT-2's learned position embedding
stay float32. The layers serialise with their quantized variables, so a quantized model saves to
`.keras` and to a keras-hub preset, and traces into a SavedModel whose graph holds the int8
constants and the dequantizing ops: TensorFlow alone serves it.

int8 quantizes each Dense input per token at call time as well (abs-max, symmetric), so the
matmul runs on int8 operands; int4 packs two weights per byte and dequantizes the kernel before a
float matmul.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from tfllm.config import ConfigError

MODES = ("int8", "int4")


def quantization_mode(model: keras.Model) -> str | None:
    """The mode a model's layers were quantized with, or None for a float model."""
    for layer in model._flatten_layers(include_self=False):
        mode = getattr(layer, "quantization_mode", None)
        if mode:
            return mode
    return None


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"--quantize={mode}: expected one of {', '.join(MODES)}")


def quantize(model: keras.Model, mode: str, source: str = "the model") -> keras.Model:
    """Quantizes `model`'s weights in place and returns it."""
    check_mode(mode)
    refuse_quantized(model, source)
    with warnings.catch_warnings():
        # Keras names every layer without a quantized form (norms, dropout, position embedding).
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        model.quantize(mode)
    return model


def refuse_quantized(model: keras.Model, source: str) -> None:
    """A quantized model is final: quantizing it again would compound the rounding, and Keras
    3.15 cannot save a quantized model it has loaded (its reversible token embedding reloads
    without the quantized dtype policy and saves no scale), so it cannot be exported again."""
    done = quantization_mode(model)
    if done:
        raise ConfigError(f"{source} is already quantized ({done}); export from the float model dir it came from")


def reload(model: keras.Model, keras_file: str) -> keras.Model:
    """The model as a later `load_model` of its saved file sees it: an int4 model computes
    slightly differently before its first save than after, and the SavedModel must serve the
    same numbers as model.keras and the preset."""
    return keras.saving.load_model(keras_file, compile=False)


def weight_bytes(model: keras.Model) -> int:
    """Bytes of the model's variables as stored (int8 and packed int4 count one byte each)."""
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights))
