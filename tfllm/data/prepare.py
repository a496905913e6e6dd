"""Raw text -> trained tokenizer + TFRecord shards of fixed token windows + manifest.json.

Three steps. Rank 0 plans: it lists the inputs and trains (or loads) the tokenizer on a sample
taken across all files. Every rank then tokenizes its share of the corpus's blocks on `workers`
threads into part files (`tfllm.data.parts`). Rank 0 finally reads the parts in corpus order and
writes the shards (`tfllm.data.shards`, which defines the window order). The output therefore
does not depend on the number of workers or ranks, and memory does not grow with the corpus.

Each record is one window of `seq_len + 1` token ids stored as raw little-endian integers
(uint16 when the vocabulary fits, else int32). Consecutive windows overlap by one token, so
every token of a split is predicted exactly once; the last window of a split is padded with
<pad>, which the loss ignores. Everything is written to `<out>.tmp-<pid>` and renamed into
place at the end, so an interrupted run never leaves a dataset that looks complete; its
finished parts stay in `<out>.parts/` for the next run to reuse.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import shutil
import sys
import time
from typing import Iterator

import numpy as np

import tfllm
from tfllm import atomic, distributed, tokenizers
from tfllm.config import ConfigError, DataConfig
from tfllm.data import formats, parts
from tfllm.data.corpus import CorpusError, Parser, fingerprint, resolve_files
from tfllm.data.shards import Assembler, Packer, ShardWriter

MANIFEST = "manifest.json"
FORMAT = "tfllm-windows-v1"
SPLITS = ("train", "validation")
# Fields of DataConfig that change the prepared bytes; others (overwrite, data_dir, workers) do not.
_CONTENT_FIELDS = ("corpus", "tokenizer", "vocab_size", "tokenizer_dir", "seq_len", "window_stride", "val_fraction",
                   "split", "num_shards", "jsonl_field", "on_decode_error", "max_corpus_bytes", "tokenizer_sample_bytes",
                   "seed", "parquet_column", "clean", "tsv_column")
# Manifest fields that describe one run rather than the data: they differ between equal outputs.
RUN_FIELDS = ("created", "seconds", "tokens_per_sec", "workers", "ranks", "peak_rss_mb")
_ERRORS = {"ConfigError": ConfigError, "CorpusError": CorpusError}


def content_key(cfg: DataConfig) -> dict:
    return {k: getattr(cfg, k) for k in _CONTENT_FIELDS}


def _allow_open_files(needed: int) -> None:
    """Raises the soft open-file limit toward the hard one: every shard stays open while writing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise ConfigError(f"--num_shards: {needed} open files needed, the system allows {hard}")


def _whole_documents(path: str, parser: Parser) -> Iterator[tuple[formats.Block, list]]:
    for block in formats.blocks(path, column=parser.parquet_column):
        yield block, parser.pieces(path, block)[0]


def _sample(files: list[str], parser: Parser, budget: int) -> Iterator[str]:
    """The tokenizer's training text: each file's first characters, a share by its size.

    Shares follow stored sizes, and what a small file leaves unused passes on to the files after
    it: a corpus under the budget is read whole, a larger one is sampled across all its files.
    """
    sizes = [max(os.path.getsize(f), 1) for f in files]
    remaining_size, used = sum(sizes), 0
    for path, size in zip(files, sizes):
        share = (budget - used) * size // remaining_size
        remaining_size -= size
        taken = 0
        for _, pieces in _whole_documents(path, parser):
            for piece in pieces:
                text = piece.text[: share - taken]
                if text:
                    taken += len(text)
                    yield text
            if taken >= share:
                break
        used += taken


def _limits(files: list[str], parser: Parser, max_chars: int) -> tuple[list[str], dict[str, int]]:
    """The files and blocks that hold the documents starting before `max_chars` characters."""
    if not max_chars:
        return files, {}
    total, open_doc = 0, False
    for i, path in enumerate(files):
        for block, pieces in _whole_documents(path, parser):
            for piece in pieces:
                if not open_doc and piece.text:
                    if total >= max_chars:
                        return files[: i + 1], {path: block.index}
                    open_doc = True
                total += len(piece.text)
                open_doc = open_doc and not piece.last
    return files, {}


def _has_text(files: list[str], parser: Parser) -> bool:
    return any(piece.text for path in files for _, pieces in _whole_documents(path, parser) for piece in pieces)


def _collective(world, fn, chief_only: bool = False):
    """fn on every rank, or on rank 0 alone with its result sent to all; a bad-input error on any
    rank is raised on every rank, naming the rank it came from."""
    result, error = None, None
    if world.rank == 0 or not chief_only:
        try:
            result = fn()
        except (ConfigError, CorpusError) as e:
            if world.size == 1:
                raise
            error = (type(e).__name__, str(e))
    if world.size == 1:
        return result
    if chief_only:
        result, error = distributed.broadcast_object((result, error))
        failed = [(0, error)] if error else []
    else:
        failed = [(r, e) for r, e in enumerate(distributed.allgather_object(error)) if e]
    if failed:
        rank, (kind, message) = failed[0]
        raise _ERRORS[kind](message if rank == world.rank else f"rank {rank}: {message}")
    return result


class _Single:
    rank, size, local_size = 0, 1, 1


def default_workers(world=None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max((world or _Single).local_size, 1))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(cfg: DataConfig, out_dir: str, log=print, world=None) -> dict:
    """Prepares `cfg.corpus` into `out_dir`; returns the manifest.

    With `world` (a `distributed.World` of several ranks) every rank tokenizes its share of the
    corpus and rank 0 assembles the shards: the result is the same as one process's.
    """
    world = world or _Single()
    say = log if world.rank == 0 else (lambda *a, **k: None)
    cfg.validate()
    out_dir = os.path.abspath(out_dir)
    parts_dir = out_dir.rstrip("/") + ".parts"
    parser = Parser.from_config(cfg)
    workers = cfg.workers or default_workers(world)
    started = time.time()

    def plan():
        if cfg.tokenizer_dir and not os.path.isfile(os.path.join(cfg.tokenizer_dir, tokenizers.TOKENIZER_FILE)):
            raise ConfigError(f"--tokenizer_dir={cfg.tokenizer_dir}: no {tokenizers.TOKENIZER_FILE} there")
        if os.path.exists(out_dir) and os.listdir(out_dir) and not cfg.overwrite:
            raise ConfigError(f"{out_dir}: output directory exists and is not empty (pass --overwrite to replace it)")
        files, limits = _limits(resolve_files(cfg.corpus), parser, cfg.max_corpus_bytes)
        if not _has_text(files, parser):
            raise CorpusError(f"{', '.join(cfg.corpus)}: the corpus is empty (no text in {len(files)} file(s))")
        if cfg.tokenizer_dir:
            tokenizer = tokenizers.load_tokenizer(cfg.tokenizer_dir)
            say(f"tokenizer: {tokenizer.kind} from {cfg.tokenizer_dir}, vocabulary {tokenizer.vocab_size}")
        else:
            tokenizer = tokenizers.train_tokenizer(cfg.tokenizer, _sample(files, parser, cfg.tokenizer_sample_bytes),
                                                   cfg.vocab_size)
            say(f"tokenizer: {cfg.tokenizer}, vocabulary {tokenizer.vocab_size}")
        tokenizer_files = tokenizer.save(os.path.join(parts_dir, "tokenizer"))
        say(f"corpus: {len(files)} file(s), {sum(os.path.getsize(f) for f in files) / 1e6:,.1f} MB; "
            f"{world.size} rank(s) x {workers} worker(s)")
        return files, limits, tokenizer_files

    def shared_tokenizer():
        try:
            return tokenizers.load_tokenizer(os.path.join(parts_dir, "tokenizer"))
        except ConfigError:
            raise ConfigError(f"{parts_dir}: rank {world.rank} cannot read the tokenizer rank 0 saved there; "
                              "--data_dir must be on a filesystem that every rank shares") from None

    files, limits, tokenizer_files = _collective(world, plan, chief_only=True)
    tokenizer = _collective(world, shared_tokenizer)
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 65535 else np.dtype("<i4")
    store = parts.PartStore(parts_dir, {"tokenizer": tokenizer_files, "dtype": dtype.str,
                                        "jsonl_field": cfg.jsonl_field, "parquet_column": cfg.parquet_column,
                                        "tsv_column": cfg.tsv_column, "clean": cfg.clean,
                                        "on_decode_error": cfg.on_decode_error, "block": formats.BLOCK_BYTES})
    ranges = parts.rank_ranges(files, limits, world.rank, world.size)
    progress = parts.Progress(sum(r.stored_bytes for r in ranges), say,
                              "rank 0's share: " if world.size > 1 else "")
    try:
        stats = _collective(world, lambda: parts.tokenize(ranges, tokenizer, parser, store, dtype, workers, progress))
        if stats["reused"]:
            say(f"reused {stats['reused']} of rank 0's {stats['blocks']} block(s) tokenized by an earlier run")
        manifest = _collective(world, lambda: _assemble(cfg, out_dir, files, limits, tokenizer, tokenizer_files, store,
                                                        parser, dtype, world.size, workers, started), chief_only=True)
    except BaseException:
        if world.rank == 0 and os.path.isdir(parts_dir):
            say(f"kept the finished parts in {parts_dir}: a rerun with the same inputs reuses them")
        raise
    if world.rank == 0:
        shutil.rmtree(parts_dir, ignore_errors=True)
    say(f"prepared {out_dir}: train {manifest['splits']['train']['windows']} windows / "
        f"{manifest['splits']['train']['tokens']:,} tokens, validation {manifest['splits']['validation']['windows']} "
        f"windows / {manifest['splits']['validation']['tokens']:,} tokens, {manifest['seconds']:.1f}s, "
        f"{manifest['tokens_per_sec']:,.0f} tokens/s, peak RSS {manifest['peak_rss_mb']:,.0f} MB (rank 0)")
    return manifest


def _assemble(cfg, out_dir, files, limits, tokenizer, tokenizer_files, store, parser, dtype, ranks, workers,
              started) -> dict:
    """Rank 0: every part, in corpus order, into shards under a temporary directory, then renamed."""

    def walk():
        for path in files:
            index = 0
            while True:
                part = store.load(path, index)
                yield path, index, part
                if part["meta"][1] or index == limits.get(path):
                    break
                index += 1

    documents = skipped = 0
    total_chars = 0
    if cfg.split == "tail" or cfg.max_corpus_bytes:
        counter = Assembler([None, None], "tail", 0.0, 0, cfg.max_corpus_bytes)  # counts, hashes nothing
        for _, _, part in walk():
            counter.labels(part["chars"], part["last"])
        total_chars = counter.chars

    def retokenize(where, piece, cut):
        path, index, pos = where
        block = next(b for b in formats.blocks(path, pos, column=parser.parquet_column) if b.index == index)
        text = parser.pieces(path, block)[0][piece].text
        ids, lengths = tokenizer.encode_batch([text[:cut], text[cut:]])
        head, tail = ids[: lengths[0]], ids[lengths[0]:]
        return head, tail

    _allow_open_files(2 * cfg.num_shards + 256)
    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        for name in tokenizer_files:
            os.makedirs(os.path.join(tmp_dir, "tokenizer"), exist_ok=True)
            shutil.copyfile(os.path.join(store.root, "tokenizer", name), os.path.join(tmp_dir, "tokenizer", name))
        writers = [ShardWriter(tmp_dir, split, cfg.num_shards, dtype) for split in SPLITS]
        # Validation always predicts every token exactly once, whatever the training stride.
        packers = [Packer(cfg.seq_len, writers[0], cfg.window_stride), Packer(cfg.seq_len, writers[1])]
        assembler = Assembler(packers, cfg.split, cfg.val_fraction, cfg.seed, cfg.max_corpus_bytes, total_chars,
                              retokenize)
        files_read = []
        for path, index, part in walk():
            if assembler.stopped:
                break
            if not files_read or files_read[-1] != path:
                files_read.append(path)
            assembler.add(part["tokens"], part["lengths"], part["chars"], part["last"], (path, index, int(part["meta"][0])))
            skipped += int(part["meta"][2])
        for p in packers:
            p.finish()
        documents = assembler.documents
        if assembler.chars == 0:
            raise CorpusError(f"{', '.join(cfg.corpus)}: the corpus is empty (no text in {len(files)} file(s))")
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
            "corpus": {"files": fingerprint(files_read), "documents": documents, "characters": assembler.chars,
                       "skipped_undecodable": skipped},
            "config": content_key(cfg),
            "tool_version": tfllm.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(elapsed, 3),
            "tokens_per_sec": round(assembler.tokens / max(elapsed, 1e-9), 1),
            "workers": workers,
            "ranks": ranks,
            "peak_rss_mb": round(_peak_rss_mb(), 1),
        }
        atomic.write_json(os.path.join(tmp_dir, MANIFEST), manifest, sort_keys=False)
        atomic.replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
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


def ensure_prepared(cfg: DataConfig, log=print, world=None) -> dict:
    """Prepares cfg.data_dir on first use (on every rank of `world`); reuses it when it was made
    from the same settings. Rank 0 decides, so that every rank takes the same path."""
    world = world or _Single()

    def existing():
        if not os.path.exists(os.path.join(cfg.data_dir, MANIFEST)):
            return None
        manifest = read_manifest(cfg.data_dir)
        # Settings added after a dataset was prepared count as their defaults.
        saved = {**content_key(DataConfig()), **manifest["config"]}
        if saved == content_key(cfg):
            return manifest
        if not cfg.overwrite:
            diffs = [k for k in _CONTENT_FIELDS if saved.get(k) != getattr(cfg, k)]
            raise ConfigError(f"{cfg.data_dir} was prepared with other settings ({', '.join(diffs)}); "
                              "pass --overwrite to prepare it again or choose another --data_dir")
        return None

    return _collective(world, existing, chief_only=True) or prepare(cfg, cfg.data_dir, log=log, world=world)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m pipelines.prepare_data")
