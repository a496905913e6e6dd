"""Parts -> windows -> TFRecord shards: one pass in corpus order, on rank 0.

The window order, which makes the output the same for any number of workers and ranks: the
documents of the corpus in order (files sorted as `resolve_files` lists them, lines in file
order), each followed by <eod>, form one token stream per split; windows of `seq_len + 1` start
every `stride` tokens of it, and window i goes to shard i mod num_shards. That is exactly what
a single process reading the corpus front to back produces: parts only say how it was tokenized.
A document's split is decided here, where its global index and character position are known.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow as tf

from tfllm import tokenizers


def is_val_document(index: int, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class ShardWriter:
    """Round-robin writer: shard sizes differ by at most one window."""

    def __init__(self, directory: str, split: str, num_shards: int, dtype: np.dtype):
        self.paths = [os.path.join(directory, f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord") for i in range(num_shards)]
        self.writers = [tf.io.TFRecordWriter(p) for p in self.paths]
        self.windows = np.zeros(num_shards, np.int64)
        self.tokens = np.zeros(num_shards, np.int64)
        self.dtype = dtype
        self.count = 0

    def write_many(self, windows: np.ndarray) -> None:
        rows = np.ascontiguousarray(windows, self.dtype)
        shard = (self.count + np.arange(len(rows))) % len(self.writers)
        for i, row in zip(shard.tolist(), rows):
            self.writers[i].write(row.tobytes())
        n = len(self.writers)
        self.windows += np.bincount(shard, minlength=n)
        self.tokens += np.bincount(shard, weights=np.count_nonzero(rows[:, 1:] != tokenizers.PAD_ID, axis=1),
                                   minlength=n).astype(np.int64)
        self.count += len(rows)

    def close(self) -> list[dict]:
        shards = []
        for path, writer, windows, tokens in zip(self.paths, self.writers, self.windows, self.tokens):
            writer.close()
            if windows == 0:  # a split smaller than the shard count keeps only non-empty shards
                os.remove(path)
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            shards.append({"file": os.path.basename(path), "windows": int(windows), "tokens": int(tokens),
                           "bytes": os.path.getsize(path), "sha256": h.hexdigest()})
        return shards


class Packer:
    """Cuts a token stream into windows of seq_len + 1 that start every `stride` tokens.

    With stride == seq_len they overlap by one token and every token is a target exactly once;
    smaller strides repeat tokens at other offsets. The first token of a stream is context only.
    """

    def __init__(self, seq_len: int, writer, stride: int = 0):
        self.seq_len = seq_len
        self.stride = stride or seq_len
        self.writer = writer
        self.buffer = np.zeros(0, np.int32)
        self.covered = 1  # leading buffer tokens already predicted (or, at the start, context only)

    def add(self, ids) -> None:
        """One whole document: its ids, then <eod>."""
        self.extend(np.concatenate([np.asarray(ids, np.int32), [tokenizers.EOD_ID]]))

    def extend(self, tokens: np.ndarray) -> None:
        buffer = np.concatenate([self.buffer, np.asarray(tokens, np.int32)])
        window, stride = self.seq_len + 1, self.stride
        n = 0 if len(buffer) < window else (len(buffer) - window) // stride + 1
        if n:
            self.writer.write_many(np.lib.stride_tricks.sliding_window_view(buffer, window)[: (n - 1) * stride + 1: stride])
            buffer = buffer[n * stride:]
            self.covered = window - stride
        self.buffer = buffer

    def finish(self) -> None:
        if len(self.buffer) > self.covered:
            window = np.full(self.seq_len + 1, tokenizers.PAD_ID, np.int32)
            window[: len(self.buffer)] = self.buffer
            self.writer.write_many(window[None])
        self.buffer = np.zeros(0, np.int32)


class Assembler:
    """Walks the parts in corpus order, decides each document's split and feeds the packers.

    `split` is 'document' (a seeded hash of the document's index) or 'tail' (the last
    `val_fraction` of the characters; the document that straddles the boundary is cut there and
    its two halves tokenized again by `retokenize`). `max_chars` keeps the documents that start
    before that many characters.
    """

    def __init__(self, packers, split: str, val_fraction: float, seed: int, max_chars: int = 0,
                 total_chars: int = 0, retokenize=None):
        self.packers, self.split, self.val_fraction, self.seed = packers, split, val_fraction, seed
        self.max_chars = max_chars
        self.boundary = int(total_chars * (1.0 - val_fraction))
        self.retokenize = retokenize
        self.documents = self.chars = self.tokens = 0
        self.open, self.current, self.stopped, self.cut_at = False, 0, False, 0

    def labels(self, chars: np.ndarray, last: np.ndarray):
        """Per piece: its split (-1 dropped, 2 cut by the tail boundary) and whether <eod> follows it."""
        n = len(chars)
        split_of, eod = np.full(n, -1, np.int8), np.zeros(n, bool)
        for j, (c, end) in enumerate(zip(chars.tolist(), last.tolist())):
            if self.stopped:
                break
            if not self.open:
                if c == 0:
                    continue
                if self.max_chars and self.chars >= self.max_chars:
                    self.stopped = True
                    break
                self.open = True
                if self.split == "document":
                    self.current = int(is_val_document(self.documents, self.seed, self.val_fraction))
                self.documents += 1
            if self.split == "tail":
                start = self.chars
                split_of[j] = 0 if start + c <= self.boundary else 1 if start >= self.boundary else 2
                if split_of[j] == 2:
                    self.cut_at = self.boundary - start
            else:
                split_of[j] = self.current
            self.chars += c
            if end:
                eod[j], self.open = True, False
        return split_of, eod

    def add(self, tokens: np.ndarray, lengths: np.ndarray, chars: np.ndarray, last: np.ndarray, where) -> None:
        split_of, eod = self.labels(chars, last)
        cut = np.flatnonzero(split_of == 2)
        if len(cut) == 0:
            self._emit(tokens, lengths, split_of, eod)
            return
        j = int(cut[0])
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._emit(tokens[: offsets[j]], lengths[:j], split_of[:j], eod[:j])
        head, tail = self.retokenize(where, j, self.cut_at)
        self.packers[0].add(head)  # the train side of the cut document ends here, with <eod>
        self.packers[1].extend(np.concatenate([tail, [tokenizers.EOD_ID]]) if eod[j] else tail)
        self.tokens += len(head) + 1 + len(tail) + int(eod[j])
        self._emit(tokens[offsets[j + 1]:], lengths[j + 1:], split_of[j + 1:], eod[j + 1:])

    def _emit(self, tokens, lengths, split_of, eod) -> None:
        if len(lengths) == 0:
            return
        n = len(lengths)
        piece_of_slot = np.repeat(np.arange(n), lengths + 1)  # every piece's ids, then one <eod> slot
        slot_ends = np.cumsum(lengths + 1) - 1
        stream = np.full(len(piece_of_slot), tokenizers.EOD_ID, np.int32)
        is_token = np.ones(len(piece_of_slot), bool)
        is_token[slot_ends] = False
        stream[is_token] = tokens
        for s, packer in enumerate(self.packers):
            keep = (split_of[piece_of_slot] == s) & (is_token | eod[piece_of_slot])
            if keep.any():
                packer.extend(stream[keep])
                self.tokens += int(np.count_nonzero(keep))
