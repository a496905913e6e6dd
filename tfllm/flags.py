"""Every absl flag of tfllm, grouped, and `config_from_flags()`; the one module that defines or reads them.

Pipelines call the `define_*` functions they need at import time; library code never reads
FLAGS. Defaults live in `tfllm.config` so that flags, flagfiles and tests agree. A pipeline's own
options (pipelines.evaluate's --text_file, say) are the fields of an `Options` dataclass it
declares with `option()`; `define_options` makes them flags and `read_options` returns their values.
TensorFlow is imported only by the flag groups that need it, so pipelines.submit starts without it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

from absl import flags

from tfllm.config import (MODEL_FAMILIES, POOLINGS, PRECISIONS, TOKENIZER_KINDS, TRUNCATIONS, WEIGHT_INITS, Config,
                          ConfigError, DataConfig, DistillConfig, FinetuneConfig, ModelConfig, OptimizerConfig,
                          TrainConfig, canonical_clean)

if typing.TYPE_CHECKING:
    from tfllm.generate import SamplingConfig

FLAGS = flags.FLAGS
_D, _M, _O, _T = DataConfig(), ModelConfig(), OptimizerConfig(), TrainConfig()


def _once(fn):
    done = []

    def wrapper():
        if not done:
            fn()
            done.append(True)
    return wrapper


@_once
def define_data_flags() -> None:
    flags.DEFINE_list("corpus", _D.corpus, "Text files, directories, globs (.txt, .jsonl, .gz) or builtin:python-stdlib.")
    flags.DEFINE_string("data_dir", _D.data_dir, "Prepared data (shards, tokenizer, manifest.json). "
                        "Default for pretraining: <model_dir>/data.")
    flags.DEFINE_enum("tokenizer", _D.tokenizer, TOKENIZER_KINDS, "Tokenizer to train on the corpus.")
    flags.DEFINE_integer("vocab_size", _D.vocab_size, "Tokenizer vocabulary size (for char: an upper bound; 0 = all).")
    flags.DEFINE_string("tokenizer_dir", _D.tokenizer_dir, "Use this saved tfllm tokenizer (a model dir's or a preset's "
                        "tokenizer/) instead of training one; --tokenizer and --vocab_size are then unused.")
    flags.DEFINE_integer("seq_len", _D.seq_len, "Tokens per training window (context length).")
    flags.DEFINE_integer("window_stride", _D.window_stride,
                         "Training split: tokens between window starts (0: seq_len). Smaller strides overlap "
                         "windows so text is seen at several context offsets, like sampling random windows. "
                         "Validation always predicts each token once.")
    flags.DEFINE_float("val_fraction", _D.val_fraction, "Fraction of the corpus held out for validation.")
    flags.DEFINE_enum("split", _D.split, ["document", "tail"],
                      "document: hold out whole documents by seeded hash; tail: the last fraction of the text.")
    flags.DEFINE_integer("num_shards", _D.num_shards, "TFRecord shards per split.")
    flags.DEFINE_string("jsonl_field", _D.jsonl_field, "Text field of .jsonl records; comma-separated names: "
                        "the first a record has.")
    flags.DEFINE_string("clean", _D.clean, "Text cleaning before tokenization, none or steps joined by commas: html "
                        "turns <br> into newlines, drops tags and decodes common entities (web text such as reviews); "
                        "ptb undoes Penn Treebank tokenization (\"does n't\", \"-lrb-\": SST-2); lower lowercases. Steps run in "
                        "that order, whatever the order written. Fine-tuning defaults to the pretraining data's.")
    flags.DEFINE_string("parquet_column", _D.parquet_column, "Text column of .parquet files (Hugging Face "
                        "datasets); comma-separated names: the first a file has.")
    flags.DEFINE_string("tsv_column", _D.tsv_column, "Text column of .tsv files, as their header line names it "
                        "(a fine-tuning file such as SST-2's train.tsv, read as text to pretrain further on); comma-separated "
                        "names: the first a file's header has (SST-2: sentence,content).")
    flags.DEFINE_integer("workers", _D.workers, "Tokenizing threads per rank (0: the usable cores, shared among "
                         "the ranks on a host). The output does not depend on it.")
    flags.DEFINE_enum("on_decode_error", _D.on_decode_error, ["strict", "replace", "skip"],
                      "Non-UTF-8 input: fail (naming file and byte offset), replace bad bytes, or skip the document.")
    flags.DEFINE_integer("max_corpus_bytes", _D.max_corpus_bytes, "Stop reading the corpus after this many characters (0: all).")
    flags.DEFINE_integer("tokenizer_sample_bytes", _D.tokenizer_sample_bytes, "Characters used to train the tokenizer, taken from the start of every file in proportion to its size.")
    flags.DEFINE_integer("data_seed", _D.seed, "Seed of the document split.")
    flags.DEFINE_bool("overwrite", _D.overwrite, "Replace an existing prepared data directory.")


@_once
def define_model_flags() -> None:
    flags.DEFINE_enum("model", _M.family, MODEL_FAMILIES, "Model family (keras-hub backbone).")
    flags.DEFINE_integer("num_layers", _M.num_layers, "Transformer layers.")
    flags.DEFINE_integer("num_heads", _M.num_heads, "Attention (query) heads.")
    flags.DEFINE_integer("num_kv_heads", _M.num_kv_heads, "Key/value heads for llama (0: = num_heads).")
    flags.DEFINE_integer("hidden_dim", _M.hidden_dim, "Model width.")
    flags.DEFINE_integer("intermediate_dim", _M.intermediate_dim, "Feed-forward width (0: 4 x hidden_dim).")
    flags.DEFINE_float("dropout", _M.dropout, "Dropout rate.")
    flags.DEFINE_enum("weight_init", _M.weight_init, WEIGHT_INITS,
                      "gpt2: N(0, 0.02) token embeddings and N(0, 0.02/sqrt(2 x layers)) residual projections "
                      "(GPT-2, nanoGPT); keras_hub: the backbone's own initializers.")
    flags.DEFINE_integer("max_sequence_length", _M.max_sequence_length, "Position table size (gpt2; 0: = seq_len).")


@_once
def define_train_flags() -> None:
    from tfllm.generate import STRATEGIES

    define_data_flags()
    define_model_flags()
    flags.DEFINE_string("model_dir", _T.model_dir, "Checkpoints, config.json and TensorBoard logs. Rerun to resume.")
    flags.DEFINE_integer("batch_size", _T.batch_size, "Windows per rank per micro-batch.")
    flags.DEFINE_integer("grad_accum_steps", _T.grad_accum_steps, "Micro-batches per optimizer step.")
    flags.DEFINE_integer("parallel_slices", _T.parallel_slices,
                         "Split each micro-batch into this many slices whose forward/backward passes run "
                         "concurrently; on a multi-core CPU rank set it to the rank's cores (XLA's small matrix "
                         "multiplies use them poorly), elsewhere leave 1. The gradient is the same.")
    flags.DEFINE_integer("train_steps", _T.train_steps, "Optimizer steps.")
    flags.DEFINE_enum("precision", _T.precision, PRECISIONS, "Keras dtype policy.")
    flags.DEFINE_bool("jit_compile", _T.jit_compile, "XLA-compile the forward/backward and optimizer update.")
    flags.DEFINE_bool("fp16_allreduce", _T.fp16_allreduce, "Send gradients over the wire as float16.")
    flags.DEFINE_integer("allreduce_buckets", _T.allreduce_buckets,
                         "Split the gradients by depth into this many allreduces, each sent while the backward "
                         "pass of the layers below still runs; 1 (the default): one allreduce after the backward "
                         "pass. At most layers + 2. README, Performance: when it pays.")
    flags.DEFINE_integer("seed", _T.seed, "Initialisation and shuffle seed.")
    flags.DEFINE_integer("log_every", _T.log_every, "Steps between progress lines and TensorBoard scalars.")
    flags.DEFINE_integer("eval_every", _T.eval_every, "Steps between validations (0: only at the end).")
    flags.DEFINE_integer("eval_steps", _T.eval_steps, "Validation batches per rank (0: the whole split).")
    flags.DEFINE_integer("checkpoint_every", _T.checkpoint_every, "Steps between checkpoints (0: only at the end).")
    flags.DEFINE_integer("keep_checkpoints", _T.keep_checkpoints, "Most recent checkpoints kept (the best is kept too).")
    flags.DEFINE_integer("sample_every", _T.sample_every, "Steps between text samples in TensorBoard (0: only at the end).")
    flags.DEFINE_string("sample_prompt", _T.sample_prompt, "Prompt of the periodic samples; in double quotes "
                        '(--sample_prompt="def ") it keeps leading and trailing spaces in a flagfile.')
    flags.DEFINE_integer("sample_tokens", _T.sample_tokens, "Tokens per sample.")
    flags.DEFINE_enum("sample_strategy", _T.sample_strategy, STRATEGIES, "Sampling of the in-training samples "
                      "(as pipelines.generate's --strategy).")
    flags.DEFINE_integer("sample_top_k", _T.sample_top_k, "k of top-k in-training samples.")
    flags.DEFINE_float("sample_top_p", _T.sample_top_p, "p of top-p in-training samples.")
    flags.DEFINE_float("sample_temperature", _T.sample_temperature, "Temperature of the in-training samples.")
    flags.DEFINE_integer("sample_seed", _T.sample_seed, "Seed of the in-training samples (the same for every sample).")
    flags.DEFINE_string("profile_steps", _T.profile_steps, "A,B: trace steps A to B with the TF profiler into "
                        "<model_dir>/tb/profile-rank<R> (TensorBoard's Profile tab).")
    flags.DEFINE_integer("profile_rank", _T.profile_rank, "The rank whose steps --profile_steps traces.")
    flags.DEFINE_bool("verify_data", _T.verify_data, "Check every shard's sha256 against the manifest at start.")
    flags.DEFINE_integer("shuffle_buffer", _T.shuffle_buffer,
                         "Windows in the shuffle buffer (0: all of this rank's windows, up to 256 MiB).")
    flags.DEFINE_integer("stop_after", _T.stop_after, "Stop this run after so many steps, with a checkpoint; "
                         "rerun to continue (for time-sliced queues). 0: run to --train_steps.")
    flags.DEFINE_string("init_preset", _T.init_preset,
                        "A keras-hub preset directory (e.g. <export>/preset from pipelines.export) that a new run "
                        "starts from: its architecture replaces the model flags (one given explicitly must agree), "
                        "its weights the initialisation, and its tokenizer/, if any, is the default --tokenizer_dir. "
                        "Ignored when --model_dir already has a checkpoint. Every rank must be able to read it.")
    flags.DEFINE_bool("elastic", _T.elastic,
                      "Horovod elastic training (horovodrun --min-np/--max-np --host-discovery-script, Gloo): "
                      "workers may fail, leave and join; the others go on from the last commit.")
    flags.DEFINE_integer("elastic_commit_every", _T.elastic_commit_every,
                         "Elastic: steps between in-memory commits; at most this many are redone after a failure.")
    flags.DEFINE_integer("elastic_global_batch", _T.elastic_global_batch,
                         "Elastic: windows per optimizer step to keep through resizes, by choosing the "
                         "micro-batches per step for each world size (0: the global batch follows the world).")
    flags.DEFINE_string("sample_log", _T.sample_log,
                        "Elastic: append each step's window ids to <sample_log>.<host>.<pid> (a data-order audit).")
    flags.DEFINE_float("learning_rate", _O.learning_rate, "Peak learning rate.")
    flags.DEFINE_float("min_learning_rate", _O.min_learning_rate, "Learning rate at the end of the cosine decay.")
    flags.DEFINE_integer("warmup_steps", _O.warmup_steps, "Linear warmup steps.")
    flags.DEFINE_integer("decay_steps", _O.decay_steps, "Step at which the cosine reaches its floor (0: train_steps).")
    flags.DEFINE_float("beta1", _O.beta1, "AdamW beta1.")
    flags.DEFINE_float("beta2", _O.beta2, "AdamW beta2.")
    flags.DEFINE_float("epsilon", _O.epsilon, "AdamW epsilon.")
    flags.DEFINE_float("weight_decay", _O.weight_decay, "AdamW decoupled weight decay.")
    flags.DEFINE_bool("decay_embeddings_and_norms", _O.decay_embeddings_and_norms,
                      "Also decay embeddings and norm scales (biases never are).")
    flags.DEFINE_float("clip_norm", _O.clip_norm, "Global-norm clipping of the averaged gradient (0: off).")
    flags.DEFINE_bool("scale_lr_with_world_size", _O.scale_lr_with_world_size,
                      "Multiply learning rates by the number of ranks (linear scaling rule).")


@_once
def define_distill_flags() -> None:
    """Distillation; with the student's model, data and run flags of `define_train_flags`."""
    d = DistillConfig()
    flags.DEFINE_string("teacher_dir", d.teacher_dir, "Pretraining model dir of the teacher (its latest checkpoint). "
                        "Its prepared data is the student's unless --data_dir is given; new data is tokenized with its tokenizer.")
    flags.DEFINE_float("distill_temperature", d.temperature, "Softmax temperature of both teacher and student in the "
                       "KL term (its gradient is scaled by temperature^2).")
    flags.DEFINE_float("distill_alpha", d.alpha, "Weight of the KL term; 1 - alpha weighs the hard next-token loss.")


def distill_config_from_flags() -> Config:
    """The student's run (its data: `tfllm.distill.student_config`)."""
    from tfllm.distill import student_config

    cfg = config_from_flags()
    cfg.distill = DistillConfig(teacher_dir=FLAGS.teacher_dir, temperature=FLAGS.distill_temperature,
                                alpha=FLAGS.distill_alpha)
    return student_config(cfg, data_dir_given=FLAGS["data_dir"].present,
                          context_given=FLAGS["max_sequence_length"].present)


@_once
def define_sampling_flags() -> None:
    from tfllm.generate import STRATEGIES, SamplingConfig

    default = SamplingConfig()
    flags.DEFINE_enum("strategy", default.strategy, STRATEGIES, "Sampling strategy.")
    flags.DEFINE_integer("max_new_tokens", default.max_new_tokens, "Tokens to generate per prompt.")
    flags.DEFINE_float("temperature", default.temperature, "Softmax temperature (top_k, top_p, random).")
    flags.DEFINE_integer("top_k", default.top_k, "k of top-k sampling.")
    flags.DEFINE_float("top_p", default.top_p, "Probability mass of nucleus sampling.")
    flags.DEFINE_integer("sampling_seed", None, "Seed for reproducible sampling.")
    flags.DEFINE_bool("stop_at_eod", default.stop_at_eod, "Stop a continuation at the end-of-document token.")


@_once
def define_finetune_flags() -> None:
    """Classification fine-tuning; with the optimizer and run flags of `define_train_flags`."""
    f = FinetuneConfig()
    flags.DEFINE_string("pretrained_dir", f.pretrained_dir, "Pretraining model dir: tokenizer, architecture, weights.")
    flags.DEFINE_string("pretrained_checkpoint", f.pretrained_checkpoint,
                        "The checkpoint of --pretrained_dir whose weights start fine-tuning: latest, best (lowest "
                        "validation loss), a step number or a checkpoint name.")
    flags.DEFINE_string("train_file", f.train_file, "Labelled training data (.tsv, .csv or .jsonl).")
    flags.DEFINE_string("validation_file", f.validation_file, "Labelled validation data, same format.")
    flags.DEFINE_enum("file_format", f.file_format, ["auto", "tsv", "csv", "jsonl"], "Format (auto: by extension).")
    flags.DEFINE_string("label_column", f.label_column, "Label column name (or 0-based number with --noheader; JSONL key).")
    flags.DEFINE_string("text_column", f.text_column, "Text column name (or 0-based number with --noheader; JSONL key); "
                        "several comma-separated names: the first one a file has.")
    flags.DEFINE_bool("header", f.header, "TSV/CSV files start with a header row.")
    flags.DEFINE_integer("num_classes", f.num_classes, "Classes 0..N-1 (0: the distinct training labels).")
    flags.DEFINE_enum("init", f.init, ["pretrained", "scratch"], "Backbone weights: pretrained, or random (comparison).")
    flags.DEFINE_integer("max_length", f.max_length, "Tokens per example (<eod> included); longer texts are cut.")
    flags.DEFINE_enum("pooling", f.pooling, list(POOLINGS),
                      "Backbone output pooling: last real token, mean, or concat (last, mean and max side by side).")
    flags.DEFINE_float("classifier_dropout", f.classifier_dropout, "Dropout before the classification head.")
    flags.DEFINE_integer("freeze_backbone_steps", f.freeze_backbone_steps, "Train only the head for the first N steps.")
    flags.DEFINE_float("layer_lr_decay", f.layer_lr_decay,
                       "Layer-wise learning-rate decay: the head learns at --learning_rate, each transformer layer "
                       "below at this factor of the one above, the embeddings last. 1: every layer at the full rate.")
    flags.DEFINE_bool("class_weighted", f.class_weighted, "Weight the loss by inverse class frequency.")
    flags.DEFINE_float("lm_loss_weight", f.lm_loss_weight,
                       "Add this times each example's mean next-token loss (the backbone's language-model head) to "
                       "its classification loss, as GPT-1 fine-tuned. 0: off.")
    flags.DEFINE_integer("max_train_examples", f.max_train_examples, "Use N training examples drawn at random (0: all).")
    flags.DEFINE_float("validation_fraction", f.validation_fraction, "Hold out this share of --train_file, drawn at "
                       "random, for validation (instead of --validation_file).")
    flags.DEFINE_string("test_file", f.test_file, "Labelled test data, scored once at the end with the best checkpoint.")
    flags.DEFINE_enum("truncation", f.truncation, list(TRUNCATIONS), "Texts longer than --max_length: keep the "
                      "first tokens (head) or the first quarter and the last three quarters (head_tail).")
    flags.DEFINE_integer("early_stopping_patience", f.early_stopping_patience,
                         "Stop after N validations without a better accuracy (0: never).")


def finetune_config_from_flags() -> FinetuneConfig:
    names = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name not in ("optimizer", "clean")]
    # --clean is a data flag (default none); not given, fine-tuning cleans as the pretraining data was.
    clean = FLAGS.clean if FLAGS["clean"].present else "auto"
    return FinetuneConfig(optimizer=optimizer_config_from_flags(), clean=clean, **{n: getattr(FLAGS, n) for n in names})


def data_config_from_flags() -> DataConfig:
    return DataConfig(
        corpus=list(FLAGS.corpus), data_dir=FLAGS.data_dir, tokenizer=FLAGS.tokenizer, vocab_size=FLAGS.vocab_size,
        tokenizer_dir=FLAGS.tokenizer_dir, seq_len=FLAGS.seq_len, window_stride=FLAGS.window_stride,
        val_fraction=FLAGS.val_fraction, split=FLAGS.split, num_shards=FLAGS.num_shards, jsonl_field=FLAGS.jsonl_field,
        on_decode_error=FLAGS.on_decode_error, max_corpus_bytes=FLAGS.max_corpus_bytes,
        tokenizer_sample_bytes=FLAGS.tokenizer_sample_bytes, seed=FLAGS.data_seed, overwrite=FLAGS.overwrite,
        parquet_column=FLAGS.parquet_column, tsv_column=FLAGS.tsv_column, workers=FLAGS.workers,
        clean=canonical_clean(FLAGS.clean))


def model_config_from_flags() -> ModelConfig:
    return ModelConfig(
        family=FLAGS.model, num_layers=FLAGS.num_layers, num_heads=FLAGS.num_heads, num_kv_heads=FLAGS.num_kv_heads,
        hidden_dim=FLAGS.hidden_dim, intermediate_dim=FLAGS.intermediate_dim, dropout=FLAGS.dropout,
        max_sequence_length=FLAGS.max_sequence_length or FLAGS.seq_len, weight_init=FLAGS.weight_init)


# Model flags a preset's architecture replaces, with the ModelConfig value each one sets.
_ARCHITECTURE_FLAGS = {"model": lambda m: m.family, "num_layers": lambda m: m.num_layers,
                       "num_heads": lambda m: m.num_heads, "num_kv_heads": lambda m: m.num_kv_heads or m.num_heads,
                       "hidden_dim": lambda m: m.hidden_dim, "intermediate_dim": lambda m: m.ffn_dim,
                       "max_sequence_length": lambda m: m.max_sequence_length}


def preset_model_config(path: str, from_flags: ModelConfig) -> ModelConfig:
    """The preset's architecture; model flags given explicitly (command line or flagfile) must agree."""
    from tfllm import preset

    from_preset = preset.model_config(path)
    checked = [n for n in _ARCHITECTURE_FLAGS if n != "max_sequence_length" or from_preset.family == "gpt2"]
    conflicts = [f"--{n}={FLAGS[n].value} (preset: {_ARCHITECTURE_FLAGS[n](from_preset)})" for n in checked
                 if FLAGS[n].present and _ARCHITECTURE_FLAGS[n](from_flags) != _ARCHITECTURE_FLAGS[n](from_preset)]
    if conflicts:
        raise ConfigError(f"--init_preset={path} disagrees with {', '.join(conflicts)}; drop those flags")
    if FLAGS["dropout"].present:  # dropout changes no variable: the run may choose its own
        from_preset.dropout = FLAGS.dropout
    from_preset.weight_init = FLAGS.weight_init
    return from_preset


def optimizer_config_from_flags() -> OptimizerConfig:
    return OptimizerConfig(
        learning_rate=FLAGS.learning_rate, min_learning_rate=FLAGS.min_learning_rate, warmup_steps=FLAGS.warmup_steps,
        decay_steps=FLAGS.decay_steps, beta1=FLAGS.beta1, beta2=FLAGS.beta2, epsilon=FLAGS.epsilon,
        weight_decay=FLAGS.weight_decay, decay_embeddings_and_norms=FLAGS.decay_embeddings_and_norms,
        clip_norm=FLAGS.clip_norm, scale_lr_with_world_size=FLAGS.scale_lr_with_world_size)


def unquote(text: str) -> str:
    """A prompt flag's text. absl strips every flagfile line, so a prompt that must begin or end
    with a space is written in double quotes there; the quotes are not part of the prompt."""
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def config_from_flags() -> Config:
    from tfllm import preset
    from tfllm.restore import CONFIG_FILE

    optimizer = optimizer_config_from_flags()
    train = TrainConfig(**{name: getattr(FLAGS, name) for name in (
        "model_dir", "batch_size", "grad_accum_steps", "parallel_slices", "train_steps", "precision", "jit_compile",
        "fp16_allreduce", "allreduce_buckets", "seed", "log_every", "eval_every", "eval_steps", "checkpoint_every", "keep_checkpoints", "sample_every",
        "sample_prompt", "sample_tokens", "sample_strategy", "sample_top_k", "sample_top_p", "sample_temperature",
        "sample_seed", "profile_steps", "profile_rank", "verify_data", "shuffle_buffer", "stop_after", "init_preset", "elastic",
        "elastic_commit_every", "elastic_global_batch", "sample_log")})
    train.sample_prompt = unquote(train.sample_prompt)
    data = data_config_from_flags()
    model = model_config_from_flags()
    if train.init_preset:
        saved = os.path.join(train.model_dir, CONFIG_FILE)
        previous = Config.load(saved) if train.model_dir and os.path.exists(saved) else None
        if previous and previous.train.init_preset == train.init_preset and not os.path.isdir(train.init_preset):
            # A restarted run (a rescheduled pod, say) resumes without the preset, which may be gone
            # by now: what the preset decided is in the saved config.
            model, data.tokenizer_dir = previous.model, data.tokenizer_dir or previous.data.tokenizer_dir
        else:
            model = preset_model_config(train.init_preset, model)
            data.tokenizer_dir = data.tokenizer_dir or preset.tokenizer_dir(train.init_preset)
    return Config(data=data, model=model, optimizer=optimizer, train=train)


def sampling_config_from_flags() -> SamplingConfig:
    from tfllm.generate import SamplingConfig

    return SamplingConfig(strategy=FLAGS.strategy, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                          top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.sampling_seed, stop_at_eod=FLAGS.stop_at_eod)


@dataclasses.dataclass(frozen=True)
class Options:
    """A pipeline's own options: a subclass declares them as fields, each made with `option()`
    (a flag this module defines for it) or `shared()` (a flag of one of the groups above)."""
    given: frozenset = frozenset()  # the options set on the command line or in a flagfile, not left at default


def option(default, help: str, choices: tuple[str, ...] = (), repeated: bool = False):
    """A pipeline option, the flag of the field's name, typed by its default: str (an enum, given
    `choices`), int, float, bool, or a list of strings (comma-separated, or with `repeated` one
    value per use of the flag: --prompt=a --prompt=b)."""
    field = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(**field, metadata={"help": help, "choices": choices, "repeated": repeated})


def shared():
    """An option that a flag group above defines (fine-tuning reads define_train_flags' --model_dir)."""
    return dataclasses.field(default=None, metadata={"shared": True})


_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}


def define_options(cls: type[Options], flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines `cls`'s `option()` fields as flags of the caller's module, so that its --help lists them."""
    caller = sys._getframe(1).f_globals.get("__name__", "")
    module = sys.argv[0] if caller == "__main__" else caller  # how absl names the script that runs
    kinds = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default, kind = f.default_factory() if f.default is dataclasses.MISSING else f.default, kinds[f.name]
        default = float(default) if kind is float and type(default) is int else default
        doc, choices = f.metadata["help"], f.metadata["choices"]
        named = dict(flag_values=flag_values, module_name=module)
        if type(default) is not kind or (kind not in _DEFINE and kind is not list):
            raise TypeError(f"{cls.__name__}.{f.name}: an option is a str, int, float, bool or list, "
                            "declared with a default of that type")
        if choices:
            flags.DEFINE_enum(f.name, default, list(choices), doc, **named)
        elif kind is list:
            (flags.DEFINE_multi_string if f.metadata["repeated"] else flags.DEFINE_list)(f.name, default, doc, **named)
        else:
            _DEFINE[kind](f.name, default, doc, **named)


def read_options(cls: type[Options], flag_values: flags.FlagValues = FLAGS) -> Options:
    names = [f.name for f in dataclasses.fields(cls) if f.name != "given"]
    return cls(given=frozenset(n for n in names if flag_values[n].present),
               **{n: flag_values[n].value for n in names})
