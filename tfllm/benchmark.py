"""Step-time benchmarks on synthetic windows: tfllm's step, plain keras `fit`, the allreduce.

All timings skip warm-up steps (tracing, XLA compilation) and report the median and spread of
the measured steps. Synthetic data keeps the input pipeline out of the figures.

- `time_tfllm_step`: tfllm's distributed step (every rank runs it).
- `time_keras_fit`: `model.fit` of the same keras-hub model, same optimizer, same batches
  (single process; Horovod's Keras callbacks do not work with Keras 3). The ratio of the two
  medians is tfllm's overhead.
- `time_allreduce`: one grouped allreduce of tensors shaped like the model's gradients, inside a
  tf.function like the step's; its median over the step's median is the allreduce share.
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
from tfllm.models import build_causal_lm, count_params, flops_per_token, split_window
from tfllm.step import TrainStep, sync_state


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


def _optimizer(lr: float = 1e-3):
    return keras.optimizers.AdamW(learning_rate=lr, weight_decay=0.1, beta_2=0.99)


def build(cfg: ModelConfig, precision: str = "float32"):
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    return build_causal_lm(cfg)


def time_tfllm_step(cfg: ModelConfig, batch: int, seq_len: int, steps: int, warmup: int, jit_compile: bool,
                    precision: str = "float32", fp16_allreduce: bool = False, clip_norm: float = 0.0) -> tuple[Timing, dict]:
    model = build(cfg, precision)
    optimizer = _optimizer()
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    step = TrainStep(model, optimizer, batch, seq_len, 1, clip_norm, jit_compile, fp16_allreduce)
    step.build()
    sync_state(model, optimizer)
    data = tf.constant(synthetic_windows(warmup + steps, batch, seq_len, cfg.vocab_size, distributed.world().rank))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        metrics = step(data[i][None])
        float(metrics["loss"])  # wait for the step to finish
        if i >= warmup:
            times.append(time.perf_counter() - t)
    params = count_params(model)
    info = {"params": params, "flops_per_token": flops_per_token(cfg, seq_len, params),
            "grad_bytes": int(sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables))}
    return Timing.of(times), info


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
                   precision: str = "float32") -> Timing:
    model = build(cfg, precision)
    model.compile(optimizer=_optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    windows = synthetic_windows(warmup + steps, batch, seq_len, cfg.vocab_size).reshape(-1, seq_len + 1)
    ds = tf.data.Dataset.from_tensor_slices(windows).batch(batch).map(
        lambda w: (split_window(w)[0], w[:, 1:])).prefetch(2)
    timer = _StepTimer()
    model.fit(ds, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[timer])
    return Timing.of(timer.times[warmup:])


def time_allreduce(grad_shapes: list[tuple[int, ...]], steps: int, warmup: int, fp16: bool = False) -> Timing:
    tensors = [tf.random.normal(s) for s in grad_shapes]
    fn = tf.function(lambda ts: distributed.grouped_allreduce_mean(ts, compress_fp16=fp16))
    times = []
    for i in range(warmup + steps):
        distributed.barrier()  # start together so that waiting for a slow rank is not counted
        t = time.perf_counter()
        out = fn(tensors)
        float(tf.reduce_sum(out[0]))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return Timing.of(times)


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
