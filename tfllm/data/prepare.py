"""Raw text -> trained tokenizer + TFRecord shards of fixed token windows + manifest.json.

Each record is one window of `seq_len + 1` token ids stored as raw little-endian integers
(uint16 when the vocabulary fits, else int32). Consecutive windows overlap by one token, so
every token of a split is predicted exactly once; the last window of a split is padded with
<pad>, which the loss ignores. Everything is written to `<out>.tmp-<pid>` and renamed into
place at the end, so an interrupted run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Iterator

import numpy as np
import tensorflow as tf

import tfllm
from tfllm import atomic, tokenizers
from tfllm.config import ConfigError, DataConfig
from tfllm.data.corpus import Corpus, CorpusError

MANIFEST = "manifest.json"
FORMAT = "tfllm-windows-v1"
SPLITS = ("train", "validation")
# Fields of DataConfig that change the prepared bytes; others (overwrite, data_dir) do not.
_CONTENT_FIELDS = ("corpus", "tokenizer", "vocab_size", "tokenizer_dir", "seq_len", "window_stride", "val_fraction",
                   "split", "num_shards", "jsonl_field", "on_decode_error", "max_corpus_bytes", "tokenizer_sample_bytes",
                   "seed")


def content_key(cfg: DataConfig) -> dict:
    return {k: getattr(cfg, k) for k in _CONTENT_FIELDS}


def _is_val_document(index: int, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class _ShardWriter:
    """Round-robin writer: shard sizes differ by at most one window."""

    def __init__(self, directory: str, split: str, num_shards: int, dtype: np.dtype):
        self.paths = [os.path.join(directory, f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord") for i in range(num_shards)]
        self.writers = [tf.io.TFRecordWriter(p) for p in self.paths]
        self.windows = [0] * num_shards
        self.tokens = [0] * num_shards
        self.dtype = dtype
        self.count = 0

    def write(self, window: np.ndarray) -> None:
        i = self.count % len(self.writers)
        self.writers[i].write(window.astype(self.dtype).tobytes())
        self.windows[i] += 1
        self.tokens[i] += int(np.count_nonzero(window[1:] != tokenizers.PAD_ID))
        self.count += 1

    def close(self) -> list[dict]:
        shards = []
        for path, writer, windows, tokens in zip(self.paths, self.writers, self.windows, self.tokens):
            writer.close()
            if windows == 0:  # a split smaller than the shard count keeps only non-empty shards
                os.remove(path)
                continue
            with open(path, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
            shards.append({"file": os.path.basename(path), "windows": windows, "tokens": tokens,
                           "bytes": os.path.getsize(path), "sha256": sha})
        return shards


class Packer:
    """Concatenates documents (each followed by <eod>) and cuts windows of seq_len + 1.

    Windows start every `stride` tokens. With stride == seq_len they overlap by one token and
    every token is a target exactly once; smaller strides repeat tokens at other offsets.
    """

    def __init__(self, seq_len: int, writer: _ShardWriter, stride: int = 0):
        self.seq_len = seq_len
        self.stride = stride or seq_len
        self.writer = writer
        self.buffer = np.zeros(0, np.int32)
        self.covered = 1  # leading buffer tokens already predicted (or, at the start, context only)

    def add(self, ids: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, ids.astype(np.int32), [tokenizers.EOD_ID]])
        window, stride = self.seq_len + 1, self.stride
        n = 0 if len(self.buffer) < window else (len(self.buffer) - window) // stride + 1
        for w in range(n):
            self.writer.write(self.buffer[w * stride: w * stride + window])
        if n:
            self.buffer = self.buffer[n * stride:]
            self.covered = window - stride

    def finish(self) -> None:
        if len(self.buffer) > self.covered:
            window = np.full(self.seq_len + 1, tokenizers.PAD_ID, np.int32)
            window[: len(self.buffer)] = self.buffer
            self.writer.write(window)
        self.buffer = np.zeros(0, np.int32)


def _pieces(corpus: Corpus, cfg: DataConfig, total_chars: int) -> Iterator[tuple[int, str]]:
    """(split index, text) in corpus order; 'tail' cuts the document that straddles the boundary."""
    boundary = int(total_chars * (1.0 - cfg.val_fraction))
    seen = 0
    for index, doc in enumerate(corpus):
        if cfg.split == "document":
            yield (1 if _is_val_document(index, cfg.seed, cfg.val_fraction) else 0), doc.text
            continue
        start, seen = seen, seen + len(doc.text)
        if seen <= boundary:
            yield 0, doc.text
        elif start >= boundary:
            yield 1, doc.text
        else:
            cut = boundary - start
            yield 0, doc.text[:cut]
            yield 1, doc.text[cut:]


def _allow_open_files(needed: int) -> None:
    """Raises the soft open-file limit toward the hard one: every shard stays open while writing."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise ConfigError(f"--num_shards: {needed} open files needed, the system allows {hard}")


def _sample(corpus: Corpus, limit: int) -> Iterator[str]:
    used = 0
    for doc in corpus:
        if used >= limit:
            return
        text = doc.text[: limit - used]
        used += len(text)
        yield text


def prepare(cfg: DataConfig, out_dir: str, log=print) -> dict:
    """Prepares `cfg.corpus` into `out_dir`; returns the manifest."""
    cfg.validate()
    if cfg.tokenizer_dir and not os.path.isfile(os.path.join(cfg.tokenizer_dir, tokenizers.TOKENIZER_FILE)):
        raise ConfigError(f"--tokenizer_dir={cfg.tokenizer_dir}: no {tokenizers.TOKENIZER_FILE} there")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not cfg.overwrite:
        raise ConfigError(f"{out_dir}: output directory exists and is not empty (pass --overwrite to replace it)")
    corpus = Corpus(cfg.corpus, cfg.jsonl_field, cfg.on_decode_error, cfg.max_corpus_bytes)
    started = time.time()

    # Pass 1: size of the corpus (for the tail split) and the tokenizer's training sample.
    total_chars = documents = 0
    for doc in corpus:
        total_chars += len(doc.text)
        documents += 1
    if total_chars == 0:
        raise CorpusError(f"{', '.join(cfg.corpus)}: the corpus is empty (no text in {len(corpus.files)} file(s))")
    log(f"corpus: {len(corpus.files_read)} file(s), {documents} document(s), {total_chars:,} characters")
    if cfg.tokenizer_dir:
        tokenizer = tokenizers.load_tokenizer(cfg.tokenizer_dir)
        log(f"tokenizer: {tokenizer.kind} from {cfg.tokenizer_dir}, vocabulary {tokenizer.vocab_size}")
    else:
        tokenizer = tokenizers.train_tokenizer(cfg.tokenizer, _sample(corpus, cfg.tokenizer_sample_bytes), cfg.vocab_size)
        log(f"tokenizer: {cfg.tokenizer}, vocabulary {tokenizer.vocab_size}")
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 65535 else np.dtype("<i4")

    _allow_open_files(2 * cfg.num_shards + 256)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        tokenizer_files = tokenizer.save(os.path.join(tmp_dir, "tokenizer"))
        writers = [_ShardWriter(tmp_dir, split, cfg.num_shards, dtype) for split in SPLITS]
        # Validation always predicts every token exactly once, whatever the training stride.
        packers = [Packer(cfg.seq_len, writers[0], cfg.window_stride), Packer(cfg.seq_len, writers[1])]

        # Pass 2: tokenize in parallel inside tf.data (all cores), pack in order on the host.
        pieces = tf.data.Dataset.from_generator(
            lambda: _pieces(corpus, cfg, total_chars),
            output_signature=(tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.string)))
        encoded = (pieces.batch(16)
                   .map(lambda s, t: (s, tokenizer.tokenize(t)), num_parallel_calls=tf.data.AUTOTUNE)
                   .prefetch(4))
        tokens, last_report = 0, time.time()
        for split_ids, ids in encoded:
            for split, row in zip(split_ids.numpy(), ids):
                row = row.numpy()
                packers[split].add(row)
                tokens += len(row) + 1
            if time.time() - last_report > 2.0:
                last_report = time.time()
                rate = tokens / max(last_report - started, 1e-9)
                log(f"  {tokens:,} tokens, {rate:,.0f} tokens/s")
        for p in packers:
            p.finish()
        splits = {}
        for split, writer in zip(SPLITS, writers):
            shards = writer.close()
            splits[split] = {"windows": sum(s["windows"] for s in shards),
                             "tokens": sum(s["tokens"] for s in shards), "shards": shards}
        train_windows = splits["train"]["windows"]
        if train_windows < cfg.num_shards:
            raise ConfigError(f"--num_shards={cfg.num_shards}: more shards than the {train_windows} training "
                              f"window(s) of {cfg.seq_len + 1} tokens the corpus makes")
        if cfg.val_fraction > 0 and splits["validation"]["windows"] == 0:
            hint = ""
            if cfg.split == "document":
                hint = (" (one document cannot be split by document: use --split=tail)" if documents == 1 else
                        f" (no document of {documents} fell into it: raise --val_fraction or use --split=tail)")
            raise ConfigError(f"--val_fraction={cfg.val_fraction}: the validation split is empty{hint}")

        elapsed = time.time() - started
        manifest = {
            "format": FORMAT,
            "record": f"raw {dtype.name} little-endian array of seq_len + 1 token ids",
            "dtype": "uint16" if dtype.itemsize == 2 else "int32",
            "seq_len": cfg.seq_len,
            "window_stride": cfg.window_stride or cfg.seq_len,
            "vocab_size": tokenizer.vocab_size,
            "special_tokens": {"pad": tokenizers.PAD_ID, "eod": tokenizers.EOD_ID, "unk": tokenizers.UNK_ID},
            "tokenizer": {"kind": tokenizer.kind, "dir": "tokenizer", "files": tokenizer_files},
            "splits": splits,
            "corpus": {"files": corpus.fingerprint(), "documents": documents, "characters": total_chars,
                       "skipped_undecodable": corpus.skipped},
            "config": content_key(cfg),
            "tool_version": tfllm.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(elapsed, 3),
            "tokens_per_sec": round(tokens / max(elapsed, 1e-9), 1),
        }
        atomic.write_json(os.path.join(tmp_dir, MANIFEST), manifest, sort_keys=False)
        atomic.replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"prepared {out_dir}: train {splits['train']['windows']} windows / {splits['train']['tokens']:,} tokens, "
        f"validation {splits['validation']['windows']} windows / {splits['validation']['tokens']:,} tokens, "
        f"{elapsed:.1f}s, {manifest['tokens_per_sec']:,.0f} tokens/s")
    return manifest


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"{path}: no manifest (prepare the data with python -m pipelines.prepare_data)") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: unknown data format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def ensure_prepared(cfg: DataConfig, log=print) -> dict:
    """Prepares cfg.data_dir on first use; reuses it when it was made from the same settings."""
    if os.path.exists(os.path.join(cfg.data_dir, MANIFEST)):
        manifest = read_manifest(cfg.data_dir)
        # Settings added after a dataset was prepared count as their defaults.
        saved = {**content_key(DataConfig()), **manifest["config"]}
        if saved == content_key(cfg):
            return manifest
        if not cfg.overwrite:
            diffs = [k for k in _CONTENT_FIELDS if saved.get(k) != getattr(cfg, k)]
            raise ConfigError(f"{cfg.data_dir} was prepared with other settings ({', '.join(diffs)}); "
                              "pass --overwrite to prepare it again or choose another --data_dir")
    return prepare(cfg, cfg.data_dir, log=log)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m pipelines.prepare_data")
