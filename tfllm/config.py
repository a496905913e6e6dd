"""Configuration dataclasses: the single description of a run.

Library code takes these objects and never reads absl FLAGS; `tfllm.flags` builds them from
the command line. The resolved config is saved as `config.json` next to checkpoints, and a
resumed run compares its model section with the saved one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from tfllm import atomic
from tfllm.data.formats import listed

TOKENIZER_KINDS = ("char", "byte", "wordpiece", "sentencepiece_unigram", "sentencepiece_bpe")
MODEL_FAMILIES = ("gpt2", "llama")
CLEANING_STEPS = ("html", "ptb", "lower")  # tfllm.data.cleaning; --clean names some, comma-separated, or none
TRUNCATIONS = ("head", "head_tail")  # tfllm.tokenizers.truncate
POOLINGS = ("last", "mean", "concat")  # tfllm.classifier.SequencePooling
WEIGHT_INITS = ("gpt2", "keras_hub")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
MAX_SHARDS = 4096  # per split; preparation keeps one open file per shard


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag."""


def clean_steps(how: str, flag: str = "--clean") -> tuple[str, ...]:
    """The cleaning steps a --clean value names ("none", or steps joined by commas), in the order
    they run, which is CLEANING_STEPS' order whatever the order written."""
    names = () if how == "none" else tuple(how.split(","))
    if (not names and how != "none") or len(set(names)) != len(names) or not set(names) <= set(CLEANING_STEPS):
        raise ConfigError(f"{flag}={how!r}: expected none, or one or more of {', '.join(CLEANING_STEPS)} "
                          f"joined by commas")
    return tuple(step for step in CLEANING_STEPS if step in names)


def canonical_clean(how: str, flag: str = "--clean") -> str:
    """A --clean value written in run order ("ptb,html" -> "html,ptb"), so that the same steps
    listed otherwise compare equal in manifests and on resume."""
    return ",".join(clean_steps(how, flag)) or "none"


@dataclasses.dataclass
class DataConfig:
    corpus: list[str] = dataclasses.field(default_factory=lambda: ["builtin:python-stdlib"])
    data_dir: str = ""
    tokenizer: str = "char"
    vocab_size: int = 512
    tokenizer_dir: str = ""  # a saved tfllm tokenizer to use instead of training one (tokenizer, vocab_size unused)
    seq_len: int = 64
    window_stride: int = 0  # training split: tokens between window starts; 0: seq_len (each token once)
    val_fraction: float = 0.05
    split: str = "document"  # "document": whole documents by hash; "tail": last fraction of the text
    num_shards: int = 4
    jsonl_field: str = "text"
    parquet_column: str = "text"
    tsv_column: str = "text"  # text column of .tsv files (header-named)
    on_decode_error: str = "strict"  # strict | replace | skip
    clean: str = "none"  # none, or html, ptb, lower joined by commas: cleaning before tokenization
    max_corpus_bytes: int = 0  # 0: no limit; caps the built-in corpus and big inputs for demos
    tokenizer_sample_bytes: int = 50_000_000
    seed: int = 0
    overwrite: bool = False
    workers: int = 0  # tokenizing threads per rank; 0: the usable cores divided among the host's ranks

    def validate(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"--workers={self.workers}: must be 0 (the usable cores) or more")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(f"--tokenizer={self.tokenizer!r}: expected one of {', '.join(TOKENIZER_KINDS)}")
        if self.split not in ("document", "tail"):
            raise ConfigError(f"--split={self.split!r}: expected 'document' or 'tail'")
        clean_steps(self.clean)
        if self.on_decode_error not in ("strict", "replace", "skip"):
            raise ConfigError(f"--on_decode_error={self.on_decode_error!r}: expected strict, replace or skip")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.seq_len < 2:
            raise ConfigError(f"--seq_len={self.seq_len}: must be at least 2")
        if not 0 <= self.window_stride <= self.seq_len:
            raise ConfigError(f"--window_stride={self.window_stride}: must be between 1 and --seq_len "
                              f"({self.seq_len}), or 0 for --seq_len")
        if not 1 <= self.num_shards <= MAX_SHARDS:
            raise ConfigError(f"--num_shards={self.num_shards}: must be between 1 and {MAX_SHARDS}")
        if self.vocab_size < 8 and self.tokenizer not in ("char", "byte"):
            raise ConfigError(f"--vocab_size={self.vocab_size}: too small for a {self.tokenizer} tokenizer")
        if not self.corpus:
            raise ConfigError("--corpus is empty: name at least one file, directory, glob or builtin:python-stdlib")
        for flag, names in (("jsonl_field", self.jsonl_field), ("parquet_column", self.parquet_column),
                            ("tsv_column", self.tsv_column)):
            if not all(listed(names)) or "\t" in names:
                raise ConfigError(f"--{flag}={names!r}: name the text field or column as the files do "
                                  "(several names: comma-separated, the first a file has is read)")


@dataclasses.dataclass
class ModelConfig:
    family: str = "gpt2"
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 0  # llama only; 0 means equal to num_heads
    hidden_dim: int = 64
    intermediate_dim: int = 0  # 0 means 4 * hidden_dim
    dropout: float = 0.0
    max_sequence_length: int = 64
    vocab_size: int = 0  # 0: taken from the prepared data's tokenizer
    weight_init: str = "gpt2"  # see tfllm.models.apply_weight_init

    def validate(self) -> None:
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"--model={self.family!r}: expected one of {', '.join(MODEL_FAMILIES)}")
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError(f"--weight_init={self.weight_init!r}: expected one of {', '.join(WEIGHT_INITS)}")
        for name in ("num_layers", "num_heads", "hidden_dim", "max_sequence_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be positive")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"--hidden_dim={self.hidden_dim} is not divisible by --num_heads={self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ConfigError(f"--num_heads={self.num_heads} is not divisible by --num_kv_heads={kv}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout={self.dropout}: must be in [0, 1)")

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_dim or 4 * self.hidden_dim


@dataclasses.dataclass
class OptimizerConfig:
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 10
    decay_steps: int = 0  # 0: decay over the whole run (train_steps)
    beta1: float = 0.9
    beta2: float = 0.99
    epsilon: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings_and_norms: bool = False
    clip_norm: float = 1.0  # 0 disables global-norm clipping
    scale_lr_with_world_size: bool = False

    def validate(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate={self.learning_rate}: must be positive")
        if self.min_learning_rate < 0 or self.min_learning_rate > self.learning_rate:
            raise ConfigError(f"--min_learning_rate={self.min_learning_rate}: must be in [0, --learning_rate]")
        if self.warmup_steps < 0 or self.clip_norm < 0 or self.weight_decay < 0:
            raise ConfigError("--warmup_steps, --clip_norm and --weight_decay must be >= 0")


@dataclasses.dataclass
class TrainConfig:
    model_dir: str = ""
    batch_size: int = 8  # per rank, per micro-batch
    grad_accum_steps: int = 1
    parallel_slices: int = 1  # concurrent forward/backward slices of each micro-batch (multi-core CPUs)
    train_steps: int = 100
    precision: str = "float32"
    jit_compile: bool = False
    fp16_allreduce: bool = False
    allreduce_buckets: int = 1  # gradient allreduces issued during the backward pass, top layers first
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_steps: int = 20  # 0: the whole validation split
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: only at the end
    sample_prompt: str = "def "
    sample_tokens: int = 64
    # In-training samples use pipelines.generate's sampling; top-k at 0.8 with a fixed seed reads
    # like the corpus early on, where greedy decoding repeats one word ("def the the the ...").
    sample_strategy: str = "top_k"
    sample_top_k: int = 10
    sample_top_p: float = 0.9
    sample_temperature: float = 0.8
    sample_seed: int = 0
    verify_data: bool = False
    shuffle_buffer: int = 0  # 0: all of this rank's windows, up to SHUFFLE_BUFFER_BYTES
    stop_after: int = 0  # stop this invocation after so many steps (checkpoint saved); 0: run to train_steps
    init_preset: str = ""  # keras-hub preset dir whose weights start a new run (ignored when resuming)
    elastic: bool = False  # Horovod elastic: workers may fail, leave and join (horovodrun --min-np/--max-np)
    elastic_commit_every: int = 10  # steps between in-memory commits; at most this many are redone after a failure
    elastic_global_batch: int = 0  # windows per step to keep through resizes by changing the accumulation; 0: off
    sample_log: str = ""  # elastic mode: append each step's window ids to <sample_log>.<host>.<pid> (audit)
    profile_steps: str = ""  # "A,B": a TF profiler trace of steps A to B into <model_dir>/tb/profile-rank<R>
    profile_rank: int = 0

    def profile_range(self) -> tuple[int, int] | None:
        if not self.profile_steps:
            return None
        try:
            first, last = (int(x) for x in self.profile_steps.split(","))
        except ValueError:
            raise ConfigError(f"--profile_steps={self.profile_steps!r}: expected two step numbers, A,B") from None
        if not 1 <= first <= last <= self.train_steps:
            raise ConfigError(f"--profile_steps={self.profile_steps}: expected 1 <= A <= B <= --train_steps "
                              f"({self.train_steps})")
        return first, last

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum_steps", "parallel_slices", "allreduce_buckets", "train_steps",
                     "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be positive")
        if self.batch_size % self.parallel_slices:
            raise ConfigError(f"--batch_size={self.batch_size} does not split into --parallel_slices="
                              f"{self.parallel_slices} equal slices")
        for name in ("eval_every", "checkpoint_every", "sample_every", "eval_steps", "stop_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 0")
        if not self.model_dir:
            raise ConfigError("--model_dir is required")
        if self.elastic_commit_every < 1:
            raise ConfigError(f"--elastic_commit_every={self.elastic_commit_every}: must be positive")
        if self.elastic_global_batch < 0 or self.elastic_global_batch % self.batch_size:
            raise ConfigError(f"--elastic_global_batch={self.elastic_global_batch}: must be a multiple of "
                              f"--batch_size={self.batch_size} (0: off)")
        if (self.elastic_global_batch or self.sample_log) and not self.elastic:
            raise ConfigError("--elastic_global_batch and --sample_log apply to --elastic runs only")
        self.profile_range()
        if self.profile_rank < 0:
            raise ConfigError(f"--profile_rank={self.profile_rank}: must be >= 0")


@dataclasses.dataclass
class DistillConfig:
    """Knowledge distillation (pipelines.distill): the student learns the teacher's softened
    next-token distribution, mixed with the data's own next tokens."""
    teacher_dir: str = ""  # a pretraining model dir; empty: no teacher, plain pretraining
    # Both distributions are softened by it and the KL term is scaled by its square. 1: short runs of
    # tiny students learned less at 2 (README, "Distillation").
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the hard next-token loss
    checkpoint: str = ""  # the teacher checkpoint learned from, fixed at the run's first start

    def validate(self) -> None:
        if not self.teacher_dir:
            return
        if not 0 < self.temperature < float("inf"):
            raise ConfigError(f"--distill_temperature={self.temperature}: must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--distill_alpha={self.alpha}: must be in [0, 1]")


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    def validate(self) -> "Config":
        self.data.validate()
        self.model.validate()
        self.optimizer.validate()
        self.train.validate()
        self.distill.validate()
        if self.distill.teacher_dir and os.path.realpath(self.distill.teacher_dir) == os.path.realpath(self.train.model_dir):
            raise ConfigError(f"--teacher_dir and --model_dir are both {self.train.model_dir}: the student needs a "
                              "model dir of its own")
        if self.train.elastic_global_batch and self.optimizer.scale_lr_with_world_size:
            raise ConfigError("--elastic_global_batch keeps the global batch constant; drop "
                              "--scale_lr_with_world_size, which follows a changing one")
        units = self.model.num_layers + 2  # the head, each transformer layer, the embeddings
        if self.train.allreduce_buckets > units:
            raise ConfigError(f"--allreduce_buckets={self.train.allreduce_buckets}: a {self.model.num_layers}-layer "
                              f"model splits into at most {units} buckets")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        def build(klass, values):
            known = {f.name for f in dataclasses.fields(klass)}
            return klass(**{k: v for k, v in (values or {}).items() if k in known})

        return cls(
            data=build(DataConfig, d.get("data")),
            model=build(ModelConfig, d.get("model")),
            optimizer=build(OptimizerConfig, d.get("optimizer")),
            train=build(TrainConfig, d.get("train")),
            distill=build(DistillConfig, d.get("distill")),
        )

    def save(self, path: str) -> None:
        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Config":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None


@dataclasses.dataclass
class FinetuneConfig:
    """A classification fine-tuning run on a pretraining model dir's backbone and tokenizer."""
    pretrained_dir: str = ""
    pretrained_checkpoint: str = "latest"  # latest | best | a step number | a checkpoint name
    model_dir: str = ""
    train_file: str = ""
    validation_file: str = ""
    file_format: str = "auto"  # auto (by extension) | tsv | csv | jsonl
    label_column: str = "label"
    text_column: str = "sentence"
    header: bool = True
    num_classes: int = 0  # 0: from the training labels
    init: str = "pretrained"  # pretrained | scratch (same architecture, random weights)
    max_length: int = 64  # tokens per example, <eod> included
    pooling: str = "last"  # last | mean | concat
    classifier_dropout: float = 0.1
    freeze_backbone_steps: int = 0
    layer_lr_decay: float = 1.0  # <1: each layer below the head learns at this factor of the one above
    class_weighted: bool = False
    lm_loss_weight: float = 0.0  # >0: GPT-1's auxiliary language-model loss on the task's text
    max_train_examples: int = 0  # 0: all; else drawn at random
    validation_fraction: float = 0.0  # >0: hold out this share of the training file instead of --validation_file
    test_file: str = ""  # scored once at the end, with the best checkpoint
    truncation: str = "head"  # head | head_tail
    clean: str = "auto"  # as DataConfig.clean; auto: as the pretrained model's data was
    batch_size: int = 32
    train_steps: int = 1000
    eval_every: int = 200
    early_stopping_patience: int = 0  # evaluations without a better accuracy before stopping; 0: off
    log_every: int = 50
    keep_checkpoints: int = 2
    jit_compile: bool = True
    allreduce_buckets: int = 1  # as in TrainConfig; the frozen-backbone steps always send one
    seed: int = 0
    optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        learning_rate=1e-4, min_learning_rate=1e-5, warmup_steps=50, weight_decay=0.01))

    def validate(self) -> "FinetuneConfig":
        if not self.pretrained_dir:
            raise ConfigError("--pretrained_dir is required (its tokenizer and architecture are used, "
                              "and its weights unless --init=scratch)")
        if not self.model_dir:
            raise ConfigError("--model_dir is required")
        if self.init not in ("pretrained", "scratch"):
            raise ConfigError(f"--init={self.init!r}: expected pretrained or scratch")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.file_format not in ("auto", "tsv", "csv", "jsonl"):
            raise ConfigError(f"--file_format={self.file_format!r}: expected auto, tsv, csv or jsonl")
        for name in ("batch_size", "train_steps", "max_length"):
            if getattr(self, name) < (2 if name == "max_length" else 1):
                raise ConfigError(f"--{name}={getattr(self, name)}: too small")
        if self.num_classes == 1 or self.num_classes < 0:
            raise ConfigError(f"--num_classes={self.num_classes}: need 2 or more (0: from the training labels)")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"--truncation={self.truncation!r}: expected one of {', '.join(TRUNCATIONS)}")
        if self.clean != "auto":
            clean_steps(self.clean)
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ConfigError(f"--validation_fraction={self.validation_fraction}: must be in [0, 0.5)")
        if bool(self.validation_fraction) == bool(self.validation_file):
            raise ConfigError("give either --validation_file or --validation_fraction (held out of --train_file)")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"--layer_lr_decay={self.layer_lr_decay}: must be in (0, 1] (1: off)")
        if not 0.0 <= self.lm_loss_weight < float("inf"):  # NaN fails too
            raise ConfigError(f"--lm_loss_weight={self.lm_loss_weight}: must be 0 (off) or positive")
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"--classifier_dropout={self.classifier_dropout}: must be in [0, 1)")
        self.optimizer.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {"clean": "none", **{k: v for k, v in d.items() if k in known}}  # saved before cleaning existed
        if isinstance(values.get("optimizer"), dict):
            values["optimizer"] = OptimizerConfig(**values["optimizer"])
        return cls(**values)


def model_mismatch(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """Fields whose values differ, as 'name: saved -> current' strings."""
    diffs = []
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(saved, f.name), getattr(current, f.name)
        if f.name in ("dropout", "weight_init"):  # neither changes the variables; resuming with another is fine
            continue
        if a != b:
            diffs.append(f"{f.name}: {a} -> {b}")
    return diffs
