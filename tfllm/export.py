"""SavedModel export with string-in / string-out serving signatures.

The exported module holds the tokenizer (`tfllm.tokenizers`, TensorFlow + tensorflow-text ops
with its vocabulary or SentencePiece model as graph constants) and the Keras model, so a server
needs only `import tensorflow, tensorflow_text` to load it:

    generate(prompts: string[B], max_new_tokens: int32[]) -> {"text": string[B]}
        greedy continuation (keras-hub's cached sampler), stopping at <eod>; same as
        `pipelines.generate --strategy=greedy`.
    score(texts: string[B]) -> {"log_prob": float32[B], "tokens": int32[B]}
        total natural-log probability of each text given the start-of-document context (<eod>,
        as in training), over at most `context - 1` tokens; `tokens` says how many were scored.

Both clean their text as the training data was (`--clean`, tfllm.data.cleaning) before tokenizing.
"""

from __future__ import annotations

import os

import keras
import keras_hub
import tensorflow as tf

from tfllm import atomic, preset
from tfllm.config import ConfigError
from tfllm.data.cleaning import clean_strings
from tfllm.quantize import FloatTwin, TwinServing, quantization_mode, save_for_serving
from tfllm.restore import EXPORT_FILE
from tfllm.tokenizers import EOD_ID, PAD_ID, Encoding, Tokenizer


class ServingModule(TwinServing):
    """The language model's signatures (see `TwinServing` for `twin`)."""

    def __init__(self, model: keras.Model, tokenizer: Tokenizer, context: int, twin: FloatTwin | None = None,
                 clean: str = "none"):
        super().__init__(model, twin, "tfllm_serving")
        self.tokenizer, self.clean = tokenizer, clean
        self.context = int(context)
        self.runner.compile(sampler=keras_hub.samplers.GreedySampler())
        self.generate = tf.function(self._generate, input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"), tf.TensorSpec([], tf.int32, name="max_new_tokens")])
        self.score = tf.function(self._score, input_signature=[tf.TensorSpec([None], tf.string, name="texts")])

    def _generate(self, prompts, max_new_tokens):
        ids = self.tokenizer.tokenize(clean_strings(prompts, self.clean, strip=False))  # a prompt's edge spaces count
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        tf.debugging.assert_positive(tf.reduce_min(lengths), message="empty prompt")
        tf.debugging.assert_positive(max_new_tokens, message="max_new_tokens must be positive")
        total = tf.reduce_max(lengths) + max_new_tokens
        tf.debugging.assert_less_equal(total, self.context, message="prompt + max_new_tokens exceeds the context")
        token_ids = ids.to_tensor(default_value=PAD_ID)
        token_ids = tf.pad(token_ids, [[0, 0], [0, total - tf.shape(token_ids)[1]]], constant_values=PAD_ID)
        mask = tf.sequence_mask(lengths, total)
        with self.serving_weights():
            out = self.runner.generate_step({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=[EOD_ID])
        generated = out["token_ids"]
        positions = tf.range(total)[tf.newaxis, :]
        is_new = (positions >= lengths[:, tf.newaxis]) & (positions < (lengths + max_new_tokens)[:, tf.newaxis])
        # Cut each row at its first generated <eod>: what follows belongs to no document.
        after_eod = tf.math.cumsum(tf.cast(is_new & tf.equal(generated, EOD_ID), tf.int32), axis=1) > 0
        kept = is_new & ~after_eod
        whole = tf.ragged.boolean_mask(generated, (positions < lengths[:, tf.newaxis]) | kept)
        return {"text": self.tokenizer.continuations(ids, whole, tf.ragged.boolean_mask(generated, kept))}

    def _score(self, texts):
        full = Encoding(self.context, "head", self.clean).token_ids(self.tokenizer, texts)
        lengths = tf.cast(full.row_lengths(), tf.int32)
        dense = full.to_tensor(default_value=PAD_ID)
        inputs, targets = dense[:, :-1], dense[:, 1:]
        mask = tf.sequence_mask(lengths - 1, tf.shape(targets)[1])
        with self.serving_weights():
            logits = self.runner({"token_ids": inputs, "padding_mask": tf.ones_like(inputs, tf.bool)})
        logits = tf.cast(logits, tf.float32)
        log_probs = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        log_probs = tf.where(mask, log_probs, 0.0)
        return {"log_prob": tf.reduce_sum(log_probs, axis=1), "tokens": lengths - 1}


def output_dir(path: str, overwrite: bool) -> str:
    """An export's destination, as an absolute path; an existing one only with `overwrite`."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{path}: output path exists (pass --overwrite to replace it)")
    return path


def export(model: keras.Model, tokenizer: Tokenizer, context: int, out_dir: str, overwrite: bool = False,
           record: dict | None = None, float_twin: keras.Model | None = None, clean: str = "none") -> str:
    """Writes `<out_dir>/saved_model`, `model.keras`, `tokenizer/`, `preset/` (a keras-hub preset
    with the tokenizer inside, see `tfllm.preset`) and `export.json` (`record`: the training
    config, step and checkpoint, plus the quantization mode), atomically; returns out_dir."""
    out_dir = output_dir(out_dir, overwrite)
    mode = quantization_mode(model)
    if mode == "int8" and float_twin is None:
        raise ValueError("an int8 export needs float_twin (a float model of the same architecture)")

    def build(tmp: str) -> None:
        served, twin = save_for_serving(model, os.path.join(tmp, "model.keras"), lambda: float_twin)
        preset.save(model, tokenizer, os.path.join(tmp, "preset"))
        module = ServingModule(served, tokenizer, context, twin, clean)
        tf.saved_model.save(module, os.path.join(tmp, "saved_model"),
                            signatures={"generate": module.generate, "score": module.score})
        tokenizer.save(os.path.join(tmp, "tokenizer"))
        atomic.write_json(os.path.join(tmp, EXPORT_FILE), {**(record or {}), "quantization": mode})
    return atomic.build_dir(out_dir, build)
