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
from tfllm.config import Config, ConfigError, DataConfig, DistillConfig
from tfllm.data.prepare import MANIFEST, read_manifest
from tfllm.models import build_causal_lm, count_params, flops_per_token, lm_chain, lm_sums, split_window
from tfllm.restore import CONFIG_FILE, TOKENIZER_DIR, is_export, read_model_dir
from tfllm.segments import Chain
from tfllm.tokenizers import Tokenizer, load_tokenizer


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


def student_config(cfg: Config, data_dir_given: bool, context_given: bool) -> Config:
    """The student's run from its flags: the data it reads, tokenized as the teacher's was.

    Without --data_dir that is the teacher's prepared data. Prepared data (the teacher's, a rerun's
    or data prepared beforehand) is read as it is, whatever data flags a shared flagfile sets; new
    data gets the teacher's tokenizer, checked before anything is prepared or written.
    """
    dcfg = cfg.distill
    if not dcfg.teacher_dir:
        raise ConfigError("--teacher_dir is required: the pretraining model dir of the teacher")
    teacher, tokenizer = _read_teacher(dcfg.teacher_dir)
    if not data_dir_given:
        cfg.data = dataclasses.replace(teacher.data, overwrite=False)
        if not context_given and not cfg.train.init_preset:
            cfg.model.max_sequence_length = cfg.data.seq_len
    data_dir = cfg.data.data_dir or os.path.join(cfg.train.model_dir, "data")
    if os.path.exists(os.path.join(data_dir, MANIFEST)):
        known = {f.name for f in dataclasses.fields(DataConfig)}
        saved = {k: v for k, v in read_manifest(data_dir)["config"].items() if k in known}
        cfg.data = dataclasses.replace(cfg.data, **saved, overwrite=False)
    else:
        cfg.data.tokenizer_dir = os.path.abspath(cfg.data.tokenizer_dir or os.path.join(dcfg.teacher_dir, TOKENIZER_DIR))
        _same_tokenizer(tokenizer, load_tokenizer(cfg.data.tokenizer_dir), dcfg.teacher_dir,
                        f"--tokenizer_dir={cfg.data.tokenizer_dir}")
    _check_context(teacher, dcfg.teacher_dir, cfg.data.seq_len)
    if CheckpointManager(dcfg.teacher_dir).latest() is None:
        _no_checkpoint(dcfg.teacher_dir)
    return cfg


def _check_context(teacher: Config, teacher_dir: str, seq_len: int) -> None:
    if teacher.model.family == "gpt2" and teacher.model.max_sequence_length < seq_len:
        raise ConfigError(f"--teacher_dir={teacher_dir}: the teacher's context ({teacher.model.max_sequence_length} "
                          f"tokens) is shorter than the data's windows (--seq_len={seq_len})")


def _no_checkpoint(teacher_dir: str):
    raise CheckpointError(f"--teacher_dir={teacher_dir}: no checkpoint to learn from (train the teacher first: "
                          f"pipelines.pretrain --model_dir={teacher_dir})")


def _read_teacher(teacher_dir: str) -> tuple[Config, Tokenizer]:
    if is_export(teacher_dir):
        raise ConfigError(f"--teacher_dir={teacher_dir} is an export; pass the model dir it was exported from "
                          "(its export.json names the checkpoint)")
    try:
        return read_model_dir(teacher_dir)
    except ConfigError as e:
        raise ConfigError(f"--teacher_dir: {e}") from None


def _same_tokenizer(teacher: Tokenizer, other: Tokenizer, teacher_dir: str, where: str) -> None:
    if other.kind != teacher.kind or other.files() != teacher.files():
        raise ConfigError(
            f"--teacher_dir={teacher_dir}: its tokenizer ({teacher.kind}, {teacher.vocab_size} tokens) is not the "
            f"data's ({other.kind}, {other.vocab_size} tokens, {where}); distillation compares distributions over "
            f"the same token ids: prepare the data with --tokenizer_dir={os.path.join(teacher_dir, TOKENIZER_DIR)}")


def check_teacher(cfg: Config, seq_len: int) -> tuple[Config, str]:
    """The teacher's config and the checkpoint to learn from, once everything that would make
    distillation meaningless is ruled out; reads no weights (rank 0 runs it for everyone).

    A run's first start fixes the checkpoint (config.json records it): a rerun learns from the
    same teacher even when the teacher dir has trained on since, with the same T and alpha.
    """
    dcfg = cfg.distill
    teacher, tokenizer = _read_teacher(dcfg.teacher_dir)
    _same_tokenizer(tokenizer, load_tokenizer(os.path.join(cfg.data.data_dir, TOKENIZER_DIR)), dcfg.teacher_dir,
                    cfg.data.data_dir)
    _check_context(teacher, dcfg.teacher_dir, seq_len)
    checkpoint = _pinned_checkpoint(cfg) or CheckpointManager(dcfg.teacher_dir).latest()
    if checkpoint is None:
        _no_checkpoint(dcfg.teacher_dir)
    return teacher, checkpoint


def _pinned_checkpoint(cfg: Config) -> str | None:
    path = os.path.join(cfg.train.model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    saved, dcfg = Config.load(path).distill, cfg.distill
    if not saved.teacher_dir:
        raise ConfigError(f"{cfg.train.model_dir} holds a run trained without a teacher; distil into another "
                          "--model_dir")
    if (os.path.realpath(saved.teacher_dir), saved.temperature, saved.alpha) != (
            os.path.realpath(dcfg.teacher_dir), dcfg.temperature, dcfg.alpha):
        raise ConfigError(f"{cfg.train.model_dir} was distilled from --teacher_dir={saved.teacher_dir} with "
                          f"--distill_temperature={saved.temperature:g} --distill_alpha={saved.alpha:g}; rerun with "
                          "those or use another --model_dir")
    if saved.checkpoint and not os.path.exists(os.path.join(saved.checkpoint, "state.json")):
        raise CheckpointError(f"{saved.checkpoint}: the teacher checkpoint that {cfg.train.model_dir} learns from "
                              "is gone")
    return saved.checkpoint or None


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
