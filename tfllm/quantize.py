"""Post-training weight quantization of a trained causal LM, for export.

Keras 3 quantizes its own layers in place (`Model.quantize`): Dense and EinsumDense kernels and
Embedding tables become int8 variables with one float32 scale per output channel (per row for
an embedding), or int4 packed two to a byte with a scale and zero point per 128 inputs (Keras's
default sub-channel int4), and their calls dequantize on the fly. Everything a keras-hub GPT-2 or Llama spends its
parameters on is such a layer: the attention and MLP projections, and the token embedding, whose
transpose is also the tied LM head. Layer norms, biases and GPT-2's learned position embedding
stay float32. The layers serialise with their quantized variables, so a quantized model saves to
`.keras` and to a keras-hub preset, and traces into a SavedModel whose graph holds the int8
constants and the dequantizing ops: TensorFlow alone serves it.

Serving speed on a CPU decides how an int8 model computes. Keras's int8 layers quantize each
input per token and multiply int8 by int8, and its weight-only variant casts the kernel to float
at every call; in TensorFlow 2.21 on a CPU both decode slower than the float model (int8 matmuls
fall back to Eigen; the cast reads and writes every weight at every token). An int8 export
therefore stores Keras's int8 weights and scales but computes with a float twin of the model
(`FloatTwin`): each serving call first dequantizes every weight (w = q / scale) into the twin,
then decodes with float matmuls exactly as the float model does. The numbers are those of Keras's
weight-only int8; the cost is one pass over the weights per call, and memory for a float copy
while the call runs. int4 keeps Keras's own layers (two weights per byte, unpacked per call).
"""

from __future__ import annotations

import contextlib
import warnings

import keras
import numpy as np
import tensorflow as tf

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
    refuse_quantized(quantization_mode(model), source)
    with warnings.catch_warnings():
        # Keras names every layer without a quantized form (norms, dropout, position embedding).
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        model.quantize(mode)
    return model


def refuse_quantized(done: str | None, source: str) -> None:
    """A quantized model is final: quantizing it again would compound the rounding, and Keras
    3.15 cannot save a quantized model it has loaded (its reversible token embedding reloads
    without the quantized dtype policy and saves no scale), so it cannot be exported again."""
    if done:
        raise ConfigError(f"{source} is already quantized ({done}); export from the float model dir it came from")


def reload(keras_file: str) -> keras.Model:
    """The model as a later `load_model` of its saved file sees it: an int4 model computes
    slightly differently before its first save than after, and the SavedModel must serve the
    same numbers as model.keras and the preset."""
    return keras.saving.load_model(keras_file, compile=False)


def save_for_serving(model: keras.Model, keras_file: str, float_model) -> tuple[keras.Model, "FloatTwin | None"]:
    """Saves `model` to `keras_file`; returns the model a SavedModel should trace (a quantized one
    as `reload` sees it) and, for int8, its float twin, which `float_model()` builds."""
    model.save(keras_file)
    mode = quantization_mode(model)
    served = reload(keras_file) if mode else model
    return served, (FloatTwin(served, float_model()) if mode == "int8" else None)


class FloatTwin:
    """Serves a quantized model at float speed: a float model of the same architecture whose every
    weight is computed, once per call of a serving function, from the quantized model's int8
    weights and scales. The decode loop then runs float matmuls on weights already in float, as
    the float model does, instead of casting or quantizing at every token (both of which cost more
    than they save on a CPU: see tests/benchmarks/quantize_bench.py). The twin's own variables are
    never read, and it is kept out of TensorFlow's object tracking, so a SavedModel stores only the
    quantized weights."""

    def __init__(self, quantized: keras.Model, twin: keras.Model):
        if quantization_mode(quantized) != "int8":
            raise ConfigError(f"a float twin serves int8 models, not {quantization_mode(quantized)}")
        self.quantized = {v.path: v for v in quantized.weights}
        missing = [v.path for v in twin.weights if v.path not in self.quantized]
        if missing:
            raise ConfigError(f"the float twin does not match the quantized model: {missing[:3]}")
        self.model = twin

    def values(self) -> list:
        """(twin variable, value) pairs for a keras.StatelessScope, computed in the caller's graph."""
        from keras import ops

        out = []
        for v in self.model.weights:
            q = self.quantized[v.path]
            if q.dtype != "int8":
                out.append((v, ops.convert_to_tensor(q)))
                continue
            scale = ops.convert_to_tensor(self.quantized[v.path + "_scale"])
            shape = list(scale.shape)
            while len(shape) > 1 and shape[0] == 1:  # einsum kernels keep the output's batch axes
                shape.pop(0)
            if v.path.endswith("embeddings"):  # one scale per row (token) of the table
                shape = shape + [1] * (len(q.shape) - len(shape))
            scale = ops.reshape(scale, shape)
            out.append((v, ops.divide(ops.cast(q, v.dtype), scale)))
        return out

    def scope(self):
        return keras.StatelessScope(state_mapping=self.values())

    def materialize(self) -> keras.Model:
        """The twin with the dequantized weights in its variables: in Python (evaluation,
        generation) it computes exactly what the int8 SavedModel serves."""
        for variable, value in self.values():
            variable.assign(value)
        return self.model


class TwinServing(tf.Module):
    """Base of the serving modules: `model`'s variables are what the SavedModel stores. With a
    `twin` (int8 models) the signatures compute with its float model, fed the dequantized weights
    once per call: `with self.serving_weights(): self.runner(...)`."""

    def __init__(self, model: keras.Model, twin: FloatTwin | None, name: str):
        super().__init__(name=name)
        self.model = model
        self.twin = twin  # a plain object: TensorFlow does not track it, so the twin's variables stay out

    @property
    def runner(self) -> keras.Model:
        """The model the signatures call (a property, not an attribute, so as not to be tracked)."""
        return self.twin.model if self.twin else self.model

    def serving_weights(self):
        return self.twin.scope() if self.twin else contextlib.nullcontext()


def weight_bytes(model: keras.Model) -> int:
    """Bytes of the model's variables as stored (int8 and packed int4 count one byte each)."""
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights))
