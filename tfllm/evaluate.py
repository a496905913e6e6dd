"""Loss and perplexity over a prepared split, exactly token-weighted across ranks.

Each rank reads a disjoint part of the split in a fixed order (no shuffle, no dropped
remainder), sums loss, correct predictions and target tokens locally, and one allreduce of
those three sums gives the same numbers at any world size.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfllm import distributed
from tfllm.config import DataConfig
from tfllm.data.corpus import Corpus, Parser
from tfllm.data.pipeline import DataError, WindowDataset, untuned
from tfllm.data.shards import Packer
from tfllm.models import lm_loss_sums, perplexity


class _ListWriter:
    def __init__(self, windows: list):
        self.write_many = lambda rows: windows.extend(np.array(rows, np.int32))


class TextWindows:
    """Windows of a raw text file tokenized with a model's tokenizer (not seen at preparation).

    The file is read as the model's data was (`data`: its JSONL field, Parquet and TSV columns,
    cleaning), and its documents are packed like prepared data: windows of seq_len + 1 overlapping
    by one token, the last padded, so its loss is comparable with a prepared split's.
    """

    def __init__(self, path: str, tokenizer, seq_len: int, data: DataConfig | None = None):
        collected = []
        packer = Packer(seq_len, _ListWriter(collected))
        for doc in Corpus([path], parser=Parser.from_config(data or DataConfig())):
            packer.add(np.asarray(tokenizer.encode(doc.text), np.int32))
        packer.finish()
        if not collected:
            raise DataError(f"{path}: no text to evaluate")
        self.windows, self.data_dir, self.split, self.seq_len = np.stack(collected), path, "text", seq_len

    def epoch(self, epoch, rank=0, size=1, batch_size=8, seed=0, shuffle=False, drop_remainder=False, **_):
        ds = tf.data.Dataset.from_tensor_slices(self.windows).shard(size, rank)
        return untuned(ds.batch(batch_size, drop_remainder=drop_remainder))


def make_eval_fn(model, jit_compile: bool = False):
    # Per-window sums, added up in float64 on the host: the totals then do not depend on how
    # windows were grouped into batches and ranks (float32 batch sums would, at ~1e-8).
    return tf.function(lambda windows: tf.stack(lm_loss_sums(model, windows, training=False, per_window=True), 1),
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
            sums += eval_fn(batch).numpy().astype(np.float64).sum(axis=0)
    except tf.errors.DataLossError as e:
        raise DataError(f"{dataset.data_dir}: corrupt record in split {dataset.split!r} "
                        f"({e.message.splitlines()[0]}); run with --verify_data to name the shard") from None
    loss_sum, correct, tokens = distributed.allreduce_sum(sums)
    if tokens == 0:
        raise DataError(f"{dataset.data_dir}: split {dataset.split!r} has no target tokens to evaluate")
    loss = loss_sum / tokens
    return {"loss": float(loss), "perplexity": perplexity(loss),
            "accuracy": float(correct / tokens), "tokens": int(tokens)}
