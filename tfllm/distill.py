"""Knowledge distillation: a student language model trained on a teacher's next-token distributions.

The objective per real target token (Hinton, Vinyals and Dean 2015):

    (1 - alpha) * CE(next token, student) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

Softening both distributions by T > 1 exposes what the teacher thinks of the tokens it ranks below
the first (which characters are plausible after "th"); the T^2 factor keeps the soft term's
gradient on the scale of the hard term's whatever T is. Like every loss of `TrainStep`, the parts
are sums over real tokens, so ranks, micro-batches and padding are weighted exactly.

The teacher is the latest checkpoint of a pretraining model dir, frozen, built under the run's
precision policy and run in inference mode inside the student's (compiled) forward pass, on every
rank. It must use the data's tokenizer: the KL compares distributions over the same token ids.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from tfllm.checkpoint import CheckpointError, CheckpointManager
from tfllm.config import Config, ConfigError, DistillConfig
from tfllm.models import build_causal_lm, count_params, flops_per_token, lm_chain, lm_sums, split_window
from tfllm.restore import TOKENIZER_DIR, is_export, read_model_dir
from tfllm.segments import Chain
from tfllm.tokenizers import load_tokenizer


@dataclasses.dataclass
class Teacher:
    model: keras.Model
    config: Config
    checkpoint: str
    step: int
    params: int

    def forward_flops_per_token(self, seq_len: int) -> int:
        """The teacher's share of each training token's FLOPs: a forward pass, a third of a training step's."""
        return flops_per_token(self.config.model, seq_len, self.params) // 3

    def describe(self, dcfg: DistillConfig) -> str:
        return (f"{dcfg.teacher_dir} ({self.config.model.num_layers} layers, {self.params:,} parameters, "
                f"step {self.step}), T={dcfg.temperature:g}, alpha={dcfg.alpha:g}")


def check_teacher(dcfg: DistillConfig, data_dir: str, seq_len: int) -> tuple[Config, str]:
    """The teacher's config and checkpoint, once everything that would make distillation
    meaningless is ruled out; reads no weights (rank 0 runs it for everyone)."""
    teacher_dir = dcfg.teacher_dir
    if is_export(teacher_dir):
        raise ConfigError(f"--teacher_dir={teacher_dir} is an export; pass the model dir it was exported from "
                          "(its export.json names the checkpoint)")
    try:
        cfg, tokenizer = read_model_dir(teacher_dir)
    except ConfigError as e:
        raise ConfigError(f"--teacher_dir: {e}") from None
    checkpoint = CheckpointManager(teacher_dir).latest()
    if checkpoint is None:
        raise CheckpointError(f"--teacher_dir={teacher_dir}: no checkpoint to learn from (train the teacher "
                              "first: pipelines.pretrain --model_dir=" + teacher_dir + ")")
    data_tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"))
    if data_tokenizer.kind != tokenizer.kind or data_tokenizer.files() != tokenizer.files():
        raise ConfigError(
            f"--teacher_dir={teacher_dir}: its tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} tokens) is not "
            f"the data's ({data_tokenizer.kind}, {data_tokenizer.vocab_size} tokens, {data_dir}); distillation "
            f"compares distributions over the same token ids: prepare the data with "
            f"--tokenizer_dir={os.path.join(teacher_dir, TOKENIZER_DIR)}")
    if cfg.model.family == "gpt2" and cfg.model.max_sequence_length < seq_len:
        raise ConfigError(f"--teacher_dir={teacher_dir}: the teacher's context ({cfg.model.max_sequence_length} "
                          f"tokens) is shorter than the data's windows (--seq_len={seq_len})")
    return cfg, checkpoint


def load_teacher(teacher_dir: str, cfg: Config, checkpoint: str) -> Teacher:
    """The teacher model under the current precision policy, its weights restored and frozen."""
    model = build_causal_lm(cfg.model)
    state = CheckpointManager(teacher_dir).restore(checkpoint, model.variables, model_only=True)
    params = count_params(model)
    model.trainable = False
    return Teacher(model, cfg, checkpoint, int(state.get("step", 0)), params)


class DistillationLoss:
    """`TrainStep`'s loss_fn: (objective, correct, tokens, hard loss, KL) sums over a batch of windows."""

    STATS = ("hard_loss", "kl")  # reported per token next to the objective

    def __init__(self, teacher: keras.Model, dcfg: DistillConfig):
        self.teacher = teacher
        self.temperature, self.alpha = float(dcfg.temperature), float(dcfg.alpha)

    def __call__(self, model: keras.Model, windows: tf.Tensor, training: bool):
        return self.sums(model(split_window(windows)[0], training=training), windows)

    def sums(self, logits: tf.Tensor, windows: tf.Tensor):
        features, targets, mask = split_window(windows)
        hard, correct, count = lm_sums(logits, targets, mask)
        teacher_logits = tf.stop_gradient(tf.cast(self.teacher(features, training=False), tf.float32))
        t = self.temperature
        teacher_log_probs = tf.nn.log_softmax(teacher_logits / t)
        student_log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32) / t)
        kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
        kl_sum = tf.reduce_sum(kl * mask)
        objective = (1.0 - self.alpha) * hard + self.alpha * t * t * kl_sum
        return objective, correct, count, hard, kl_sum

    def chain(self, model: keras.Model) -> Chain:
        """The student's segments for the bucketed backward, ending in this loss."""
        return dataclasses.replace(lm_chain(model), sums=self.sums)
