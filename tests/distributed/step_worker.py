"""Trains a tiny GPT-2 on fixed synthetic windows with tfllm's distributed step.

Every configuration sees the same global batch of G windows per optimizer step: with S ranks
and K micro-batches, rank r takes rows [r*G/S, (r+1)*G/S) and splits them into K micro-batches.
Rank 0 writes the per-step metrics and every rank writes its final weights.
"""

import argparse
import json

import numpy as np
import keras
import tensorflow as tf

import tfllm  # noqa: F401
from tfllm import distributed
from tfllm.config import ModelConfig
from tfllm.models import build_causal_lm, lm_chain
from tfllm.step import TrainStep, sync_state

VOCAB, SEQ = 61, 16


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--precision", default="float32")
    p.add_argument("--fp16_allreduce", action="store_true")
    p.add_argument("--jit", action="store_true")
    p.add_argument("--slices", type=int, default=1)
    p.add_argument("--buckets", type=int, default=1)
    p.add_argument("--seed_by_rank", action="store_true", help="initialise each rank differently")
    p.add_argument("--pad_fraction", type=float, default=0.0, help="pad the tail of some windows")
    a = p.parse_args()

    world = distributed.init()
    keras.mixed_precision.set_global_policy(a.precision)
    keras.utils.set_random_seed(1234 + (world.rank * 1000 if a.seed_by_rank else 0))
    model = build_causal_lm(ModelConfig(num_layers=2, num_heads=2, hidden_dim=32, max_sequence_length=SEQ,
                                        vocab_size=VOCAB, dropout=0.0))
    if a.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=0.5)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.1)
    if a.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    per_rank = a.global_batch // world.size
    micro = per_rank // a.accum
    step = TrainStep(model, optimizer, batch_size=micro, seq_len=SEQ, grad_accum_steps=a.accum, clip_norm=a.clip,
                     jit_compile=a.jit, fp16_allreduce=a.fp16_allreduce, parallel_slices=a.slices,
                     allreduce_buckets=a.buckets, chain=lm_chain(model))
    step.build()
    before = [v.numpy().copy() for v in model.trainable_variables]
    sync_state(model, optimizer)
    synced = [v.numpy() for v in model.trainable_variables]

    rng = np.random.default_rng(7)
    data = rng.integers(3, VOCAB, size=(a.steps, a.global_batch, SEQ + 1)).astype(np.int32)
    if a.pad_fraction:
        for s in range(a.steps):
            for row in range(0, a.global_batch, 3):  # uneven real-token counts across ranks
                data[s, row, int(SEQ * (1 - a.pad_fraction)):] = 0
    records = []
    for s in range(a.steps):
        rows = data[s, world.rank * per_rank:(world.rank + 1) * per_rank]
        m = step(rows.reshape(a.accum, micro, SEQ + 1))
        records.append({k: float(v) for k, v in m.items()})
    np.savez(f"{a.out}.rank{world.rank}.npz",
             *[v.numpy() for v in model.trainable_variables],
             changed_by_sync=np.array(any(not np.array_equal(x, y) for x, y in zip(before, synced))))
    if world.is_chief:
        with open(f"{a.out}.json", "w") as f:
            json.dump({"records": records, "allreduce_calls": int(step.allreduce_calls.numpy()),
                       "collective_ops": collective_ops(step, (a.accum, micro, SEQ + 1)),
                       "grad_fn_signatures": step._grad_fn.pretty_printed_concrete_signatures(),
                       "world_size": world.size}, f)


def collective_ops(step, shape):
    """Horovod allreduce ops in the traced step: each runs once per optimizer step."""
    graph = step._step_fn.get_concrete_function(tf.TensorSpec(shape, tf.int32), tf.TensorSpec([], tf.float32),
                                                tf.TensorSpec([], tf.float32)).graph
    return sum(op.type.startswith("HorovodGroupedAllreduce") or op.type == "HorovodAllreduce"
               for op in graph.get_operations())


if __name__ == "__main__":
    main()
