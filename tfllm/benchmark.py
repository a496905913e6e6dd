"""Step-time benchmarks on synthetic windows: tfllm's step, plain keras `fit`, the allreduce.

All timings skip warm-up steps (tracing, XLA compilation) and report the median and spread of
the measured steps. Synthetic data keeps the input pipeline out of the figures.

- `time_tfllm_step`: tfllm's distributed step as pretraining configures it (every rank runs it).
- `time_keras_fit`: `model.fit` of the same keras-hub model, same optimizer, same batches
  (single process; Horovod's Keras callbacks do not work with Keras 3). The ratio of the two
  medians is tfllm's overhead.
- `time_allreduces`: one grouped allreduce of tensors shaped like the model's gradients, inside a
  tf.function like the step's; its median over the step's median is the allreduce share. The
  same with one 4-byte tensor, timed alternately with it, measures the ring's latency (the cost
  model's alpha).
- `measure_step`: all of the above for one configuration, as the flat record that
  `pipelines/benchmark.py` prints, writes as JSON and logs to TensorBoard.
- `measure_buckets`, `measure_overhead`, `generation_report`: the other modes' records; the
  `*_table` and `*_report` functions give the pipeline their tables.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import keras
import numpy as np
import tensorflow as tf

from tfllm import distributed
from tfllm.config import ModelConfig
from tfllm.models import build_causal_lm, count_params, flops_per_token, lm_chain, split_window
from tfllm.step import TrainStep, sync_state
from tfllm.summary import device_peak_flops

# Every key of `measure_step`'s record (the tests check the JSON against this list).
STEP_FIELDS = ("mode", "world_size", "device", "model", "params", "flops_per_token", "grad_bytes",
               "batch_per_rank", "seq_len", "parallel_slices", "grad_accum_steps", "clip_norm", "precision",
               "jit_compile", "fp16_allreduce", "warmup_steps", "measured_steps",
               "step_ms_median", "step_ms_p10", "step_ms_p90", "tokens_per_sec_per_rank", "tokens_per_sec_global",
               "model_flops_per_sec_per_rank", "model_flops_per_sec_global", "peak_flops_per_device", "mfu",
               "peak_memory_bytes", "allreduce_ms", "allreduce_share", "latency_allreduce_ms")


@dataclasses.dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    steps: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        arr = np.asarray(seconds)
        return cls(float(np.median(arr)), float(np.percentile(arr, 10)), float(np.percentile(arr, 90)), len(arr))


def synthetic_windows(n: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=(n, batch, seq_len + 1), dtype=np.int64).astype(np.int32)


def _optimizer(lr: float = 1e-3, global_clipnorm: float | None = None):
    return keras.optimizers.AdamW(learning_rate=lr, weight_decay=0.1, beta_2=0.99, global_clipnorm=global_clipnorm)


def build(cfg: ModelConfig, precision: str = "float32"):
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    return build_causal_lm(cfg)


def time_tfllm_step(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, jit_compile: bool,
                    precision: str = "float32", fp16_allreduce: bool = False, clip_norm: float = 0.0,
                    parallel_slices: int = 1, grad_accum_steps: int = 1) -> tuple[Timing, dict]:
    """Times pretraining's optimizer step as configured: K micro-batches of `batch`, P slices each."""
    model, step = _build_step(cfg, batch, seq_len, jit_compile, precision, fp16_allreduce, clip_norm,
                              parallel_slices, grad_accum_steps)
    data = _step_data(cfg, warmup + steps, grad_accum_steps, batch, seq_len)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        metrics = step(data[i])
        float(metrics["loss"])  # wait for the step to finish
        if i >= warmup:
            times.append(time.perf_counter() - t)
    params = count_params(model)
    wire_bytes = 2 if fp16_allreduce else 4
    info = {"params": params, "flops_per_token": flops_per_token(cfg, seq_len, params),
            "grad_bytes": int(sum(int(np.prod(v.shape)) * wire_bytes for v in model.trainable_variables)),
            "grad_shapes": [tuple(v.shape) for v in model.trainable_variables]}
    return Timing.of(times), info


def _build_step(cfg: ModelConfig, batch: int, seq_len: int, jit_compile: bool, precision: str, fp16_allreduce: bool,
                clip_norm: float, parallel_slices: int, grad_accum_steps: int, allreduce_buckets: int = 1):
    model = build(cfg, precision)
    optimizer = _optimizer()
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    step = TrainStep(model, optimizer, batch, seq_len, grad_accum_steps, clip_norm, jit_compile, fp16_allreduce,
                     parallel_slices=parallel_slices, allreduce_buckets=allreduce_buckets, chain=lm_chain(model))
    step.build()
    sync_state(model, optimizer)
    return model, step


def _step_data(cfg: ModelConfig, steps: int, grad_accum_steps: int, batch: int, seq_len: int) -> tf.Tensor:
    return tf.constant(synthetic_windows(steps * grad_accum_steps, batch, seq_len, cfg.vocab_size,
                                         distributed.world().rank).reshape(steps, grad_accum_steps, batch, -1))


def measure_buckets(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, jit_compile: bool,
                    buckets=(1, 2, 4, 8), precision: str = "float32", fp16_allreduce: bool = False,
                    clip_norm: float = 0.0, parallel_slices: int = 1, grad_accum_steps: int = 1) -> dict:
    """Step time for each allreduce bucket count, and how much of the allreduce each one hides.

    Every round times, in turns (so that all see the same machine): for each B the step, and
    the same step traced without collectives (its computation alone, on every rank at once),
    then the gradients' allreduce alone. The exposed communication of B buckets is
    step(B) - compute(B), and the hidden share is (allreduce - exposed) / allreduce; the
    segments' own cost shows in compute(B) / compute(1). On one rank there is no allreduce.
    """
    if 1 not in buckets:
        raise ValueError("the bucket counts must include 1, the step without overlap")
    world = distributed.world()
    shape = (batch, seq_len, jit_compile, precision, fp16_allreduce, clip_norm, parallel_slices, grad_accum_steps)
    data = _step_data(cfg, warmup + steps, grad_accum_steps, batch, seq_len)
    timed = {}
    for b in buckets:
        timed[("step", b)] = _build_step(cfg, *shape, allreduce_buckets=b)[1]
        if world.size > 1:
            with distributed.local_only():  # traced here, so its graph has no collectives
                local = _build_step(cfg, *shape, allreduce_buckets=b)[1]
                local(data[0])
            timed[("compute", b)] = local
    model = timed[("step", 1)].model
    grads = [tf.random.normal(tuple(v.shape)) for v in model.trainable_variables]
    reduce_grads = tf.function(lambda ts: distributed.grouped_allreduce_mean(ts, compress_fp16=fp16_allreduce))
    times = {key: [] for key in [*timed, "allreduce"]}
    for i in range(warmup + steps):
        for key, step in timed.items():
            distributed.barrier()
            t = time.perf_counter()
            float(step(data[i])["loss"])
            if i >= warmup:
                times[key].append(time.perf_counter() - t)
        if world.size > 1:
            distributed.barrier()
            t = time.perf_counter()
            float(tf.reduce_sum(reduce_grads(grads)[0]))
            if i >= warmup:
                times["allreduce"].append(time.perf_counter() - t)
    median = {key: float(np.median(ts)) if ts else 0.0 for key, ts in times.items()}
    ar = median["allreduce"]
    runs = []
    for b in buckets:
        step_s, compute_s = median[("step", b)], median.get(("compute", b), median[("step", b)])
        runs.append({"allreduce_buckets": b, "collectives": timed[("step", b)].allreduce_buckets,
                     "step_ms": 1000 * step_s, "compute_ms": 1000 * compute_s,
                     "exposed_allreduce_ms": 1000 * (step_s - compute_s),
                     "hidden_share": (ar - (step_s - compute_s)) / ar if ar else None,
                     "step_over_unbucketed": step_s / median[("step", 1)]})
    return {"mode": "buckets", "world_size": world.size, "model": dataclasses.asdict(cfg),
            "params": count_params(model), "batch_per_rank": batch, "seq_len": seq_len,
            "grad_accum_steps": grad_accum_steps, "parallel_slices": parallel_slices, "jit_compile": jit_compile,
            "precision": precision, "fp16_allreduce": fp16_allreduce, "measured_steps": steps,
            "allreduce_ms": 1000 * ar, "runs": runs}


class _StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # logs hold tensors; converting waits for the step
        self.times.append(time.perf_counter() - self._t)


def time_keras_fit(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, jit_compile: bool,
                   precision: str = "float32", clip_norm: float = 0.0) -> Timing:
    """`model.fit` steps of `batch` windows; clipping, when asked, by keras's own global_clipnorm."""
    model = build(cfg, precision)
    model.compile(optimizer=_optimizer(global_clipnorm=clip_norm or None),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile)
    windows = synthetic_windows(warmup + steps, batch, seq_len, cfg.vocab_size).reshape(-1, seq_len + 1)
    ds = tf.data.Dataset.from_tensor_slices(windows).batch(batch).map(
        lambda w: (split_window(w)[0], w[:, 1:])).prefetch(2)
    timer = _StepTimer()
    model.fit(ds, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[timer])
    return Timing.of(timer.times[warmup:])


def time_allreduces(grad_shapes: list[tuple[int, ...]], steps: int, warmup: int,
                    fp16: bool = False) -> tuple[Timing, Timing]:
    """(gradient allreduce, 4-byte allreduce) timings, taken alternately.

    Alternating pairs let both see the same machine: on a busy CPU host the fixed cost of a
    collective swings by milliseconds over seconds, and timing the two in separate loops could
    give the 4-byte one the slower stretch, leaving no transfer time to fit a bandwidth to.
    """
    grads = [tf.random.normal(s) for s in grad_shapes]
    small = [tf.random.normal((1,))]
    reduce_grads = tf.function(lambda ts: distributed.grouped_allreduce_mean(ts, compress_fp16=fp16))
    reduce_small = tf.function(lambda ts: distributed.grouped_allreduce_mean(ts))
    times = {"grads": [], "small": []}
    for i in range(warmup + steps):
        for name, fn, tensors in (("small", reduce_small, small), ("grads", reduce_grads, grads)):
            distributed.barrier()  # start together so that waiting for a slow rank is not counted
            t = time.perf_counter()
            out = fn(tensors)
            float(tf.reduce_sum(out[0]))
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return Timing.of(times["grads"]), Timing.of(times["small"])


def measure_step(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, jit_compile: bool,
                 precision: str = "float32", fp16_allreduce: bool = False, mode: str = "step",
                 clip_norm: float = 0.0, parallel_slices: int = 1, grad_accum_steps: int = 1) -> dict:
    """Step time, throughput, model FLOP/s and MFU, memory and the allreduce share at this world size.

    Every rank must call it (the step and the allreduce timings are collective). The allreduce
    is timed separately from the step, with the gradients' shapes and wire dtype, after a barrier.
    """
    world = distributed.world()
    step, info = time_tfllm_step(cfg, batch, seq_len, steps, warmup, jit_compile, precision=precision,
                                 fp16_allreduce=fp16_allreduce, clip_norm=clip_norm, parallel_slices=parallel_slices,
                                 grad_accum_steps=grad_accum_steps)
    if world.size > 1:
        grads_timing, small_timing = time_allreduces(info["grad_shapes"], steps, warmup, fp16_allreduce)
        ar, latency = grads_timing.median_s, small_timing.median_s
    else:
        ar = latency = 0.0  # a single process skips the allreduce
    tokens = grad_accum_steps * batch * seq_len
    per_rank = tokens / step.median_s
    device, peak = device_peak_flops()
    flops_rank = per_rank * info["flops_per_token"]
    record = {
        "mode": mode, "world_size": world.size, "device": device, "model": dataclasses.asdict(cfg),
        "params": info["params"], "flops_per_token": info["flops_per_token"], "grad_bytes": info["grad_bytes"],
        "batch_per_rank": batch, "seq_len": seq_len, "parallel_slices": parallel_slices,
        "grad_accum_steps": grad_accum_steps, "clip_norm": clip_norm, "precision": precision, "jit_compile": jit_compile,
        "fp16_allreduce": fp16_allreduce, "warmup_steps": warmup, "measured_steps": step.steps,
        "step_ms_median": 1000 * step.median_s, "step_ms_p10": 1000 * step.p10_s, "step_ms_p90": 1000 * step.p90_s,
        "tokens_per_sec_per_rank": per_rank, "tokens_per_sec_global": world.size * per_rank,
        "model_flops_per_sec_per_rank": flops_rank, "model_flops_per_sec_global": world.size * flops_rank,
        "peak_flops_per_device": peak, "mfu": flops_rank / peak if peak else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "allreduce_ms": 1000 * ar, "allreduce_share": ar / step.median_s, "latency_allreduce_ms": 1000 * latency,
    }
    assert tuple(record) == STEP_FIELDS
    return record


def scaling_efficiency(record: dict, baseline: dict) -> float:
    """Weak-scaling efficiency: global tokens/s at N ranks over N x tokens/s of one rank."""
    if baseline["world_size"] != 1:
        raise ValueError(f"the baseline must be a 1-rank run, got world_size={baseline['world_size']}")
    return record["tokens_per_sec_global"] / (record["world_size"] * baseline["tokens_per_sec_global"])


def time_generation(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
    """Seconds to generate `new_tokens` greedily: keras-hub's key/value-cached loop versus
    recomputing the whole sequence for every new token (what generation costs without a cache)."""
    from tfllm.generate import SamplingConfig, generate_ids

    total = prompt_len + new_tokens
    model = build(dataclasses.replace(cfg, max_sequence_length=max(cfg.max_sequence_length, total)))
    prompts = synthetic_windows(1, batch, prompt_len - 1, cfg.vocab_size)[0].tolist()
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_at_eod=False)

    @tf.function(jit_compile=True)
    def next_token(ids, length):  # full forward pass over the padded sequence, pick position length-1
        logits = model({"token_ids": ids, "padding_mask": tf.ones_like(ids, tf.bool)})
        return tf.argmax(logits[:, length - 1], axis=-1, output_type=tf.int32)

    def uncached():
        ids = np.zeros((batch, total), np.int32)
        ids[:, :prompt_len] = prompts
        ids = tf.constant(ids)
        for pos in range(prompt_len, total):
            tok = next_token(ids, tf.constant(pos))
            ids = tf.tensor_scatter_nd_update(ids, tf.stack([tf.range(batch), tf.fill([batch], pos)], 1), tok)
        return ids.numpy()

    def cached():
        return generate_ids(model, prompts, sampling)

    out = {}
    for name, fn in (("cached", cached), ("uncached", uncached)):
        fn()  # trace and compile
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[f"{name}_s"] = float(np.median(times))
    out["speedup"] = out["uncached_s"] / out["cached_s"]
    return out


def peak_memory_bytes() -> int:
    """Peak device memory on GPU, else the process's peak resident set size."""
    if tf.config.list_physical_devices("GPU"):
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


TABLE_FIELDS = ("ranks", "precision", "XLA", "step ms (p10-p90)", "tokens/s global", "model TFLOP/s/rank", "MFU",
                "allreduce share", "peak memory MiB")


def table_row(r: dict) -> list[str]:
    return [str(r["world_size"]), r["precision"], "on" if r["jit_compile"] else "off",
            f"{r['step_ms_median']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f})",
            f"{r['tokens_per_sec_global']:,.0f}", f"{r['model_flops_per_sec_per_rank'] / 1e12:.4f}",
            "n/a (CPU)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            f"{100 * r['allreduce_share']:.1f}%", f"{r['peak_memory_bytes'] / 2**20:,.0f}"]


def markdown(rows: list[list]) -> str:
    """A markdown table; the first row is the header."""
    lines = ["| " + " | ".join(str(c) for c in rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]])


def buckets_table(result: dict) -> list[list]:
    """The rows of a `measure_buckets` result: one per bucket count."""
    return [["allreduce buckets", "step ms", "compute ms", "exposed allreduce ms", "hidden share",
             "step / unbucketed"]] + [
        [r["allreduce_buckets"], f"{r['step_ms']:.1f}", f"{r['compute_ms']:.1f}", f"{r['exposed_allreduce_ms']:.1f}",
         "" if r["hidden_share"] is None else f"{100 * r['hidden_share']:.1f}%", f"{r['step_over_unbucketed']:.3f}"]
        for r in result["runs"]]


def measure_overhead(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, jit_compile: bool,
                     precision: str = "float32", clip_norm: float = 0.0, parallel_slices: int = 1,
                     grad_accum_steps: int = 1) -> tuple[dict, list[list]]:
    """tfllm's step against `model.fit` of the same model (single process), and its table."""
    result = measure_step(cfg, batch, seq_len, steps, warmup, jit_compile, precision, mode="overhead",
                          clip_norm=clip_norm, parallel_slices=parallel_slices, grad_accum_steps=grad_accum_steps)
    # keras's equivalent of K accumulated micro-batches is one batch K times as large.
    fit = time_keras_fit(cfg, grad_accum_steps * batch, seq_len, steps, warmup, jit_compile, precision, clip_norm)
    result.update(keras_fit_step_ms=1000 * fit.median_s,
                  overhead_ratio=result["step_ms_median"] / (1000 * fit.median_s))
    return result, [["", "median ms", "p10 ms", "p90 ms"],
                    ["tfllm step", *(f"{result[k]:.2f}" for k in ("step_ms_median", "step_ms_p10", "step_ms_p90"))],
                    ["keras model.fit", *(f"{1000 * t:.2f}" for t in (fit.median_s, fit.p10_s, fit.p90_s))]]


def generation_report(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> tuple[dict, list[list]]:
    """`time_generation` as a result record and its table."""
    r = time_generation(cfg, batch, prompt_len, new_tokens)
    return {"mode": "generate", "model": dataclasses.asdict(cfg), **r}, [
        [f"generate {new_tokens} tokens, batch {batch}", "seconds"],
        ["key/value cache (keras-hub)", f"{r['cached_s']:.3f}"],
        ["full forward pass per token", f"{r['uncached_s']:.3f}"], ["speedup", f"{r['speedup']:.2f}"]]
