"""Pretraining loop: data, model, optimizer, distributed step, checkpoints, TensorBoard.

Every rank runs this same function. Decisions that must agree across ranks (prepared data,
restored step, stop on SIGTERM, non-finite loss) are made from values every rank shares: an
object broadcast from rank 0 or the bookkeeping that rides in the step's allreduce. Rank 0
alone writes config.json, checkpoints, TensorBoard events and samples.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time

import keras
import tensorflow as tf

from tfllm import atomic, distill, distributed, preset
from tfllm.checkpoint import CheckpointError, CheckpointManager
from tfllm.config import Config, ConfigError, model_mismatch
from tfllm.data.cleaning import clean_texts
from tfllm.data.corpus import CorpusError
from tfllm.data.pipeline import DataError, WindowDataset
from tfllm.data.prepare import ensure_prepared
from tfllm.data.sampler import GlobalOrder
from tfllm.evaluate import evaluate, make_eval_fn
from tfllm.generate import SamplingConfig, generate_text
from tfllm.loop import LoopState, MetricsLog, Task, TrainLoop, current_lr
from tfllm.malloc import active_allocator
from tfllm.models import build_causal_lm, count_params, flops_per_token, lm_chain, lm_loss_sums, perplexity
from tfllm.optimizer import make_optimizer
from tfllm.profiler import StepProfiler
from tfllm.restore import CONFIG_FILE, TOKENIZER_DIR
from tfllm.step import TrainStep, sync_state
from tfllm.summary import device_peak_flops
from tfllm.tokenizers import load_tokenizer


def _agree(fn):
    """Runs fn on rank 0 and shares (result, error message) with every rank."""
    result, error = None, None
    if distributed.world().is_chief:
        try:
            result = fn()
        except (ConfigError, CorpusError, DataError, CheckpointError) as e:
            error = f"{type(e).__name__}: {e}"
    result, error = distributed.broadcast_object((result, error))
    if error:
        kind, message = error.split(": ", 1)
        raise {"CheckpointError": CheckpointError, "DataError": DataError}.get(kind, ConfigError)(message)
    return result


def resolve_config(cfg: Config, manifest: dict) -> Config:
    """Fills values that come from the prepared data and checks that the model fits it."""
    vocab = int(manifest["vocab_size"])
    source = f" (from --init_preset={cfg.train.init_preset})" if cfg.train.init_preset else ""
    if cfg.model.vocab_size and cfg.model.vocab_size != vocab:
        raise ConfigError(f"the model's vocab_size={cfg.model.vocab_size}{source} does not match the data's tokenizer "
                          f"({vocab} tokens in {cfg.data.data_dir}/manifest.json)")
    cfg.model.vocab_size = vocab
    seq_len = int(manifest["seq_len"])
    if cfg.model.family == "gpt2" and cfg.model.max_sequence_length < seq_len:
        raise ConfigError(f"--max_sequence_length={cfg.model.max_sequence_length}{source} is shorter than the data's "
                          f"windows (--seq_len={seq_len})")
    return cfg


def check_model_dir(cfg: Config) -> None:
    path = os.path.join(cfg.train.model_dir, CONFIG_FILE)
    if os.path.exists(path):
        saved = Config.load(path)
        if saved.distill.teacher_dir and not cfg.distill.teacher_dir:
            raise ConfigError(f"{cfg.train.model_dir} was distilled from {saved.distill.teacher_dir}: resume it "
                              f"with pipelines.distill --teacher_dir={saved.distill.teacher_dir}")
        diffs = model_mismatch(saved.model, cfg.model)
        if diffs:
            raise CheckpointError(f"{cfg.train.model_dir} holds a different model ({'; '.join(diffs)}); "
                                  "use another --model_dir or the same model flags")


def _prepare_locally(cfg) -> dict:
    """Elastic mode runs no collective before the ring forms: every worker makes sure the data
    is prepared itself, one at a time per data dir (a lock file), the later ones reusing it."""
    os.makedirs(os.path.dirname(cfg.data_dir) or ".", exist_ok=True)
    with open(cfg.data_dir.rstrip("/") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return ensure_prepared(cfg, log=lambda *a, **k: None)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class StreamBatches:
    """Each rank's tf.data stream of its part of the shards, resumed by step: a static world's order."""

    def __init__(self, dataset: WindowDataset, tcfg, start_step: int):
        world = distributed.world()
        self.micro_batches = tcfg.grad_accum_steps
        self.global_batch = tcfg.batch_size * tcfg.grad_accum_steps * world.size
        self.stream = dataset.stream(start_step * tcfg.grad_accum_steps, world.rank, world.size, tcfg.batch_size,
                                     tcfg.seed, tcfg.shuffle_buffer)

    def __call__(self, state: LoopState):
        micro = []
        for _ in range(self.micro_batches):
            state.epoch, batch = next(self.stream)
            micro.append(batch)
        state.samples += self.global_batch
        return micro


class GlobalBatches:
    """Elastic mode: each step's windows by global position (`GlobalOrder`), for the world of that step.

    With `sample_log`, every process appends the window ids of each step it runs to
    <sample_log>.<host>.<pid>, tagged with the elastic generation: the audit trail of the data order.
    """

    def __init__(self, order: GlobalOrder, batch_size: int, micro_batches: int, sample_log: str = ""):
        self.order, self.batch_size, self.micro_batches = order, batch_size, micro_batches
        self.generation = 0
        self.log_path = f"{sample_log}.{socket.gethostname()}.{os.getpid()}" if sample_log else ""

    def __call__(self, state: LoopState):
        world = distributed.world()
        ids = self.order.step_ids(state.samples, world.rank, world.size, self.batch_size, self.micro_batches)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": state.step + 1, "generation": self.generation, "rank": world.rank,
                                    "size": world.size, "windows": ids.ravel().tolist()}) + "\n")
        state.samples += world.size * self.batch_size * self.micro_batches
        state.epoch = state.samples // self.order.num_windows
        return tf.constant(self.order.read(ids.ravel()).reshape(self.micro_batches, self.batch_size, -1))


def sampling_config(t) -> SamplingConfig:
    """The in-training samples' settings (--sample_*), checked before anything runs."""
    cfg = SamplingConfig(strategy=t.sample_strategy, max_new_tokens=t.sample_tokens, temperature=t.sample_temperature,
                         top_k=t.sample_top_k, top_p=t.sample_top_p, seed=t.sample_seed)
    cfg.validate(flag_prefix="sample_")
    return cfg


class LanguageModelTask(Task):
    """Pretraining: next-token loss over prepared windows, validation, greedy samples, checkpoints."""

    def __init__(self, cfg: Config, step_fn: TrainStep, batches, val_ds, writer, say):
        self.cfg, self.tcfg, self.step_fn, self.source = cfg, cfg.train, step_fn, batches
        self.val_ds, self.writer, self.say = val_ds, writer, say
        self.tokenizer = None  # loaded by whichever process samples (rank 0, which elastic mode may move)
        self.eval_fn = make_eval_fn(step_fn.model, cfg.train.jit_compile)
        self.sampling = sampling_config(cfg.train)
        self.started = time.time()

    def batches(self, state):
        return self.source(state)

    def train_step(self, step):
        return self.step_fn

    def scalars(self, loop, metrics):
        # Distilling, `loss` stays the next-token loss, comparable with any run's (and with val_loss);
        # the objective that is differentiated and its KL part get tags of their own.
        loss = metrics.get("hard_loss", metrics["loss"])
        extra = {"distill/objective": metrics["loss"], "distill/kl": metrics["kl"]} if "kl" in metrics else {}
        return {"loss": loss, "perplexity": perplexity(loss), "accuracy": metrics["accuracy"],
                "learning_rate": current_lr(loop.optimizer), "grad_norm": metrics["grad_norm"],
                "tokens_seen": loop.state.tokens_seen, **extra}

    def log_line(self, step, metrics, scalars, perf):
        mfu = f" | MFU {perf['mfu']:.1%}" if "mfu" in perf else f" | {perf['model_flops_per_sec'] / 1e9:.1f} GFLOP/s"
        kl = f" | kl {scalars['distill/kl']:.4f}" if "distill/kl" in scalars else ""
        return (f"step {step}/{self.tcfg.train_steps} | loss {scalars['loss']:.4f}{kl} | lr {scalars['learning_rate']:.2e} | "
                f"gnorm {metrics['grad_norm']:.3f} | {perf['tokens_per_sec']:,.0f} tok/s | "
                f"{perf['step_time_ms']:.1f} ms/step{mfu}")

    def validate(self, step: int) -> dict | None:
        if self.val_ds is None:
            return None
        m = evaluate(self.step_fn.model, self.val_ds, self.tcfg.batch_size, self.tcfg.eval_steps, self.eval_fn)
        self.writer.scalars("validation", step, {"loss": m["loss"], "perplexity": m["perplexity"],
                                                 "accuracy": m["accuracy"]})
        self.say(f"step {step}: val_loss {m['loss']:.4f} | val_ppl {m['perplexity']:.2f} | {m['tokens']:,} tokens")
        return m

    def _record_validation(self, scores: dict, step: int, m: dict | None) -> None:
        if m is None:
            return
        scores["val_loss"] = m["loss"]
        if m["loss"] < scores.get("best_val_loss", float("inf")):
            scores["best_val_loss"], scores["best_val_step"] = m["loss"], step

    def sample(self, step: int) -> str | None:
        """Rank 0 samples from --sample_prompt (--sample_strategy...) into TensorBoard's text tab."""
        if not distributed.world().is_chief or not self.tcfg.sample_prompt:
            return None
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(os.path.join(self.tcfg.model_dir, TOKENIZER_DIR))
        context = self.cfg.model.max_sequence_length
        prompt = clean_texts([self.tcfg.sample_prompt], self.cfg.data.clean, strip=False)[0]
        budget = min(self.tcfg.sample_tokens, context - len(self.tokenizer.encode(prompt)))
        if budget < 1:
            self.say(f"warning: --sample_prompt fills the {context}-token context; no sample")
            return None
        sampling = dataclasses.replace(self.sampling, max_new_tokens=budget)
        text = generate_text(self.step_fn.model, self.tokenizer, [prompt], sampling)[0]  # cleaned above
        self.writer.sample("train", step, "sample", self.tcfg.sample_prompt, text, sampling.describe())
        return self.tcfg.sample_prompt + text

    def between_steps(self, loop, metrics):
        step, t = loop.state.step, self.tcfg
        val = None
        if t.eval_every and step % t.eval_every == 0 and step < t.train_steps:
            val = self.validate(step)
            self._record_validation(loop.state.scores, step, val)
        if t.sample_every and step % t.sample_every == 0 and step < t.train_steps:
            self.sample(step)
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.train_steps:
            loop.save(val["loss"] if val else None)
        return False

    def finish(self, loop) -> dict:
        step, state = loop.state.step, loop.state
        result = {"step": step, "losses": loop.losses}
        if step < self.tcfg.train_steps:  # --stop_after: save and leave the rest to the next run
            path = loop.save()
            self.say(f"stopped after {step - loop.start_step} steps at step {step} (--stop_after); rerun to continue; "
                     f"checkpoint: {path}")
            return {**result, "val_loss": state.scores.get("val_loss"), "tokens_per_sec": loop.log.run_rate(),
                    "checkpoint": path}
        self._record_validation(state.scores, step, self.validate(step))
        last = loop.checkpoints.latest()
        path = loop.save(state.scores.get("val_loss")) if step > loop.start_step or not last else last
        text = self.sample(step)
        self.writer.flush()
        if text is not None:
            self.say(f"sample at step {step}, {self.sampling.describe()}:\n{text}")
        self.say(self.summary(loop, path))
        return {**result, "val_loss": state.scores.get("val_loss"), "tokens_per_sec": loop.log.run_rate(),
                "checkpoint": path}

    def summary(self, loop, checkpoint: str) -> str:
        """The end-of-run block: what was trained, how fast, how well, and where it all is."""
        state, model_dir = loop.state, self.tcfg.model_dir
        best = state.scores.get("best_val_loss")
        rows = [("steps", f"{state.step} ({state.step - loop.start_step} in this run)"),
                ("tokens seen", f"{int(state.tokens_seen):,}"),
                ("wall time", f"{loop.log.run_time:.1f} s of steps, {time.time() - self.started:.1f} s in all"),
                ("throughput", f"{loop.log.run_rate():,.0f} tokens/s"),
                ("best val loss", f"{best:.4f} at step {state.scores['best_val_step']}" if best is not None else "none"),
                ("checkpoint", checkpoint),
                ("TensorBoard", f"tensorboard --logdir {os.path.join(model_dir, 'tb')}"),
                ("export", f"python -m pipelines.export --model_dir={model_dir} --output_dir=EXPORT_DIR")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(["-" * 60, "run summary"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["-" * 60])


def _write_model_dir(cfg: Config) -> None:
    """config.json, and the tokenizer copy that keeps the model dir usable without the data dir."""
    os.makedirs(cfg.train.model_dir, exist_ok=True)
    cfg.save(os.path.join(cfg.train.model_dir, CONFIG_FILE))
    tok_dir = os.path.join(cfg.train.model_dir, TOKENIZER_DIR)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        atomic.copy_dir(os.path.join(cfg.data.data_dir, "tokenizer"), tok_dir)


def pretrain(cfg: Config, log=print) -> dict:
    tcfg = cfg.train
    world = distributed.init(elastic=tcfg.elastic)
    say = distributed.chief_only(log)  # rank 0 may change in elastic mode
    if not cfg.data.data_dir:
        cfg.data.data_dir = os.path.join(tcfg.model_dir, "data")
    cfg.data.data_dir = os.path.abspath(cfg.data.data_dir)
    cfg.validate()
    sampling_config(tcfg)
    # Elastic mode runs no collective before the ring forms (joiners would deadlock): each
    # worker checks for itself, and rank 0's state reaches the others in the first sync.
    agree = (lambda fn: fn()) if tcfg.elastic else _agree
    manifest = _prepare_locally(cfg.data) if tcfg.elastic else ensure_prepared(cfg.data, log=say, world=world)
    resolve_config(cfg, manifest)
    agree(lambda: check_model_dir(cfg))
    train_ds = WindowDataset(cfg.data.data_dir, "train", verify=tcfg.verify_data)
    val_ds = WindowDataset(cfg.data.data_dir, "validation") if manifest["splits"]["validation"]["shards"] else None
    seq_len = train_ds.seq_len

    keras.mixed_precision.set_global_policy(tcfg.precision)
    keras.utils.set_random_seed(tcfg.seed)
    model = build_causal_lm(cfg.model)
    teacher, loss = None, {"loss_fn": lm_loss_sums, "chain": lm_chain(model)}
    if cfg.distill.teacher_dir:  # built after the student, whose initialisation stays that of its seed
        teacher_cfg, cfg.distill.checkpoint = agree(lambda: distill.check_teacher(cfg, seq_len))
        teacher = distill.load_teacher(cfg.distill.teacher_dir, teacher_cfg, cfg.distill.checkpoint)
        objective = distill.DistillationLoss(teacher.model, cfg.distill)
        loss = {"loss_fn": objective, "chain": objective.chain(model), "extra_stats": objective.STATS}
    optimizer = make_optimizer(cfg.optimizer, tcfg.train_steps, world.size, model, tcfg.precision, tcfg.elastic)
    step_fn = TrainStep(model, optimizer, tcfg.batch_size, seq_len, tcfg.grad_accum_steps, cfg.optimizer.clip_norm,
                        tcfg.jit_compile, tcfg.fp16_allreduce, parallel_slices=tcfg.parallel_slices,
                        allreduce_buckets=tcfg.allreduce_buckets, **loss)
    step_fn.build()  # the optimizer's variables exist before any restore, sync or elastic state
    ckpts = CheckpointManager(tcfg.model_dir, keep=tcfg.keep_checkpoints)
    global_batch = tcfg.batch_size * tcfg.grad_accum_steps * world.size
    n_params = count_params(model)
    fpt = flops_per_token(cfg.model, seq_len, n_params) + (teacher.forward_flops_per_token(seq_len) if teacher else 0)
    device, peak = device_peak_flops()
    metrics_log = MetricsLog(tcfg.model_dir, tcfg.log_every, say, fpt, peak)
    loop = TrainLoop(None, model, optimizer, ckpts, metrics_log,
                     {"batch_size": tcfg.batch_size, "grad_accum_steps": tcfg.grad_accum_steps,
                      "global_batch": global_batch}, say)

    def restore() -> dict:
        _write_model_dir(cfg)
        latest = ckpts.latest()
        if latest:
            stored = loop.restore(latest, global_batch)
            return {"state": loop.state, "stored": stored}
        if tcfg.init_preset:  # a new run only: a checkpoint always wins over the preset
            preset.load_weights(model, tcfg.init_preset)
            say(f"initialised from keras-hub preset {tcfg.init_preset}")
        return {"state": loop.state, "stored": {}}

    if tcfg.elastic:
        restored = restore() if world.is_chief else {"state": LoopState(), "stored": {}}
    else:
        restored = _agree(restore)
        sync_state(model, optimizer)
    loop.state, stored = restored["state"], restored["stored"]
    loop.start_step = start = loop.state.step
    if start:
        say(f"resumed from step {start} ({ckpts.latest()})")
        if not tcfg.elastic and (stored.get("world_size") != world.size or stored.get("batch_size") != tcfg.batch_size
                                 or stored.get("grad_accum_steps") != tcfg.grad_accum_steps):
            say("warning: world size or batch differs from the checkpoint's; the data order continues approximately")

    if start == 0:
        metrics_log.writer.hparams({**{f"model.{k}": v for k, v in vars(cfg.model).items()},
                                    "batch_size": tcfg.batch_size, "global_batch": global_batch,
                                    "learning_rate": cfg.optimizer.learning_rate, "precision": tcfg.precision,
                                    "world_size": world.size, "tokenizer": manifest["tokenizer"]["kind"],
                                    **({f"distill.{k}": v for k, v in vars(cfg.distill).items()} if teacher else {})})
    mode = f"elastic, commit every {tcfg.elastic_commit_every} steps" if tcfg.elastic else world.backend
    say(f"model {cfg.model.family}: {n_params:,} parameters, {fpt:,} FLOPs/token; data {train_ds.num_windows:,} "
        f"train windows of {seq_len}; world {world.size} ({mode}{': ' + world.placement() if world.hosts and world.size > 1 else ''}); "
        f"device {device}; global batch {global_batch} x {seq_len} tokens; "
        f"{step_fn.allreduce_buckets} allreduce bucket{'s' if step_fn.allreduce_buckets > 1 else ''}; malloc {active_allocator()}")
    if teacher:
        say(f"distilling from {teacher.describe(cfg.distill)}")

    if tcfg.elastic:
        batches = GlobalBatches(GlobalOrder(train_ds, tcfg.seed), tcfg.batch_size, tcfg.grad_accum_steps, tcfg.sample_log)
    else:
        batches = StreamBatches(train_ds, tcfg, start)
    loop.task = LanguageModelTask(cfg, step_fn, batches, val_ds, metrics_log.writer, say)
    if tcfg.profile_steps:
        if tcfg.profile_rank >= world.size:
            raise ConfigError(f"--profile_rank={tcfg.profile_rank}: the world has ranks 0-{world.size - 1}")
        loop.profiler = StepProfiler(tcfg.profile_range(), tcfg.model_dir, world.rank, tcfg.profile_rank, log)
    end = min(tcfg.train_steps, start + tcfg.stop_after) if tcfg.stop_after else tcfg.train_steps
    try:
        if tcfg.elastic:
            from tfllm.elastic import train_elastic
            return train_elastic(loop, end, tcfg, log)
        loop.run(end)
        return loop.task.finish(loop)
    finally:
        metrics_log.close()
