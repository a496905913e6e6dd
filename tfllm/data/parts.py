"""Tokenizing a corpus in parallel: blocks -> part files, on every core of every rank.

One reader thread walks this rank's blocks in order (`tfllm.data.formats`); `workers` threads
parse and tokenize them (the tokenizers run without the GIL) and each block becomes one part
file: its token ids and, per piece of document, the id count, character count and whether the
piece ends its document. Assembling windows from the parts is `tfllm.data.shards`' job.

Part files live in `<data_dir>.parts/`, one folder per input file named by a key of the file's
path, size and modification time and of everything that changes its ids. A part is renamed into
place when complete, so an interrupted preparation that is run again reuses every finished part.
Memory is bounded by the blocks in flight: 2 per worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
import time

import numpy as np

from tfllm.data import formats
from tfllm.data.corpus import Parser

PARTS_FORMAT = "tfllm-parts-v1"


@dataclasses.dataclass
class FileRange:
    """The blocks of one input file that this rank tokenizes: stored positions [lo, hi), up to block `upto`."""
    path: str
    lo: int
    hi: int
    upto: int | None = None  # last block needed (--max_corpus_bytes), None: all

    @property
    def stored_bytes(self) -> int:
        """How much of the file, as stored, this range covers (progress is measured against it)."""
        return min(os.path.getsize(self.path), self.hi) - max(self.lo, 0)


def rank_ranges(files: list[str], limits: dict[str, int], rank: int, size: int) -> list[FileRange]:
    """This rank's share: contiguous stored bytes of the corpus, cut at the same places on every rank."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    lo = -(-rank * total // size)
    hi = -(-(rank + 1) * total // size) if rank + 1 < size else total + 1
    out, offset = [], 0
    for path, n in zip(files, sizes):
        if offset + max(n, 1) > lo and offset < hi:
            out.append(FileRange(path, lo - offset, hi - offset, limits.get(path)))
        offset += n
    return out


class PartStore:
    def __init__(self, root: str, token_key: dict):
        self.root = root
        self.token_key = json.dumps({"format": PARTS_FORMAT, **token_key}, sort_keys=True)

    def folder(self, path: str) -> str:
        st = os.stat(path)
        key = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, self.token_key])
        return os.path.join(self.root, hashlib.sha256(key.encode()).hexdigest()[:20])

    def path(self, path: str, index: int) -> str:
        return os.path.join(self.folder(path), f"{index:07d}.npz")

    def save(self, path: str, block: formats.Block, tokens, lengths, chars, last, skipped: int) -> None:
        final = self.path(path, block.index)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{os.getpid()}-{threading.get_ident()}.npz"
        np.savez(tmp, tokens=tokens, lengths=lengths, chars=chars, last=last,
                 meta=np.array([block.pos, int(block.last), skipped], np.int64))
        os.replace(tmp, final)

    def load(self, path: str, index: int):
        part = self.path(path, index)
        try:
            return np.load(part)
        except FileNotFoundError:
            raise formats.CorpusError(f"{path}: block {index} was not tokenized ({part} is missing: did a rank fail, "
                                      "or is the data directory not on a filesystem that every rank shares?)") from None


class Progress:
    """Bytes, documents, tokens/s and ETA of this rank's share, every `every` seconds."""

    def __init__(self, total_bytes: int, log, label: str = "", every: float = 5.0):
        self.total, self.log, self.label, self.every = max(total_bytes, 1), log, label, every
        self.started = self.last = time.time()
        self.bytes = self.documents = self.tokens = 0
        self.lock = threading.Lock()

    def add(self, documents: int, tokens: int) -> None:
        with self.lock:
            self.documents += documents
            self.tokens += tokens

    def at(self, done_bytes: int) -> None:
        self.bytes = done_bytes
        now = time.time()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        share = min(self.bytes / self.total, 1.0)
        eta = elapsed * (1 - share) / share if share > 0 else 0.0
        self.log(f"  {self.label}{self.bytes / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({100 * share:.0f}%), "
                 f"{self.documents:,} documents, {self.tokens / elapsed:,.0f} tokens/s, ETA {eta:.0f}s")


def tokenize(ranges: list[FileRange], tokenizer, parser: Parser, store: PartStore, dtype, workers: int,
             progress: Progress) -> dict:
    """Writes a part for every block in `ranges` that has none yet; returns counts."""
    work: queue.Queue = queue.Queue(maxsize=2 * workers)
    failure: list[BaseException] = []
    stats = {"blocks": 0, "reused": 0}

    def worker():
        while True:
            item = work.get()
            if item is None:
                return
            if failure:
                continue
            path, block = item
            try:
                pieces, skipped = parser.pieces(path, block)
                tokens, lengths = tokenizer.encode_batch([p.text for p in pieces])
                chars = np.fromiter((len(p.text) for p in pieces), np.int64, len(pieces))
                last = np.fromiter((p.last for p in pieces), bool, len(pieces))
                store.save(path, block, tokens.astype(dtype), lengths, chars, last, skipped)
                progress.add(int(np.count_nonzero(last & (chars > 0))), len(tokens))
            except BaseException as e:  # noqa: BLE001 - re-raised by the reader below
                failure.append(e)

    threads = [threading.Thread(target=worker, daemon=True, name=f"tokenize-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    done_before = 0
    try:
        for r in ranges:
            for block in formats.blocks(r.path, r.lo, r.hi, parser.parquet_column):
                if failure:
                    raise failure[0]
                if r.upto is not None and block.index > r.upto:
                    break
                stats["blocks"] += 1
                if os.path.exists(store.path(r.path, block.index)):
                    stats["reused"] += 1
                else:
                    work.put((r.path, block))
                progress.at(done_before + block.pos - max(r.lo, 0))
            done_before += r.stored_bytes
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
    if failure:
        raise failure[0]
    return stats
