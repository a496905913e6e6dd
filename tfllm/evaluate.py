"""Loss and perplexity over a prepared split, exactly token-weighted across ranks.

Each rank reads a disjoint part of the split in a fixed order (no shuffle, no dropped
remainder), sums loss, correct predictions and target tokens locally, and one allreduce of
those three sums gives the same numbers at any world size.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfllm import distributed
from tfllm.data.pipeline import DataError, WindowDataset
from tfllm.models import lm_loss_sums, perplexity


def make_eval_fn(model, jit_compile: bool = False):
    return tf.function(lambda windows: tf.stack(lm_loss_sums(model, windows, training=False)),
                       jit_compile=jit_compile, reduce_retracing=True)


def evaluate(model, dataset: WindowDataset, batch_size: int, max_batches: int = 0, eval_fn=None) -> dict:
    """{'loss', 'perplexity', 'accuracy', 'tokens'} over the split (or its first batches per rank)."""
    world = distributed.world()
    eval_fn = eval_fn or make_eval_fn(model)
    ds = dataset.epoch(0, world.rank, world.size, batch_size, shuffle=False, drop_remainder=False)
    if max_batches:
        ds = ds.take(max_batches)
    sums = np.zeros(3, np.float64)
    try:
        for batch in ds:
            sums += eval_fn(batch).numpy().astype(np.float64)
    except tf.errors.DataLossError as e:
        raise DataError(f"{dataset.data_dir}: corrupt record in split {dataset.split!r} "
                        f"({e.message.splitlines()[0]}); run with --verify_data to name the shard") from None
    loss_sum, correct, tokens = distributed.allreduce_sum(sums)
    if tokens == 0:
        raise DataError(f"{dataset.data_dir}: split {dataset.split!r} has no target tokens to evaluate")
    loss = loss_sum / tokens
    return {"loss": float(loss), "perplexity": perplexity(loss),
            "accuracy": float(correct / tokens), "tokens": int(tokens)}
