"""tf.data input for training and evaluation: per-rank, deterministic, exactly resumable.

An epoch is a pure function of (seed, epoch, world size, batch size): the shard order is a
seeded permutation, each rank reads a disjoint part, the shuffle buffer is seeded, and every
rank runs the same number of steps (the smallest rank's full batches). Resuming at global
step s therefore means: find the epoch s falls in and skip the batches already taken in it.

Sharding: file level (rank r reads shards r, r+size, ... of the epoch's shard order) when the
shard count is a multiple of the world size, so ranks stay balanced; element level (every
rank reads all shards and keeps every size-th window) otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow as tf

from tfllm.data.corpus import CorpusError
from tfllm.data.prepare import read_manifest


SHUFFLE_BUFFER_BYTES = 256 << 20


class DataError(RuntimeError):
    """Corrupt, truncated or mismatched prepared data; the message names the file."""


def untuned(ds: tf.data.Dataset) -> tf.data.Dataset:
    """The dataset with tf.data's autotuning off.

    The autotuning thread sleeps up to a minute between rounds, and destroying an iterator waits
    for it to wake: every epoch boundary stalled training for up to 60 s (measured: 27-58 s after
    1307 steps of tiny Shakespeare). Decoding windows needs no tuning; prefetch keeps its own
    buffer sizing.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    files: tuple[str, ...]
    element_level: bool
    steps: int


class WindowDataset:
    """The prepared windows of one split, as seen by one rank."""

    def __init__(self, data_dir: str, split: str = "train", verify: bool = False):
        self.data_dir = data_dir
        try:
            self.manifest = read_manifest(data_dir)
        except CorpusError as e:
            raise DataError(str(e)) from None
        if split not in self.manifest["splits"]:
            raise DataError(f"{data_dir}: no split {split!r} in the manifest")
        self.split = split
        self.shards = self.manifest["splits"][split]["shards"]
        if not self.shards:
            raise DataError(f"{data_dir}: split {split!r} has no windows")
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.dtype = tf.uint16 if self.manifest["dtype"] == "uint16" else tf.int32
        self.check_files(verify)

    @property
    def paths(self) -> list[str]:
        return [os.path.join(self.data_dir, s["file"]) for s in self.shards]

    @property
    def num_windows(self) -> int:
        return sum(s["windows"] for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def check_files(self, verify_hashes: bool) -> None:
        """Sizes always (catches truncation cheaply); sha256 when asked (catches any corruption)."""
        for shard, path in zip(self.shards, self.paths):
            if not os.path.exists(path):
                raise DataError(f"{path}: shard listed in the manifest is missing")
            size = os.path.getsize(path)
            if size != shard["bytes"]:
                raise DataError(f"{path}: shard is {size} bytes, the manifest says {shard['bytes']} (truncated or replaced)")
            if verify_hashes:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        h.update(block)
                if h.hexdigest() != shard["sha256"]:
                    raise DataError(f"{path}: sha256 does not match the manifest (corrupt shard)")

    def plan(self, epoch: int, rank: int, size: int, batch_size: int, seed: int) -> EpochPlan:
        order = np.random.default_rng(_seed(seed, epoch, "files")).permutation(len(self.shards))
        counts = [self.shards[i]["windows"] for i in order]
        if len(order) % size == 0:
            per_rank = [sum(counts[r::size]) for r in range(size)]
            files = tuple(self.paths[i] for i in order[rank::size])
            element_level = False
        else:
            total = sum(counts)
            per_rank = [total // size + (1 if r < total % size else 0) for r in range(size)]
            files = tuple(self.paths[i] for i in order)
            element_level = True
        return EpochPlan(files, element_level, min(per_rank) // batch_size)

    def _decode(self, record: tf.Tensor) -> tf.Tensor:
        window = tf.io.decode_raw(record, self.dtype, little_endian=True)
        return tf.reshape(tf.cast(window, tf.int32), [self.seq_len + 1])

    def epoch(self, epoch: int, rank: int = 0, size: int = 1, batch_size: int = 8, seed: int = 0,
              skip_batches: int = 0, shuffle: bool = True, shuffle_buffer: int = 0,
              drop_remainder: bool = True) -> tf.data.Dataset:
        """Batches of [batch_size, seq_len + 1] int32 windows for this rank in this epoch."""
        plan = self.plan(epoch, rank, size, batch_size, seed)
        files = tf.data.Dataset.from_tensor_slices(list(plan.files))
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(plan.files)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if plan.element_level:
            ds = ds.shard(size, rank)
        ds = ds.map(self._decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shuffle_buffer <= 0:
            # A buffer holding the rank's whole share makes the epoch a uniform permutation; the
            # windows are stored in corpus order, so a small buffer would fill each batch from
            # one stretch of text.
            windows = dict(zip(self.paths, (s["windows"] for s in self.shards)))
            mine = sum(windows[f] for f in plan.files)
            mine = -(-mine // size) if plan.element_level else mine
            shuffle_buffer = min(mine, SHUFFLE_BUFFER_BYTES // (4 * (self.seq_len + 1)))
        if shuffle and shuffle_buffer > 1:
            ds = ds.shuffle(shuffle_buffer, seed=_seed(seed, epoch, rank, "windows"), reshuffle_each_iteration=False)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if drop_remainder:
            ds = ds.take(plan.steps)
        if skip_batches:
            ds = ds.skip(skip_batches)
        return untuned(ds.prefetch(tf.data.AUTOTUNE))

    def position(self, global_step: int, size: int, batch_size: int, seed: int) -> tuple[int, int]:
        """(epoch, batches already taken in it) after `global_step` batches per rank."""
        epoch, remaining = 0, global_step
        while True:
            steps = self.plan(epoch, 0, size, batch_size, seed).steps
            if steps <= 0:
                raise DataError(f"{self.data_dir}: split {self.split!r} has {self.num_windows} windows, fewer than "
                                f"one global batch of {size} x {batch_size}; lower --batch_size or prepare more data")
            if remaining < steps:
                return epoch, remaining
            remaining -= steps
            epoch += 1

    def stream(self, start_step: int, rank: int, size: int, batch_size: int, seed: int, shuffle_buffer: int = 0):
        """Yields (epoch, batch) forever, starting exactly after `start_step` batches."""
        epoch, skip = self.position(start_step, size, batch_size, seed)
        while True:
            ds = self.epoch(epoch, rank, size, batch_size, seed, skip_batches=skip, shuffle_buffer=shuffle_buffer)
            try:
                for batch in ds:
                    yield epoch, batch
            except tf.errors.DataLossError as e:
                raise DataError(f"{self.data_dir}: corrupt record in split {self.split!r} "
                                f"({e.message.splitlines()[0]}); run with --verify_data to name the shard") from None
            epoch, skip = epoch + 1, 0
