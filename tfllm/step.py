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
from tfllm.segments import Chain, plan_buckets

STAT_LOSS, STAT_CORRECT, STAT_TOKENS = range(3)


class TrainStep:
    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, batch_size: int, seq_len: int,
                 grad_accum_steps: int = 1, clip_norm: float = 0.0, jit_compile: bool = False,
                 fp16_allreduce: bool = False, loss_fn=lm_loss_sums, variables=None, parallel_slices: int = 1,
                 allreduce_buckets: int = 1, chain: Chain | None = None, extra_stats: tuple[str, ...] = ()):
        if parallel_slices < 1 or batch_size % parallel_slices:
            raise ValueError(f"batch size {batch_size} does not split into {parallel_slices} parallel slices")
        if allreduce_buckets > 1 and chain is None:
            raise ValueError("allreduce buckets > 1 need the model's chain of segments")
        self.model = model
        self.parallel_slices = int(parallel_slices)
        # None: all trainable variables; a subset trains only those (e.g. a head over a frozen backbone).
        self._variables = None if variables is None else list(variables)
        self.optimizer = optimizer
        self.grad_accum_steps = int(grad_accum_steps)
        self.clip_norm = float(clip_norm)
        self.fp16_allreduce = fp16_allreduce
        # loss_fn returns (loss_sum, correct, tokens, *extra sums); the extra sums are averaged per
        # token like the loss and reported under these names (distillation's parts of its objective).
        self.loss_fn = loss_fn
        self.extra_stats = tuple(extra_stats)
        # Every micro-batch's gradient is divided by this constant; the exact global token
        # count corrects for it after the allreduce.
        self.tokens_per_micro_batch = float(batch_size * seq_len)
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.allreduce_calls = tf.Variable(0, dtype=tf.int64, trainable=False, name="allreduce_calls")
        self._grad_fn = tf.function(self._micro_batch_grads, jit_compile=jit_compile, reduce_retracing=True)
        self._apply_fn = tf.function(self._apply, jit_compile=jit_compile, reduce_retracing=True)
        self._step_fn = tf.function(self._step, jit_compile=False, reduce_retracing=True)
        self.chain = chain
        self._segments, self._groups = [], [list(range(len(self.variables)))]
        if allreduce_buckets > 1:
            plan = plan_buckets(chain, self.variables, allreduce_buckets)
            self._segments = [_Segment(self, b.units, top=(n == 0), jit_compile=jit_compile) for n, b in enumerate(plan)]
            # Variables outside `variables` (a frozen backbone) leave buckets empty: those send nothing.
            self._groups = [b.variable_indices for b in plan if b.variable_indices]
        self.allreduce_buckets = len(self._groups)

    @property
    def variables(self):
        return list(self.model.trainable_variables) if self._variables is None else self._variables

    def build(self) -> None:
        """Creates the optimizer's variables so they can be broadcast and checkpointed."""
        if not self.optimizer.built:
            self.optimizer.build(self.variables)

    def _micro_batch_grads(self, windows):
        with tf.GradientTape() as tape:
            sums = self.loss_fn(self.model, windows, training=True)
            objective = self.objective(sums[STAT_LOSS])
        return self._dense(tape.gradient(objective, self.variables)), tf.stack(sums)

    def objective(self, loss_sum):
        objective = loss_sum / self.tokens_per_micro_batch
        return self.optimizer.scale_loss(objective) if self.loss_scaled else objective

    def _dense(self, grads):
        return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, self.variables)]

    def _chain_grads(self, windows):
        """Like `_grad_fn`, through the segments: one backward call per bucket, top first.

        Runs in the (non-XLA) step graph, so each bucket's gradients are separate tensors that
        the executor hands to their allreduce while the segments below are differentiated.
        """
        hidden = None
        with tf.GradientTape() as tape:
            for segment in reversed(self._segments):
                hidden = segment.forward(hidden, windows)
            objective, stats = hidden
        return self._dense(tape.gradient(objective, self.variables)), stats

    def _slice_grads(self, micro_batch, grad_fn=None):
        """The micro-batch's summed gradients and stats, from independent (hence concurrent) slices."""
        grad_fn = grad_fn or self._grad_fn
        if self.parallel_slices == 1:
            return grad_fn(micro_batch)
        parts = [grad_fn(s) for s in tf.split(micro_batch, self.parallel_slices)]
        grads = [tf.add_n(list(g)) for g in zip(*(p[0] for p in parts))]
        return grads, tf.add_n([p[1] for p in parts])

    def _accumulate(self, micro_batches, count):
        """Summed gradients and stats of micro_batches[:count] (count >= 1)."""
        grads, stats = self._slice_grads(micro_batches[0])
        for k in tf.range(1, count):
            more_grads, more_stats = self._slice_grads(micro_batches[k])
            grads = [a + b for a, b in zip(grads, more_grads)]
            stats = stats + more_stats
        return grads, stats

    def _apply(self, grads, mean_stats, world_size):
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
            # The world size comes in as a tensor: read in Python it would be frozen at trace time,
            # and elastic mode changes it.
            "tokens": mean_stats[STAT_TOKENS] * self.tokens_per_micro_batch * world_size,
            "grad_norm": norm / scale,
            "stop": mean_stats[-1],  # the stop request rides last
            **{name: mean_stats[STAT_TOKENS + 1 + i] / mean_tokens for i, name in enumerate(self.extra_stats)},
        }

    def _step(self, micro_batches, stop_requested, world_size):
        if not self._segments:
            grads, stats = self._accumulate(micro_batches, self.grad_accum_steps)
        else:
            # Earlier micro-batches take the one-piece path; the last one's backward, in segments,
            # issues each bucket's allreduce (earlier micro-batches' sums included) as it finishes.
            last = self.grad_accum_steps - 1
            grads, stats = self._slice_grads(micro_batches[last], self._chain_grads)
            if last > 0:
                earlier, earlier_stats = self._accumulate(micro_batches, last)
                grads = [a + b for a, b in zip(earlier, grads)]
                stats = stats + earlier_stats
        # Bookkeeping rides in the first group (no collective of its own); divided by E it stays
        # near 1, where even the float16 wire format keeps it to ~1e-3.
        bookkeeping = tf.concat([stats / self.tokens_per_micro_batch, tf.reshape(stop_requested, [1])], 0)

        reduced = [None] * len(grads)
        for n, group in enumerate(self._groups):
            sent = [grads[i] for i in group] + ([bookkeeping] if n == 0 else [])
            received = distributed.grouped_allreduce_mean(sent, compress_fp16=self.fp16_allreduce)
            if n == 0:
                mean_stats = received.pop()
            for i, r in zip(group, received):
                reduced[i] = r
        self.allreduce_calls.assign_add(len(self._groups))
        return self._apply_fn(reduced, mean_stats, world_size)

    def __call__(self, micro_batches, stop_requested: bool = False) -> dict:
        """micro_batches: [K, batch, seq_len + 1] int32 (or a list of K batches)."""
        if isinstance(micro_batches, (list, tuple)):
            micro_batches = tf.stack(micro_batches)
        return self._step_fn(micro_batches, tf.constant(1.0 if stop_requested else 0.0, tf.float32),
                             tf.constant(float(distributed.world().size), tf.float32))

    def retrace(self, grad_accum_steps: int | None = None) -> None:
        """Traces the step again at its next call, for a world that changed (elastic mode).

        Whether the step holds collectives at all is decided in Python at trace time (one
        process traces none). The compiled forward/backward and update are kept.
        """
        if grad_accum_steps is not None:
            self.grad_accum_steps = int(grad_accum_steps)
        self._step_fn = tf.function(self._step, jit_compile=False, reduce_retracing=True)


class _Segment:
    """One bucket's units as one (optionally XLA-compiled) function; the top one ends in the objective."""

    def __init__(self, step: TrainStep, units, top: bool, jit_compile: bool):
        self.step, self.units, self.top = step, list(units), top
        self.forward = tf.function(self._forward, jit_compile=jit_compile, reduce_retracing=True)

    def _forward(self, hidden, windows):
        for unit in self.units:
            hidden = unit.call(hidden, windows, True)
        if not self.top:
            return hidden
        sums = self.step.chain.sums(hidden, windows)
        return self.step.objective(sums[STAT_LOSS]), tf.stack(sums)


def sync_state(model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None, root: int = 0) -> None:
    """Makes every rank's model and optimizer state equal to root's (after build or restore)."""
    variables = list(model.variables)
    if optimizer is not None:
        variables += list(optimizer.variables)
    distributed.broadcast_variables(variables, root=root)
