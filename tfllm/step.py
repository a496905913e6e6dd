"""The distributed optimizer step for Keras 3 models under Horovod.

One call of `TrainStep` is one optimizer step over K micro-batches:

    for each micro-batch (tf.range loop):    XLA-compiled forward/backward (optional), over P
                                             slices of the micro-batch run concurrently
        accumulate grad(loss_sum / E), loss_sum, correct, tokens      E = tokens per micro-batch
    ONE grouped allreduce (outside XLA):     gradients (+ fp16 wire format) and float64 stats
    exact token weighting:                   g = mean_r(g_r) * E / mean_r(tokens_r)
    global-norm clip on the averaged gradient, then optimizer.apply (optionally XLA-compiled)

Gradients of *sums* divided by the *global* token count make N ranks with batch b identical
to one rank with batch N*b (and K micro-batches identical to one batch of K*b), even when
padding makes token counts differ. For the same reason P slices of a micro-batch, each a
separate computation, sum to the micro-batch's gradient: on a multi-core CPU they run side by
side on the executor's threads, which XLA's small matrix multiplies alone leave half idle.

Under float16 loss scaling every rank holds the same scale (broadcast at start, then identical
updates from identical averaged gradients), so the scaled gradients averaged together are
always scaled alike; clipping the scaled gradient at clip_norm * scale equals clipping the
unscaled one at clip_norm.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfllm import distributed
from tfllm.models import lm_loss_sums

STAT_LOSS, STAT_CORRECT, STAT_TOKENS, STAT_STOP = range(4)


class TrainStep:
    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, batch_size: int, seq_len: int,
                 grad_accum_steps: int = 1, clip_norm: float = 0.0, jit_compile: bool = False,
                 fp16_allreduce: bool = False, loss_fn=lm_loss_sums, variables=None, parallel_slices: int = 1):
        if parallel_slices < 1 or batch_size % parallel_slices:
            raise ValueError(f"batch size {batch_size} does not split into {parallel_slices} parallel slices")
        self.model = model
        self.parallel_slices = int(parallel_slices)
        # None: all trainable variables; a subset trains only those (e.g. a head over a frozen backbone).
        self._variables = None if variables is None else list(variables)
        self.optimizer = optimizer
        self.grad_accum_steps = int(grad_accum_steps)
        self.clip_norm = float(clip_norm)
        self.fp16_allreduce = fp16_allreduce
        self.loss_fn = loss_fn
        # Every micro-batch's gradient is divided by this constant; the exact global token
        # count corrects for it after the allreduce.
        self.tokens_per_micro_batch = float(batch_size * seq_len)
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.allreduce_calls = tf.Variable(0, dtype=tf.int64, trainable=False, name="allreduce_calls")
        self._grad_fn = tf.function(self._micro_batch_grads, jit_compile=jit_compile, reduce_retracing=True)
        self._apply_fn = tf.function(self._apply, jit_compile=jit_compile, reduce_retracing=True)
        self._step_fn = tf.function(self._step, jit_compile=False, reduce_retracing=True)

    @property
    def variables(self):
        return list(self.model.trainable_variables) if self._variables is None else self._variables

    def build(self) -> None:
        """Creates the optimizer's variables so they can be broadcast and checkpointed."""
        if not self.optimizer.built:
            self.optimizer.build(self.variables)

    def _micro_batch_grads(self, windows):
        with tf.GradientTape() as tape:
            loss_sum, correct, tokens = self.loss_fn(self.model, windows, training=True)
            objective = loss_sum / self.tokens_per_micro_batch
            if self.loss_scaled:
                objective = self.optimizer.scale_loss(objective)
        grads = tape.gradient(objective, self.variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, self.variables)]
        return grads, tf.stack([loss_sum, correct, tokens])

    def _slice_grads(self, micro_batch):
        """The micro-batch's summed gradients and stats, from independent (hence concurrent) slices."""
        if self.parallel_slices == 1:
            return self._grad_fn(micro_batch)
        parts = [self._grad_fn(s) for s in tf.split(micro_batch, self.parallel_slices)]
        grads = [tf.add_n(list(g)) for g in zip(*(p[0] for p in parts))]
        return grads, tf.add_n([p[1] for p in parts])

    def _apply(self, grads, mean_stats):
        # Everything after the allreduce runs here, inside the compiled function: on CPU the
        # ~150 small per-variable ops of scaling and clipping cost milliseconds per step when
        # the TF executor dispatches them one by one.
        # mean_r(tokens_r) / E; the exact gradient is mean_r(g_r) * E / mean_r(tokens_r).
        mean_tokens = tf.maximum(mean_stats[STAT_TOKENS], 1.0 / self.tokens_per_micro_batch)
        grads = [g / tf.cast(mean_tokens, g.dtype) for g in grads]
        scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if self.loss_scaled else tf.constant(1.0)
        norm = tf.linalg.global_norm(grads)
        if self.clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm * scale, use_norm=norm)
        self.optimizer.apply(grads, self.variables)
        return {
            "loss": mean_stats[STAT_LOSS] / mean_tokens,
            "accuracy": mean_stats[STAT_CORRECT] / mean_tokens,
            "tokens": mean_stats[STAT_TOKENS] * self.tokens_per_micro_batch * distributed.world().size,
            "grad_norm": norm / scale,
            "stop": mean_stats[STAT_STOP],
        }

    def _step(self, micro_batches, stop_requested):
        grads, stats = self._slice_grads(micro_batches[0])
        for k in tf.range(1, self.grad_accum_steps):
            more_grads, more_stats = self._slice_grads(micro_batches[k])
            grads = [a + b for a, b in zip(grads, more_grads)]
            stats = stats + more_stats
        # Bookkeeping rides in the gradients' group (one collective per step); divided by E it
        # stays near 1, where even the float16 wire format keeps it to ~1e-3.
        bookkeeping = tf.concat([stats / self.tokens_per_micro_batch, tf.reshape(stop_requested, [1])], 0)

        reduced = distributed.grouped_allreduce_mean(grads + [bookkeeping], compress_fp16=self.fp16_allreduce)
        self.allreduce_calls.assign_add(1)
        return self._apply_fn(reduced[:-1], reduced[-1])

    def __call__(self, micro_batches, stop_requested: bool = False) -> dict:
        """micro_batches: [K, batch, seq_len + 1] int32 (or a list of K batches)."""
        if isinstance(micro_batches, (list, tuple)):
            micro_batches = tf.stack(micro_batches)
        return self._step_fn(micro_batches, tf.constant(1.0 if stop_requested else 0.0, tf.float32))


def sync_state(model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None, root: int = 0) -> None:
    """Makes every rank's model and optimizer state equal to root's (after build or restore)."""
    variables = list(model.variables)
    if optimizer is not None:
        variables += list(optimizer.variables)
    distributed.broadcast_variables(variables, root=root)
