"""Pretraining loop: data, model, optimizer, distributed step, checkpoints, TensorBoard.

Every rank runs this same function. Decisions that must agree across ranks (prepared data,
restored step, stop on SIGTERM, non-finite loss) are made from values every rank shares: an
object broadcast from rank 0 or the bookkeeping that rides in the step's allreduce. Rank 0
alone writes config.json, checkpoints, TensorBoard events and samples.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import keras
import tensorflow as tf

from tfllm import atomic, distributed, preset
from tfllm.checkpoint import CheckpointError, CheckpointManager
from tfllm.config import Config, ConfigError, OptimizerConfig, model_mismatch
from tfllm.data.corpus import CorpusError
from tfllm.data.pipeline import DataError, WindowDataset
from tfllm.data.prepare import ensure_prepared
from tfllm.evaluate import evaluate, make_eval_fn
from tfllm.malloc import active_allocator
from tfllm.generate import SamplingConfig, generate_text
from tfllm.models import build_causal_lm, count_params, flops_per_token, lm_chain, perplexity
from tfllm.restore import CONFIG_FILE, TOKENIZER_DIR
from tfllm.step import TrainStep, sync_state
from tfllm.summary import SummaryWriter, device_peak_flops
from tfllm.tokenizers import load_tokenizer



WARMUP_STEPS = 10


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message names the step."""


class StopRequested(Exception):
    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"stopped by signal at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def make_optimizer(cfg: OptimizerConfig, train_steps: int, world_size: int, model, precision: str):
    """AdamW with linear warmup then cosine decay to min_learning_rate.

    --scale_lr_with_world_size multiplies both learning rates by the number of ranks (the
    linear scaling rule of Goyal et al. 2017): the global batch grows with the world, so the
    step size grows with it; warmup keeps the early large steps stable.
    """
    factor = world_size if cfg.scale_lr_with_world_size else 1
    peak, floor = cfg.learning_rate * factor, cfg.min_learning_rate * factor
    warmup = min(cfg.warmup_steps, max(train_steps - 1, 0))
    decay = max(1, (cfg.decay_steps or train_steps) - warmup)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak, decay_steps=decay, alpha=floor / peak,
        warmup_target=peak if warmup else None, warmup_steps=warmup)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay, beta_1=cfg.beta1,
                                       beta_2=cfg.beta2, epsilon=cfg.epsilon)
    excluded = []
    for v in model.trainable_variables:
        is_bias = v.path.rsplit("/", 1)[-1] == "bias"  # attention biases are 2-D ([heads, head_dim])
        is_norm_or_embedding = len(v.shape) < 2 or "embedding" in v.path
        if is_bias or (is_norm_or_embedding and not cfg.decay_embeddings_and_norms):
            excluded.append(v)
    optimizer.exclude_from_weight_decay(var_list=excluded)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_lr(optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(inner.learning_rate)


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
        diffs = model_mismatch(saved.model, cfg.model)
        if diffs:
            raise CheckpointError(f"{cfg.train.model_dir} holds a different model ({'; '.join(diffs)}); "
                                  "use another --model_dir or the same model flags")


def pretrain(cfg: Config, log=print) -> dict:
    world = distributed.init()
    say = log if world.is_chief else (lambda *a, **k: None)
    tcfg = cfg.train
    if not cfg.data.data_dir:
        cfg.data.data_dir = os.path.join(tcfg.model_dir, "data")
    cfg.data.data_dir = os.path.abspath(cfg.data.data_dir)
    cfg.validate()

    manifest = _agree(lambda: ensure_prepared(cfg.data, log=say))
    resolve_config(cfg, manifest)
    _agree(lambda: check_model_dir(cfg))
    train_ds = WindowDataset(cfg.data.data_dir, "train", verify=tcfg.verify_data)
    val_ds = WindowDataset(cfg.data.data_dir, "validation") if manifest["splits"]["validation"]["shards"] else None
    seq_len = train_ds.seq_len

    keras.mixed_precision.set_global_policy(tcfg.precision)
    keras.utils.set_random_seed(tcfg.seed)
    model = build_causal_lm(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, tcfg.train_steps, world.size, model, tcfg.precision)
    step_fn = TrainStep(model, optimizer, tcfg.batch_size, seq_len, tcfg.grad_accum_steps, cfg.optimizer.clip_norm,
                        tcfg.jit_compile, tcfg.fp16_allreduce, parallel_slices=tcfg.parallel_slices,
                        allreduce_buckets=tcfg.allreduce_buckets,
                        chain=lm_chain(model))
    step_fn.build()
    state_vars = list(model.variables) + list(optimizer.variables)

    ckpts = CheckpointManager(tcfg.model_dir, keep=tcfg.keep_checkpoints)

    def restore():
        os.makedirs(tcfg.model_dir, exist_ok=True)
        cfg.save(os.path.join(tcfg.model_dir, CONFIG_FILE))
        # The model dir carries its own tokenizer so that it stays usable without the data dir.
        tok_dir = os.path.join(tcfg.model_dir, TOKENIZER_DIR)
        if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            atomic.copy_dir(os.path.join(cfg.data.data_dir, "tokenizer"), tok_dir)
        latest = ckpts.latest()
        if latest:
            return ckpts.restore(latest, state_vars)
        if tcfg.init_preset:  # a new run only: a checkpoint always wins over the preset
            preset.load_weights(model, tcfg.init_preset)
            say(f"initialised from keras-hub preset {tcfg.init_preset}")
        return {}

    state = _agree(restore)
    sync_state(model, optimizer)
    start = int(state.get("step", 0))
    if start:
        say(f"resumed from step {start} ({ckpts.latest()})")
        if state.get("world_size") != world.size or state.get("batch_size") != tcfg.batch_size \
                or state.get("grad_accum_steps") != tcfg.grad_accum_steps:
            say("warning: world size or batch differs from the checkpoint's; the data order continues approximately")

    n_params = count_params(model)
    fpt = flops_per_token(cfg.model, seq_len, n_params)
    device, peak = device_peak_flops()
    writer = SummaryWriter(os.path.join(tcfg.model_dir, "tb"), enabled=world.is_chief)
    if start == 0:
        writer.hparams({**{f"model.{k}": v for k, v in vars(cfg.model).items()},
                        "batch_size": tcfg.batch_size, "global_batch": tcfg.batch_size * tcfg.grad_accum_steps * world.size,
                        "learning_rate": cfg.optimizer.learning_rate, "precision": tcfg.precision,
                        "world_size": world.size, "tokenizer": manifest["tokenizer"]["kind"]})
    say(f"model {cfg.model.family}: {n_params:,} parameters, {fpt:,} FLOPs/token; data {train_ds.num_windows:,} "
        f"train windows of {seq_len}; world {world.size} ({world.backend}{': ' + world.placement() if world.size > 1 else ''}); "
        f"device {device}; "
        f"global batch {tcfg.batch_size * tcfg.grad_accum_steps * world.size} x {seq_len} tokens; "
        f"{step_fn.allreduce_buckets} allreduce bucket{'s' if step_fn.allreduce_buckets > 1 else ''}; malloc {active_allocator()}")

    tokenizer = load_tokenizer(os.path.join(tcfg.model_dir, TOKENIZER_DIR)) if world.is_chief else None
    eval_fn = make_eval_fn(model, tcfg.jit_compile)

    def validate(step: int) -> dict | None:
        if val_ds is None:
            return None
        m = evaluate(model, val_ds, tcfg.batch_size, tcfg.eval_steps, eval_fn)
        writer.scalars("validation", step, {"loss": m["loss"], "perplexity": m["perplexity"], "accuracy": m["accuracy"]})
        say(f"step {step}: val_loss {m['loss']:.4f} | val_ppl {m['perplexity']:.2f} | {m['tokens']:,} tokens")
        return m

    def sample(step: int) -> str | None:
        if not world.is_chief or not tcfg.sample_prompt:
            return None
        budget = min(tcfg.sample_tokens, cfg.model.max_sequence_length - len(tokenizer.encode(tcfg.sample_prompt)))
        if budget < 1:
            say(f"warning: --sample_prompt fills the {cfg.model.max_sequence_length}-token context; no sample")
            return None
        text = generate_text(model, tokenizer, [tcfg.sample_prompt], SamplingConfig("greedy", max_new_tokens=budget))[0]
        writer.text("train", step, "sample", tcfg.sample_prompt + text)
        return tcfg.sample_prompt + text

    def save(step: int, epoch: int, val_loss: float | None, tokens_seen: float) -> str | None:
        if not world.is_chief:
            return None
        if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.trainable_variables):
            raise TrainingError(f"non-finite weights after step {step}; not saved, the last good checkpoint is "
                                f"{ckpts.latest() or 'none'}")
        return ckpts.save(step, state_vars, {
            "epoch": epoch, "world_size": world.size, "batch_size": tcfg.batch_size,
            "grad_accum_steps": tcfg.grad_accum_steps, "tokens_seen": tokens_seen}, val_loss)

    def run_rate() -> float:
        return run_tokens / run_time if run_time else tokens_per_sec

    signalled = []
    previous = {s: signal.signal(s, lambda signum, frame: signalled.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    stream = train_ds.stream(start * tcfg.grad_accum_steps, world.rank, world.size, tcfg.batch_size, tcfg.seed,
                             tcfg.shuffle_buffer)
    step, epoch = start, 0
    end = min(tcfg.train_steps, start + tcfg.stop_after) if tcfg.stop_after else tcfg.train_steps
    metrics_log = open(os.path.join(tcfg.model_dir, "metrics.jsonl"), "a") if world.is_chief else None
    tokens_seen = float(state.get("tokens_seen", 0.0))
    last_val = state.get("val_loss")
    history = []
    # Throughput counts time spent fetching data and stepping only; validation, samples and
    # checkpoints are kept out of it.
    window_tokens, window_time, window_steps = 0.0, 0.0, 0
    tokens_per_sec = 0.0
    # The run's figure leaves out its first steps, which compile the step (seconds with XLA).
    run_tokens, run_time = 0.0, 0.0
    try:
        while step < end:
            started = time.perf_counter()
            micro = []
            for _ in range(tcfg.grad_accum_steps):
                epoch, batch = next(stream)
                micro.append(batch)
            metrics = {k: float(v) for k, v in step_fn(micro, stop_requested=bool(signalled)).items()}
            step += 1
            elapsed = time.perf_counter() - started
            window_time += elapsed
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(f"non-finite loss ({metrics['loss']}) at step {step}; "
                                    f"the last good checkpoint is {ckpts.latest() or 'none'}")
            tokens_seen += metrics["tokens"]
            window_tokens += metrics["tokens"]
            window_steps += 1
            if step - start > WARMUP_STEPS:
                run_tokens += metrics["tokens"]
                run_time += elapsed
            history.append(metrics["loss"])
            if step % tcfg.log_every == 0 or step == end:
                tokens_per_sec = window_tokens / max(window_time, 1e-9)
                step_ms = 1000 * window_time / window_steps
                achieved = tokens_per_sec * fpt
                scalars = {"loss": metrics["loss"], "perplexity": perplexity(metrics["loss"]),
                           "accuracy": metrics["accuracy"], "learning_rate": current_lr(optimizer),
                           "grad_norm": metrics["grad_norm"], "tokens_seen": tokens_seen}
                perf = {"tokens_per_sec": tokens_per_sec, "step_time_ms": step_ms, "model_flops_per_sec": achieved}
                if peak:
                    perf["mfu"] = achieved / (peak * world.size)
                writer.scalars("train", step, {**scalars, **{f"perf/{k}": v for k, v in perf.items()}})
                if metrics_log:
                    metrics_log.write(json.dumps({"step": step, **scalars, **perf}) + "\n")
                    metrics_log.flush()
                mfu = f" | MFU {perf['mfu']:.1%}" if peak else f" | {achieved / 1e9:.1f} GFLOP/s"
                say(f"step {step}/{tcfg.train_steps} | loss {metrics['loss']:.4f} | lr {scalars['learning_rate']:.2e} | "
                    f"gnorm {metrics['grad_norm']:.3f} | {tokens_per_sec:,.0f} tok/s | {step_ms:.1f} ms/step{mfu}")
                window_tokens, window_time, window_steps = 0.0, 0.0, 0
            if metrics["stop"] > 0:  # after logging: the step ran, so its metrics are kept
                path = save(step, epoch, None, tokens_seen)
                raise StopRequested(step, path)
            val = None
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.train_steps:
                val = validate(step)
                last_val = val["loss"] if val else last_val
            if tcfg.sample_every and step % tcfg.sample_every == 0 and step < tcfg.train_steps:
                sample(step)
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < tcfg.train_steps:
                save(step, epoch, val["loss"] if val else None, tokens_seen)
        if step < tcfg.train_steps:  # --stop_after: save and leave the rest to the next run
            path = save(step, epoch, None, tokens_seen)
            say(f"stopped after {step - start} steps at step {step} (--stop_after); rerun to continue; "
                f"checkpoint: {path}")
            return {"step": step, "val_loss": last_val, "tokens_per_sec": run_rate(), "losses": history,
                    "checkpoint": path}
        final_val = validate(step)
        last_val = final_val["loss"] if final_val else last_val
        path = save(step, epoch, last_val, tokens_seen) if step > start or not ckpts.latest() else ckpts.latest()
        text = sample(step)
        writer.flush()
        if text is not None:
            say(f"sample at step {step}:\n{text}")
        say(f"checkpoint: {path}\nTensorBoard: {os.path.join(tcfg.model_dir, 'tb')}")
        return {"step": step, "val_loss": last_val, "tokens_per_sec": run_rate(), "losses": history,
                "checkpoint": path}
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        writer.close()
        if metrics_log:
            metrics_log.close()
