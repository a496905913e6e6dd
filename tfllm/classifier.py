"""Text classifier on a pretrained tfllm backbone: pooling, head, loss, metrics, serving.

The backbone is the keras-hub backbone of a pretraining model dir (same config, same
tokenizer), restored from its checkpoint or freshly initialised for from-scratch comparisons.
Its sequence output is pooled (the last real token, which under causal attention has seen
the whole text, the mean over real tokens, or concat pooling as in ULMFiT: last, mean and
element-wise max side by side), then dropout and a dense head give logits.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfllm.config import POOLINGS
from tfllm.labelled import NO_LABEL, split_rows
from tfllm.models import lm_sums
from tfllm.quantize import FloatTwin, TwinServing
from tfllm.segments import Chain, Unit, backbone_units
from tfllm.tokenizers import EOD_ID, PAD_ID, Encoding, Tokenizer


@keras.saving.register_keras_serializable(package="tfllm")
class SequencePooling(keras.layers.Layer):
    """[B, T, d] hidden states and a [B, T] padding mask -> [B, d] ([B, 3d] for concat)."""

    def __init__(self, mode: str = "last", **kwargs):
        super().__init__(**kwargs)
        if mode not in POOLINGS:
            raise ValueError(f"pooling {mode!r}: expected one of {POOLINGS}")
        self.mode = mode

    def call(self, hidden, padding_mask):
        pooled = []
        if self.mode in ("last", "concat"):
            last_at = keras.ops.maximum(keras.ops.sum(keras.ops.cast(padding_mask, "int32"), axis=1) - 1, 0)
            pooled.append(keras.ops.take_along_axis(hidden, last_at[:, None, None], axis=1)[:, 0])
        if self.mode in ("mean", "concat"):
            mask = keras.ops.cast(padding_mask, hidden.dtype)
            total = keras.ops.sum(hidden * mask[:, :, None], axis=1)
            pooled.append(total / keras.ops.maximum(keras.ops.sum(mask, axis=1, keepdims=True), 1.0))
        if self.mode == "concat":
            # Filled with the batch's least value, padding never wins the max; no gradient reaches that value.
            floor = keras.ops.stop_gradient(keras.ops.min(hidden))
            pooled.append(keras.ops.max(keras.ops.where(padding_mask[:, :, None], hidden, floor), axis=1))
        return pooled[0] if len(pooled) == 1 else keras.ops.concatenate(pooled, axis=-1)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_classifier(backbone: keras.Model, num_classes: int, pooling: str = "last", dropout: float = 0.1) -> keras.Model:
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="bool", name="padding_mask")
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    pooled = SequencePooling(pooling, name="pooling")(hidden, padding_mask)
    pooled = keras.layers.Dropout(dropout, name="head_dropout")(pooled)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="classifier_head")(pooled)
    model = keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits, name="tfllm_classifier")
    model({"token_ids": tf.constant([[EOD_ID, 3]], tf.int32), "padding_mask": tf.constant([[True, True]])})
    return model


def head_variables(model: keras.Model, backbone: keras.Model) -> list:
    backbone_ids = {id(v) for v in backbone.trainable_variables}
    return [v for v in model.trainable_variables if id(v) not in backbone_ids]


def layer_lr_scales(model: keras.Model, backbone: keras.Model, decay: float) -> dict[str, float]:
    """Variable path -> learning-rate scale for layer-wise decay: 1 for the head and the final
    norm, decay**k for the transformer layer k below the top, and decay**(L+1) for the
    embeddings of an L-layer backbone. Empty when decay is 1 (every variable at the full rate)."""
    if decay == 1.0:
        return {}
    layers = list(backbone.transformer_layers)
    scales = {}
    for k, layer in enumerate(reversed(layers), start=1):
        scales.update({v.path: decay ** k for v in layer.trainable_variables})
    embed_unit, _ = backbone_units(backbone, features=None)
    for layer in embed_unit.layers:
        scales.update({v.path: decay ** (len(layers) + 1) for v in layer.trainable_variables})
    return scales


def make_loss_fn(class_weights: np.ndarray | None = None, lm_weight: float = 0.0, backbone: keras.Model | None = None):
    """(model, rows, training) -> (weighted NLL sum, correct, examples), for `TrainStep`.

    Class weights multiply each example's loss; the step still divides by the example count.
    Rows labelled NO_LABEL count for nothing. With `lm_weight` > 0 (GPT-1's auxiliary objective,
    which needs the model's `backbone`) each example's loss also has lm_weight times its mean
    next-token loss under the backbone's own language-model head, and a fourth sum follows: the
    examples' summed LM losses.
    """
    if lm_weight and backbone is None:
        raise ValueError("an auxiliary LM loss needs the classifier's backbone")
    sums = make_logit_sums(class_weights, lm_weight)

    def loss_sums(model, batch, training):
        features = split_rows(batch)[0]
        if not lm_weight:
            return sums(model(features, training=training), batch)
        heads = classifier_heads(model, backbone, lm_weight)
        return sums(heads(backbone(features, training=training), features, training), batch)
    return loss_sums


def classifier_heads(model: keras.Model, backbone: keras.Model, lm_weight: float = 0.0):
    """(backbone output, features, training) -> the class logits, and with `lm_weight` > 0 also the
    next-token logits of every position but the last (the tied vocabulary projection)."""
    pooling, dropout, head = (model.get_layer(n) for n in ("pooling", "head_dropout", "classifier_head"))

    def heads(hidden, features, training):
        logits = head(dropout(pooling(hidden, features["padding_mask"]), training=training))
        if not lm_weight:
            return logits
        return logits, backbone.token_embedding(hidden[:, :-1], reverse=True)
    return heads


def make_logit_sums(class_weights: np.ndarray | None = None, lm_weight: float = 0.0):
    """(outputs of `classifier_heads`, rows) -> the sums of `make_loss_fn`, from logits already computed."""
    weights = None if class_weights is None else tf.constant(class_weights, tf.float32)

    def sums(outputs, batch):
        features, labels = split_rows(batch)
        logits, lm_logits = outputs if lm_weight else (outputs, None)
        real = labels != NO_LABEL
        safe = tf.where(real, labels, 0)
        logits = tf.cast(logits, tf.float32)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
        mask = tf.cast(real, tf.float32)
        if weights is not None:
            nll = nll * tf.gather(weights, safe)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=safe.dtype), safe), tf.float32)
        if not lm_weight:
            return tf.reduce_sum(nll * mask), tf.reduce_sum(correct * mask), tf.reduce_sum(mask)
        # A mean per example, so that a long review weighs no more than a short phrase.
        targets = features["token_ids"][:, 1:]
        lm_nll, _, lm_count = lm_sums(lm_logits, targets, tf.cast(targets != PAD_ID, tf.float32), per_window=True)
        lm_loss = tf.reduce_sum(lm_nll / tf.maximum(lm_count, 1.0) * mask)
        return (tf.reduce_sum(nll * mask) + lm_weight * lm_loss, tf.reduce_sum(correct * mask), tf.reduce_sum(mask),
                lm_loss)
    return sums


def classifier_chain(model: keras.Model, backbone: keras.Model, class_weights: np.ndarray | None = None,
                     lm_weight: float = 0.0) -> Chain:
    """`build_classifier`'s model and `make_loss_fn`'s sums as segments, for the bucketed backward."""
    embed, blocks = backbone_units(backbone, lambda batch: split_rows(batch)[0])
    heads = classifier_heads(model, backbone, lm_weight)

    def top(hidden, batch, training):
        return heads(backbone.layer_norm(hidden), split_rows(batch)[0], training)
    return Chain(embed, blocks, Unit("head", top, [backbone.layer_norm, model.get_layer("classifier_head")]),
                 make_logit_sums(class_weights, lm_weight))


def balanced_class_weights(label_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (C * count_c): every class contributes equally to the loss (absent classes get 0)."""
    counts = np.bincount(label_ids, minlength=num_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, len(label_ids) / (num_classes * counts), 0.0)
    return w.astype(np.float32)


def classification_report(confusion: np.ndarray, loss_sum: float, classes: list[str]) -> dict:
    """Accuracy, loss and per-class precision/recall/F1 from a [true, predicted] confusion matrix."""
    confusion = np.asarray(confusion, np.int64)
    total = int(confusion.sum())
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": actual}
    return {"examples": total, "accuracy": float(np.trace(confusion)) / max(total, 1),
            "loss": loss_sum / max(total, 1), "per_class": per_class, "confusion": confusion.tolist(),
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values()]))}


def format_report(report: dict, classes: list[str]) -> str:
    width = max(8, *(len(c) for c in classes))
    lines = [f"accuracy={report['accuracy']:.4f} loss={report['loss']:.4f} macro_f1={report['macro_f1']:.4f} "
             f"examples={report['examples']}",
             f"{'class':<{width}} precision  recall      f1  support"]
    for name, c in report["per_class"].items():
        lines.append(f"{name:<{width}} {c['precision']:9.4f} {c['recall']:7.4f} {c['f1']:7.4f} {c['support']:8d}")
    lines.append("confusion (rows: true, columns: predicted) " + " ".join(classes))
    lines += [f"{name:<{width}} " + " ".join(f"{n:6d}" for n in row) for name, row in zip(classes, report["confusion"])]
    return "\n".join(lines)


def confusion_png(confusion, classes: list[str]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1 + 0.6 * len(classes)), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(confusion):
        ax.text(j, i, str(n), ha="center", va="center", color="black" if n < confusion.max() / 2 else "white")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class ClassifierServing(TwinServing):
    """Strings in, probabilities out: tokenizer and classifier in one SavedModel (TF + tf_text only);
    an int8 classifier computes with a float twin (see `TwinServing`)."""

    def __init__(self, model: keras.Model, tokenizer: Tokenizer, classes: list[str], encoding: Encoding,
                 twin: FloatTwin | None = None):
        super().__init__(model, twin, "tfllm_classifier")
        # Cleaning and truncation as in training: a served review may arrive with its markup.
        self.tokenizer, self.encoding = tokenizer, encoding
        self.class_names = tf.constant(classes)
        self.classify = tf.function(self._classify, input_signature=[tf.TensorSpec([None], tf.string, name="texts")])

    def _classify(self, texts):
        tokens = self.encoding.token_ids(self.tokenizer, texts).to_tensor(default_value=PAD_ID)
        with self.serving_weights():
            logits = self.runner({"token_ids": tokens, "padding_mask": tokens != PAD_ID})
        probs = tf.nn.softmax(tf.cast(logits, tf.float32))
        best = tf.argmax(probs, axis=-1, output_type=tf.int32)
        return {"probabilities": probs, "label": tf.gather(self.class_names, best),
                "probability": tf.reduce_max(probs, axis=-1)}
