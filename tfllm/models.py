"""keras-hub causal language models built from a ModelConfig, and their loss.

Models are built from scratch (no weight downloads). Both families tie the language-model
head to the token embedding. `keras_hub.models.*CausalLM` is used as the model class because
it brings a key/value-cached `generate`.
"""

from __future__ import annotations

import math

import keras
import keras_hub
import tensorflow as tf

from tfllm.config import ConfigError, ModelConfig
from tfllm.segments import Chain, Unit, backbone_units
from tfllm.tokenizers import PAD_ID


def build_causal_lm(cfg: ModelConfig) -> keras_hub.models.CausalLM:
    """The causal LM with its variables created (a call on a dummy batch), ready to restore or train."""
    model = _causal_lm(cfg)
    head_in_compute_dtype(model)
    model(split_window(tf.zeros([1, 2], tf.int32))[0])
    apply_weight_init(model.backbone, cfg)
    return model


def head_in_compute_dtype(model: keras_hub.models.CausalLM) -> None:
    """Runs the tied vocabulary projection in the mixed-precision compute dtype.

    Keras's ReversibleEmbedding does not autocast its table, so under mixed_bfloat16 the head's
    matmul and its two gradient matmuls ran in float32: on an H100 (TF32 kernels) that was 11.6
    of GPT-2 124M's 72 ms of GPU time per step, the largest matmuls of the model. nanoGPT under
    autocast also projects in bf16; the loss still upcasts the logits to float32.
    """
    embedding = model.backbone.token_embedding
    if embedding.compute_dtype != embedding.variable_dtype:
        embedding.reverse_dtype = embedding.compute_dtype


# Kernels that write into the residual stream: each layer adds two (attention output, FFN output).
RESIDUAL_PROJECTIONS = ("self_attention/attention_output/kernel", "feedforward_output_dense/kernel")


def apply_weight_init(backbone: keras.Model, cfg: ModelConfig) -> None:
    """GPT-2's initialisation (Radford et al. 2019, as in nanoGPT) over keras-hub's defaults.

    keras-hub draws token embeddings from N(0, 0.01) and every kernel from N(0, 0.02). GPT-2
    uses 0.02 for the (tied) embeddings and scales the residual projections by 1/sqrt(2 L), so
    that the residual stream's variance at initialisation does not grow with depth. On tiny
    Shakespeare this lowers nanoGPT's baby-GPT validation loss by about 0.02.
    """
    if cfg.weight_init == "keras_hub":
        return
    residual_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    projections = [v for v in backbone.weights if v.path.endswith(RESIDUAL_PROJECTIONS)]
    if len(projections) != 2 * cfg.num_layers:  # keras-hub renamed its layers: fail loudly, not silently
        raise ConfigError(f"--weight_init=gpt2 found {len(projections)} residual projections in the "
                          f"{cfg.family} backbone, expected {2 * cfg.num_layers}; use --weight_init=keras_hub")
    for v in projections:
        v.assign(keras.initializers.RandomNormal(stddev=residual_std)(v.shape, v.dtype))
    embedding = backbone.token_embedding.embeddings
    embedding.assign(keras.initializers.RandomNormal(stddev=0.02)(embedding.shape, embedding.dtype))


def _causal_lm(cfg: ModelConfig) -> keras_hub.models.CausalLM:
    if cfg.vocab_size < 4:
        raise ConfigError(f"model vocab_size={cfg.vocab_size}: take it from the prepared data's manifest")
    if cfg.family == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=cfg.vocab_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
            hidden_dim=cfg.hidden_dim, intermediate_dim=cfg.ffn_dim, dropout=cfg.dropout,
            max_sequence_length=cfg.max_sequence_length)
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    if cfg.family == "llama":
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=cfg.vocab_size, num_layers=cfg.num_layers, num_query_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, hidden_dim=cfg.hidden_dim,
            intermediate_dim=cfg.ffn_dim, dropout=cfg.dropout, tie_word_embeddings=True)
        return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    raise ConfigError(f"--model={cfg.family!r}: unknown model family")


def split_window(windows: tf.Tensor) -> tuple[dict, tf.Tensor, tf.Tensor]:
    """[B, T+1] windows -> (inputs dict, [B, T] targets, [B, T] float mask of real targets)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    features = {"token_ids": inputs, "padding_mask": tf.ones_like(inputs, dtype=tf.bool)}
    return features, targets, tf.cast(targets != PAD_ID, tf.float32)


def lm_loss_sums(model: keras.Model, windows: tf.Tensor, training: bool, per_window: bool = False):
    """Summed next-token cross-entropy, correct predictions and target count over the batch.

    Sums rather than means: the distributed step normalises by the global token count, so
    batches and ranks with different numbers of real tokens are weighted exactly. With
    `per_window` the sums are [batch] vectors, one entry per window.
    """
    features, targets, mask = split_window(windows)
    return lm_sums(model(features, training=training), targets, mask, per_window)


def lm_sums(logits: tf.Tensor, targets: tf.Tensor, mask: tf.Tensor, per_window: bool = False):
    logits = tf.cast(logits, tf.float32)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=targets.dtype), targets), tf.float32)
    axis = 1 if per_window else None  # per window: evaluation sums them in float64 on the host
    return tf.reduce_sum(nll * mask, axis), tf.reduce_sum(correct * mask, axis), tf.reduce_sum(mask, axis)


def lm_chain(model: keras_hub.models.CausalLM) -> Chain:
    """`model`'s forward pass and `lm_loss_sums` as segments, for the bucketed backward."""
    backbone = model.backbone
    embed, blocks = backbone_units(backbone, lambda windows: split_window(windows)[0])

    def head(hidden, windows, training):
        return backbone.token_embedding(backbone.layer_norm(hidden), reverse=True)

    def sums(logits, windows):
        _, targets, mask = split_window(windows)
        return lm_sums(logits, targets, mask)
    return Chain(embed, blocks, Unit("head", head, [backbone.layer_norm]), sums)


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(80) so that a diverged run still fits TensorBoard's float32."""
    return math.exp(min(loss, 80.0))


def count_params(model: keras.Model) -> int:
    return int(sum(int(tf.size(v)) for v in model.trainable_variables))


def non_embedding_params(model: keras.Model) -> int:
    return int(sum(int(tf.size(v)) for v in model.trainable_variables if "embedding" not in v.path))


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> int:
    """Training FLOPs per token: 6 N + 12 L d T (PaLM appendix B / nanoGPT's estimate).

    6 N covers forward (2 N) and backward (4 N) matrix multiplies over all N trainable
    parameters (the tied head is counted once, as in the parameter count); 12 L d T is the
    attention score and weighted-value matmuls (QK^T and AV, forward + backward) for
    context length T, model width d and L layers.
    """
    return 6 * n_params + 12 * cfg.num_layers * cfg.hidden_dim * seq_len
