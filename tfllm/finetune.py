"""Classification fine-tuning under the pretraining machinery: the same distributed step,
checkpoints with resume, TensorBoard, exact cross-rank metrics; plus evaluation, prediction and
export of a fine-tuned model dir.

A fine-tuned model dir holds `finetune.json` (the resolved config, the class names and the
backbone's model config), `tokenizer/` (copied from the pretrained dir), `checkpoints/` (best =
highest validation accuracy, stored as the lowest error rate), `metrics.jsonl` and `tb/`. Its
export holds `saved_model/` (signature `classify`), `model.keras`, `tokenizer/`, `classes.json`
and `export.json` (finetune.json's record, the checkpoint, the quantization), and evaluates and
predicts as the model dir does.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf

from tfllm import atomic, distributed, labelled
from tfllm.checkpoint import CheckpointError, CheckpointManager
from tfllm.classifier import (ClassifierServing, balanced_class_weights, build_classifier, classification_report,
                              classifier_chain, confusion_png, format_report, head_variables, layer_lr_scales,
                              make_loss_fn)
from tfllm.config import ConfigError, FinetuneConfig, ModelConfig, canonical_clean, clean_steps
from tfllm.export import output_dir
from tfllm.models import build_causal_lm
from tfllm.optimizer import make_optimizer
from tfllm.quantize import quantize, refuse_quantized, save_for_serving
from tfllm.restore import (EXPORT_FILE, TOKENIZER_DIR, is_export, load_export_model, load_trained_model,
                           read_export_record, read_model_dir)
from tfllm.loop import MetricsLog, Task, TrainLoop
from tfllm.step import TrainStep, sync_state
from tfllm.tokenizers import Encoding, load_tokenizer
from tfllm.train import _agree

FINETUNE_FILE = "finetune.json"


@dataclasses.dataclass
class Classifier:
    model: keras.Model
    backbone: keras.Model | None  # None for an export's model
    tokenizer: object
    classes: list[str]
    cfg: FinetuneConfig
    record: dict  # finetune.json's
    checkpoint: str = ""
    quantization: str | None = None


def _columns(cfg: FinetuneConfig) -> labelled.Columns:
    return labelled.Columns(cfg.label_column, cfg.text_column, cfg.header, cfg.file_format)


def _tokenizer_files(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def _prepare_model_dir(cfg: FinetuneConfig, classes: list[str], model_cfg: ModelConfig) -> None:
    """Writes finetune.json and the tokenizer copy, or checks that a resumed dir matches."""
    path = os.path.join(cfg.model_dir, FINETUNE_FILE)
    tokenizer_src, tokenizer_dst = os.path.join(cfg.pretrained_dir, TOKENIZER_DIR), os.path.join(cfg.model_dir, TOKENIZER_DIR)
    record = {"config": dataclasses.asdict(cfg), "classes": classes, "backbone": dataclasses.asdict(model_cfg)}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["classes"] != classes:
            raise CheckpointError(f"{cfg.model_dir} was fine-tuned for classes {saved['classes']}, this data has "
                                  f"{classes}; use another --model_dir")
        if saved["backbone"] != record["backbone"] or saved["config"]["pooling"] != cfg.pooling:
            raise CheckpointError(f"{cfg.model_dir} holds a classifier of another architecture; use another --model_dir")
        before = FinetuneConfig.from_dict(saved["config"])
        changed = [f"--{k}={getattr(before, k)}" for k in ("max_length", "truncation", "clean")
                   if getattr(before, k) != getattr(cfg, k)]
        if changed:  # what the checkpoints learned from would differ from what the resumed run feeds them
            raise CheckpointError(f"{cfg.model_dir} was fine-tuned with {', '.join(changed)}; resume with the same "
                                  "or use another --model_dir")
        if _tokenizer_files(tokenizer_dst) != _tokenizer_files(tokenizer_src):
            raise CheckpointError(f"the tokenizer of --pretrained_dir={cfg.pretrained_dir} differs from the one "
                                  f"{cfg.model_dir} was fine-tuned with")
    os.makedirs(cfg.model_dir, exist_ok=True)
    if not os.path.isdir(tokenizer_dst):
        atomic.copy_dir(tokenizer_src, tokenizer_dst)
    atomic.write_json(path, record)


def encoding(cfg: FinetuneConfig) -> Encoding:
    return Encoding(cfg.max_length, cfg.truncation, cfg.clean)


def split_examples(cfg: FinetuneConfig) -> tuple[labelled.Examples, labelled.Examples]:
    """(training, validation) examples: --validation_file's, or held out of --train_file."""
    cols = _columns(cfg)
    train = labelled.read_examples(cfg.train_file, cols, cfg.clean)
    if cfg.validation_fraction:
        train, val = labelled.hold_out(train, cfg.validation_fraction)
    else:
        val = labelled.read_examples(cfg.validation_file, cols, cfg.clean)
    if cfg.max_train_examples:
        train = labelled.sample(train, cfg.max_train_examples)
    return train, val


def labelled_rows(cfg: FinetuneConfig, tokenizer, examples: labelled.Examples, classes: list[str]) -> np.ndarray:
    return labelled.rows(labelled.encode(tokenizer, examples.texts, encoding(cfg)), labelled.label_ids(examples, classes))


def _load_data(cfg: FinetuneConfig, tokenizer):
    train, val = split_examples(cfg)
    classes = labelled.label_vocabulary(train, cfg.num_classes)
    test = labelled.read_examples(cfg.test_file, _columns(cfg), cfg.clean) if cfg.test_file else None
    rows = [labelled_rows(cfg, tokenizer, e, classes) if e is not None else None for e in (train, val, test)]
    return classes, *rows


def evaluate_rows(model: keras.Model, rows: np.ndarray, classes: list[str], batch_size: int) -> dict:
    """Exact across ranks: rank r scores rows r, r+N, ...; confusion counts and float64 loss sums
    are summed over ranks, so the report is the same at any world size."""
    world = distributed.world()
    mine = rows[world.rank::world.size]
    pad = (-len(mine)) % batch_size
    if pad or not len(mine):
        filler = np.zeros((pad or batch_size, rows.shape[1]), np.int32)
        filler[:, 0], filler[:, 1] = labelled.NO_LABEL, 1
        mine = np.concatenate([mine, filler])
    predict = _predict_fn(model)
    confusion = np.zeros((len(classes), len(classes)), np.float64)
    loss_sum = 0.0
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        logits = predict(tf.constant(batch)).numpy().astype(np.float64)
        labels = batch[:, 0]
        real = labels != labelled.NO_LABEL
        logits, labels = logits[real], labels[real]
        log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        loss_sum += float(np.sum(log_z - logits[np.arange(len(labels)), labels]))
        np.add.at(confusion, (labels, logits.argmax(1)), 1)
    totals = distributed.allreduce_sum(np.append(confusion.ravel(), loss_sum))
    return classification_report(np.rint(totals[:-1]).reshape(confusion.shape), float(totals[-1]), classes)


def _predict_fn(model):
    fn = getattr(model, "_tfllm_predict", None)
    if fn is None:
        fn = tf.function(lambda b: model(labelled.split_rows(b)[0], training=False), reduce_retracing=True)
        model._tfllm_predict = fn
    return fn


class ClassificationTask(Task):
    """Fine-tuning: labelled rows in a global order, validation with the best checkpoint kept,
    early stopping, the backbone frozen for the first --freeze_backbone_steps."""

    def __init__(self, cfg: FinetuneConfig, full_step: TrainStep, head_step: TrainStep, rows: labelled.Batches,
                 val_rows, classes, writer, say, test_rows=None):
        self.cfg, self.full_step, self.head_step, self.rows = cfg, full_step, head_step, rows
        self.val_rows, self.classes, self.writer, self.say = val_rows, classes, writer, say
        self.test_rows = test_rows
        self.report = None

    def batches(self, state):
        batch = tf.constant(self.rows(state.step))[None]
        state.samples += self.rows.global_batch
        return batch

    def train_step(self, step):
        return self.head_step if step < self.cfg.freeze_backbone_steps else self.full_step

    def scalars(self, loop, metrics):
        # With the auxiliary LM loss, `loss` stays the classification loss (comparable with any run's
        # and with validation's); the objective that is differentiated and the LM part get tags of their own.
        scalars = super().scalars(loop, metrics)
        if "lm_loss" in metrics:
            weighted = self.cfg.lm_loss_weight * metrics["lm_loss"]
            scalars.update({"loss": metrics["loss"] - weighted, "aux_lm/objective": metrics["loss"],
                            "aux_lm/lm_loss": metrics["lm_loss"]})
        return scalars

    def log_line(self, step, metrics, scalars, perf):
        lm = f" lm_loss={scalars['aux_lm/lm_loss']:.4f}" if "aux_lm/lm_loss" in scalars else ""
        return (f"step {step}/{self.cfg.train_steps} loss={scalars['loss']:.4f}{lm} acc={scalars['accuracy']:.3f} "
                f"lr={scalars['learning_rate']:.2e}")

    def between_steps(self, loop, metrics):
        step, scores, cfg = loop.state.step, loop.state.scores, self.cfg
        if not ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.train_steps):
            return False
        report = self.report = evaluate_rows(loop.model, self.val_rows, self.classes, cfg.batch_size)
        gained = report["accuracy"] > scores["best_accuracy"]
        scores["best_accuracy"] = max(scores["best_accuracy"], report["accuracy"])
        scores["evals_without_gain"] = 0 if gained else scores["evals_without_gain"] + 1
        scores["accuracy"] = report["accuracy"]
        stopped = bool(cfg.early_stopping_patience and scores["evals_without_gain"] >= cfg.early_stopping_patience)
        self.say(f"validation step {step}: accuracy={report['accuracy']:.4f} loss={report['loss']:.4f}"
                 + (" (best)" if gained else "") + (" - early stop" if stopped else ""))
        self.writer.scalars("validation", step, {"loss": report["loss"], "accuracy": report["accuracy"],
                                                 "macro_f1": report["macro_f1"]})
        if distributed.world().is_chief:
            self.writer.image("validation", step, "confusion_matrix", confusion_png(report["confusion"], self.classes))
            loop.save(val_loss=1.0 - report["accuracy"])
        self.writer.flush()
        return stopped

    def finish(self, loop, stopped_early: bool = False) -> dict:
        distributed.barrier()
        final = self.report or evaluate_rows(loop.model, self.val_rows, self.classes, self.cfg.batch_size)
        self.say(format_report(final, self.classes))
        result = {"step": loop.state.step, "validation": final, "best_accuracy": loop.state.scores["best_accuracy"],
                  "stopped_early": stopped_early}
        if self.test_rows is not None:
            result["test"] = self.score_test(loop)
        return result

    def score_test(self, loop) -> dict:
        """The test file, scored once with the checkpoint that validation chose (the model selected
        without looking at the test set)."""
        step = -1  # known on rank 0, which wrote the checkpoints and reports
        if distributed.world().is_chief:
            best = loop.checkpoints.resolve("best" if loop.checkpoints.best() else "latest")
            loop.checkpoints.restore(best, loop.model.variables, model_only=True)
            step = loop.checkpoints.read_state(best)["step"]
        sync_state(loop.model)
        report = evaluate_rows(loop.model, self.test_rows, self.classes, self.cfg.batch_size)
        self.say(f"test ({self.cfg.test_file}, checkpoint of step {step}): accuracy={report['accuracy']:.4f} "
                 f"macro_f1={report['macro_f1']:.4f} loss={report['loss']:.4f}")
        self.writer.scalars("test", step, {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                                           "loss": report["loss"]})
        self.writer.flush()
        return {**report, "checkpoint_step": step}


def _start_weights(cfg: FinetuneConfig) -> tuple[str | None, str]:
    """(the pretraining checkpoint to load, or None; the --pretrained_checkpoint finetune.json records).

    Found before the model dir is written, so a wrong name leaves nothing behind. The record names
    the checkpoint, since "latest" and "best" change meaning as pretraining goes on. A run from scratch
    reads no weights, and a resumed run reads its own checkpoint and keeps the name it began with.
    """
    if cfg.init == "scratch":
        return None, ""
    if CheckpointManager(cfg.model_dir).latest():
        try:
            with open(os.path.join(cfg.model_dir, FINETUNE_FILE)) as f:
                return None, json.load(f)["config"].get("pretrained_checkpoint", "")
        except (OSError, ValueError, KeyError, TypeError):
            return None, ""  # _prepare_model_dir reports what is wrong with the record
    manager = CheckpointManager(cfg.pretrained_dir)
    try:
        path = os.path.normpath(manager.resolve(cfg.pretrained_checkpoint))
    except CheckpointError:
        raise CheckpointError(f"--pretrained_checkpoint={cfg.pretrained_checkpoint}: {cfg.pretrained_dir} has no such "
                              f"checkpoint (it has: {', '.join(manager.complete()) or 'none'})") from None
    own = os.path.dirname(path) == os.path.normpath(manager.dir)
    return path, os.path.basename(path) if own else os.path.abspath(path)


def finetune(cfg: FinetuneConfig, log=print) -> dict:
    world = distributed.init()
    say = distributed.chief_only(log)
    cfg.validate()
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(cfg.seed)
    # Scratch keeps the architecture and tokenizer but not the weights, so it reads no checkpoint.
    pretrained_cfg, tokenizer = read_model_dir(cfg.pretrained_dir)
    start_weights, recorded = _start_weights(cfg)
    cfg = dataclasses.replace(cfg, pretrained_checkpoint=recorded)
    context = pretrained_cfg.model.max_sequence_length
    if not 1 <= cfg.allreduce_buckets <= pretrained_cfg.model.num_layers + 2:
        raise ConfigError(f"--allreduce_buckets={cfg.allreduce_buckets}: a {pretrained_cfg.model.num_layers}-layer "
                          f"model splits into 1 to {pretrained_cfg.model.num_layers + 2} buckets")
    if pretrained_cfg.model.family == "gpt2" and cfg.max_length > context:
        raise ConfigError(f"--max_length={cfg.max_length} exceeds the pretrained model's context ({context} positions)"
                          + ("; --truncation=head_tail keeps a long text's start and end within it"
                             if cfg.truncation == "head" else ""))
    # "auto": the text as pretraining saw it; finetune.json records the choice.
    clean = pretrained_cfg.data.clean if cfg.clean == "auto" else cfg.clean
    cfg = dataclasses.replace(cfg, clean=canonical_clean(clean))
    classes, train_rows, val_rows, test_rows = _load_data(cfg, tokenizer)
    _agree(lambda: _prepare_model_dir(cfg, classes, pretrained_cfg.model))
    if start_weights is None:  # random weights, or a resumed run's own checkpoint replaces them
        backbone = build_causal_lm(pretrained_cfg.model).backbone
    else:
        backbone = load_trained_model(cfg.pretrained_dir, start_weights).model.backbone
    model = build_classifier(backbone, len(classes), cfg.pooling, cfg.classifier_dropout)
    optimizer = make_optimizer(cfg.optimizer, cfg.train_steps, world.size, model, "float32",
                               lr_scales=layer_lr_scales(model, backbone, cfg.layer_lr_decay))
    weights = balanced_class_weights(train_rows[:, 0], len(classes)) if cfg.class_weighted else None
    loss_fn = make_loss_fn(weights, cfg.lm_loss_weight, backbone)
    extra_stats = ("lm_loss",) if cfg.lm_loss_weight else ()
    clip = cfg.optimizer.clip_norm
    full_step = TrainStep(model, optimizer, cfg.batch_size, 1, 1, clip, cfg.jit_compile, loss_fn=loss_fn,
                          allreduce_buckets=cfg.allreduce_buckets, extra_stats=extra_stats,
                          chain=classifier_chain(model, backbone, weights, cfg.lm_loss_weight))
    full_step.build()
    # Only the head trains here: its gradients exist right after the head's backward, so one
    # allreduce hides nothing less than B would. The LM loss reads no head variable, so this step
    # leaves out its vocabulary projection.
    head_step = TrainStep(model, optimizer, cfg.batch_size, 1, 1, clip, cfg.jit_compile, loss_fn=make_loss_fn(weights),
                          variables=head_variables(model, backbone))

    rows = labelled.Batches(train_rows, cfg.batch_size, world.rank, world.size, cfg.seed)
    metrics_log = MetricsLog(cfg.model_dir, cfg.log_every, say)
    task = ClassificationTask(cfg, full_step, head_step, rows, val_rows, classes, metrics_log.writer, say, test_rows)
    loop = TrainLoop(task, model, optimizer, CheckpointManager(cfg.model_dir, keep=cfg.keep_checkpoints), metrics_log,
                     {"batch_size": cfg.batch_size, "global_batch": rows.global_batch}, say)
    loop.state.scores = {"best_accuracy": -1.0, "evals_without_gain": 0}
    latest = loop.checkpoints.latest()
    if latest:
        loop.restore(latest, rows.global_batch)
        say(f"resumed from {latest} (step {loop.state.step})")
    else:
        metrics_log.writer.hparams({"init": cfg.init, "pooling": cfg.pooling, "learning_rate": cfg.optimizer.learning_rate,
                                    "batch_size": cfg.batch_size, "global_batch": rows.global_batch,
                                    "max_length": cfg.max_length, "freeze_backbone_steps": cfg.freeze_backbone_steps,
                                    "layer_lr_decay": cfg.layer_lr_decay, "lm_loss_weight": cfg.lm_loss_weight,
                                    "classes": len(classes), "world_size": world.size,
                                    "model.family": pretrained_cfg.model.family,
                                    "model.num_layers": pretrained_cfg.model.num_layers},
                                   metrics=(("validation", "accuracy"), ("validation", "loss"), ("train", "loss")))
    sync_state(model, optimizer)
    say(f"fine-tuning {len(classes)} classes {classes}: {len(train_rows)} training, {len(val_rows)} validation"
        + (f", {len(test_rows)} test" if test_rows is not None else "")
        + f" examples; init={cfg.init}; {world.size} rank(s) x batch {cfg.batch_size}; clean={cfg.clean}, "
        f"truncation={cfg.truncation}")
    # The model (and usually its vocabulary) learned from text cleaned this way: a step left out now
    # (lower, say) feeds it text it splits into rarer pieces. A note, not an error: it may be deliberate.
    left_out = [step for step in clean_steps(pretrained_cfg.data.clean) if step not in clean_steps(cfg.clean)]
    if left_out:
        say(f"note: the pretraining text was cleaned with --clean={pretrained_cfg.data.clean}; --clean={cfg.clean} "
            f"leaves out {','.join(left_out)}")
    try:
        stopped_early = loop.run(cfg.train_steps)
        return task.finish(loop, stopped_early)
    finally:
        metrics_log.close()


def load_classifier(model_dir: str, checkpoint: str | None = "best") -> Classifier:
    """A fine-tuned model dir's checkpoint, or the model of its export."""
    if is_export(model_dir):
        return _load_export(model_dir, checkpoint)
    path = os.path.join(model_dir, FINETUNE_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{model_dir}: no {FINETUNE_FILE} (not a model dir written by pipelines.finetune)")
    with open(path) as f:
        record = json.load(f)
    keras.mixed_precision.set_global_policy("float32")
    model, backbone = _float_classifier(record)
    manager = CheckpointManager(model_dir)
    ckpt = manager.resolve(checkpoint if manager.best() or checkpoint != "best" else "latest")
    manager.restore(ckpt, model.variables, model_only=True)
    return Classifier(model, backbone, load_tokenizer(os.path.join(model_dir, TOKENIZER_DIR)), record["classes"],
                      FinetuneConfig.from_dict(record["config"]), record, ckpt)


def _float_classifier(record: dict) -> tuple[keras.Model, keras.Model]:
    cfg = FinetuneConfig.from_dict(record["config"])
    backbone = build_causal_lm(ModelConfig(**record["backbone"])).backbone
    return build_classifier(backbone, len(record["classes"]), cfg.pooling, cfg.classifier_dropout), backbone


def _load_export(export_dir: str, checkpoint: str | None) -> Classifier:
    record = read_export_record(export_dir, checkpoint, "classifier", "best")
    model = load_export_model(export_dir, record, lambda: _float_classifier(record)[0])
    return Classifier(model, None, load_tokenizer(os.path.join(export_dir, TOKENIZER_DIR)), record["classes"],
                      FinetuneConfig.from_dict(record["config"]), record, record["checkpoint"],
                      record.get("quantization"))


def evaluate_file(clf: Classifier, path: str = "", batch_size: int = 64) -> dict:
    """The report on a labelled file; without one, on the run's validation examples."""
    if path:
        examples = labelled.read_examples(path, _columns(clf.cfg), clf.cfg.clean)
    else:
        examples = split_examples(clf.cfg)[1]
    return evaluate_rows(clf.model, labelled_rows(clf.cfg, clf.tokenizer, examples, clf.classes), clf.classes,
                         batch_size)


def predict(clf: Classifier, texts: list[str], batch_size: int = 64) -> list[tuple[str, float]]:
    serving = ClassifierServing(clf.model, clf.tokenizer, clf.classes, encoding(clf.cfg))
    out = []
    for start in range(0, len(texts), batch_size):
        result = serving.classify(tf.constant(texts[start:start + batch_size]))
        out += [(label.decode(), float(p)) for label, p in zip(result["label"].numpy(), result["probability"].numpy())]
    return out


def export_classifier(clf: Classifier, out_dir: str, overwrite: bool = False, mode: str = "",
                      source: str = "the classifier") -> str:
    """Writes the export (see the module docstring), quantized to `mode` (int8, int4) if given."""
    out_dir = output_dir(out_dir, overwrite)
    refuse_quantized(clf.quantization, source)
    model = quantize(clf.model, mode, source) if mode else clf.model

    def build(tmp: str) -> None:
        served, twin = save_for_serving(model, os.path.join(tmp, "model.keras"), lambda: _float_classifier(clf.record)[0])
        module = ClassifierServing(served, clf.tokenizer, clf.classes, encoding(clf.cfg), twin)
        tf.saved_model.save(module, os.path.join(tmp, "saved_model"), signatures={"classify": module.classify})
        clf.tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
        atomic.write_json(os.path.join(tmp, "classes.json"), clf.classes)
        atomic.write_json(os.path.join(tmp, EXPORT_FILE), {**clf.record, "kind": "classifier",
                                                           "checkpoint": clf.checkpoint, "quantization": mode or None})
    return atomic.build_dir(out_dir, build)
