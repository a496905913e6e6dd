"""Input files as numbered blocks: plain, gzip and zstd text, and Parquet row groups.

Preparation splits every file into blocks that any process can find on its own, so that workers
and ranks divide a corpus without talking to each other and the output cannot depend on how
they divided it. For text (`.txt`, `.jsonl`, `.tsv` and their `.gz`/`.zst` forms) block k holds the lines
that start in uncompressed bytes [k*B, (k+1)*B); a `.txt` line longer than B is cut at the first
character start after k*B, so memory stays bounded. Block k of a file exists when k*B is inside it
(block 0 always). A Parquet file's blocks are its row groups.

Each block also has a stored position (`pos`): where its data begins in the file as stored, for a
compressed stream the compressed offset of the chunk that produced its first byte. Ranks divide
the corpus by these positions. Plain files are read from any block by seeking; a compressed stream
is read from its start (decompressing is ~50x cheaper than tokenizing), so split very large
corpora into several files.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Callable, Iterator

BLOCK_BYTES = 4 << 20
_CHUNK = 1 << 20


class CorpusError(ValueError):
    """Bad input data; the message names the file and where in it."""


@dataclasses.dataclass(frozen=True)
class Block:
    index: int  # block number within its file
    pos: int  # stored byte position where the block's data begins (see the module docstring)
    start: int  # uncompressed offset of data (Parquet: the row group's first row)
    data: object  # bytes (text formats) or a list of str/None (Parquet)
    last: bool  # the file ends in this block
    line: int = 0  # 1-based line number of data's first line; 0: not counted (plain files, read by seeking)


def kind(path: str) -> tuple[str, str]:
    """(format, compression): format is jsonl, tsv, text or parquet; compression is '', gz or zst."""
    name = path.lower()
    compression = ""
    for suffix in (".gz", ".zst"):
        if name.endswith(suffix):
            compression, name = suffix[1:], name[: -len(suffix)]
    if name.endswith(".parquet"):
        return "parquet", compression
    if name.endswith(".tsv"):
        return "tsv", compression
    return ("jsonl" if name.endswith(".jsonl") else "text"), compression


def first_line(path: str) -> bytes:
    """The file's first line, decompressed, without its line break (a header; blocks need it too)."""
    compression = kind(path)[1]
    try:
        with open(path, "rb") as f:
            if not compression:
                return f.readline(_CHUNK).rstrip(b"\r\n")
            data = b""
            for _, out in _chunks(path, f, compression):
                data += out
                if b"\n" in data or len(data) >= _CHUNK:
                    break
            return data.split(b"\n", 1)[0].rstrip(b"\r")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e})") from None


def _decompressed(path: str, f, name: str, unit: str, new_decoder, errors) -> Iterator[tuple[int, bytes]]:
    """(compressed offset of the chunk, uncompressed bytes) of gzip members or zstd frames in a row."""
    fed, decoder, inside = 0, new_decoder(), False
    for raw in iter(lambda: f.read(_CHUNK), b""):
        chunk_pos = fed
        fed += len(raw)
        while raw:
            if not inside and not raw.strip(b"\x00"):
                break  # zero padding after the last member, which gzip itself tolerates
            inside = True
            try:
                out = decoder.decompress(raw)
            except errors as e:
                raise CorpusError(f"{path}: corrupt {name} data in compressed bytes {chunk_pos}-{fed} ({e})") from None
            if out:
                yield chunk_pos, out
            raw = b""
            if decoder.eof:
                raw, decoder, inside = decoder.unused_data, new_decoder(), False
    if inside:
        raise CorpusError(f"{path}: truncated {name} data (the stream ends inside a {unit} at compressed byte {fed})")


def _chunks(path: str, f, compression: str) -> Iterator[tuple[int, bytes]]:
    if compression == "gz":
        return _decompressed(path, f, "gzip", "member", lambda: zlib.decompressobj(31), zlib.error)
    import zstandard

    return _decompressed(path, f, "zstd", "frame", zstandard.ZstdDecompressor().decompressobj, zstandard.ZstdError)


def _boundary(data: bytes, offset: int, nominal: int, fmt: str, eof: bool, block_bytes: int) -> int | None:
    """Uncompressed start of the block whose nominal start is `nominal`, or None to read more.

    `data` holds the stream from uncompressed `offset` on; `offset` is itself a block start.
    """
    if offset >= nominal:
        return offset
    i = data.find(b"\n", nominal - 1 - offset)
    if fmt == "text" and (i < 0 or i + 1 + offset - nominal > block_bytes):
        if len(data) + offset < nominal + block_bytes + 4 and not eof:
            return None
        p = nominal - offset  # no line break near: cut at the first UTF-8 character start
        while p < len(data) and (data[p] & 0xC0) == 0x80:
            p += 1
        return min(p, len(data)) + offset
    if i >= 0:
        return i + 1 + offset
    return len(data) + offset if eof else None


def _stream_blocks(chunks, fmt: str, lo: int, hi: int, block_bytes: int) -> Iterator[Block]:
    """Blocks of a sequential stream whose pos is in [lo, hi); lines are counted on the way."""
    chunks = iter(chunks)
    buf, buf_off, k, line, eof = b"", 0, 0, 1, False
    marks: list[tuple[int, int]] = []  # (uncompressed offset where a chunk begins, its compressed offset)

    def pull() -> bool:
        nonlocal buf
        nxt = next(chunks, None)
        if nxt is None:
            return False
        marks.append((buf_off + len(buf), nxt[0]))
        buf += nxt[1]
        return True

    while True:
        nominal = (k + 1) * block_bytes
        while not eof and buf_off + len(buf) <= nominal:
            eof = not pull()
        if buf_off + len(buf) <= nominal:
            end, last = buf_off + len(buf), True
        else:
            end, last = None, False
            while end is None:
                end = _boundary(buf, buf_off, nominal, fmt, eof, block_bytes)
                if end is None:
                    eof = not pull()
        while len(marks) > 1 and marks[1][0] <= buf_off:
            marks.pop(0)
        pos = marks[0][1] if marks else 0
        if pos >= hi:
            return
        data = buf[: end - buf_off]
        if pos >= lo:
            yield Block(k, pos, buf_off, data, last, line)
        if last:
            return
        line += data.count(b"\n")
        buf, buf_off, k = buf[end - buf_off:], end, k + 1


def _plain_blocks(path: str, fmt: str, lo: int, hi: int, block_bytes: int) -> Iterator[Block]:
    """Blocks of an uncompressed file whose pos (here k*B) is in [lo, hi), found by seeking."""
    size = os.path.getsize(path)
    count = max(1, -(-size // block_bytes))
    first = -(-lo // block_bytes)
    with open(path, "rb") as f:

        def boundary(k: int) -> int:
            nominal = k * block_bytes
            if k == 0 or nominal >= size:
                return min(nominal, size)
            f.seek(nominal - 1)
            data = b""
            while True:
                more = f.read(_CHUNK)
                data += more
                found = _boundary(data, nominal - 1, nominal, fmt, not more, block_bytes)
                if found is not None:
                    return found

        start = boundary(first) if first < count else size
        for k in range(first, count):
            if k * block_bytes >= hi:
                return
            end = boundary(k + 1) if k + 1 < count else size
            f.seek(start)
            yield Block(k, k * block_bytes, start, f.read(end - start), k + 1 == count)
            start = end


def listed(names: str) -> list[str]:
    """The names of a comma-separated list, edge spaces dropped ("sentence, content" is two names)."""
    return [n.strip() for n in names.split(",")]


def first_named(names: str, present, usable: Callable[[str], bool] | None = None) -> str | None:
    """The first of the comma-separated `names` (a --jsonl_field, --tsv_column or --parquet_column
    list: files that call their text differently) that `present` holds, and that `usable` accepts
    when given. A name that itself holds a comma is found when `present` has it whole."""
    for n in [names, *listed(names)]:
        if n in present and (usable is None or usable(n)):
            return n
    return None


def quoted(names: str) -> str:
    return " or ".join(repr(n) for n in listed(names))


def _parquet_blocks(path: str, column: str, lo: int, hi: int) -> Iterator[Block]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    found = first_named(column, names)
    if found is None:
        raise CorpusError(f"{path}: no column {quoted(column)} (columns: {', '.join(names)}; see --parquet_column)")
    column = found
    field = pf.schema_arrow.field(column)
    if not (pyarrow.types.is_string(field.type) or pyarrow.types.is_large_string(field.type)):
        raise CorpusError(f"{path}: column {column!r} holds {field.type}, not text (see --parquet_column)")
    groups, row = pf.metadata.num_row_groups, 0
    if groups == 0 and lo == 0 < hi:
        yield Block(0, 0, 0, [], True)
    for g in range(groups):
        meta = pf.metadata.row_group(g)
        pos = min(meta.column(c).file_offset for c in range(meta.num_columns))
        if lo <= pos < hi:
            try:
                values = pf.read_row_group(g, columns=[column]).column(0).to_pylist()
            except (pyarrow.ArrowException, OSError) as e:
                raise CorpusError(f"{path}: row group {g} cannot be read ({e})") from None
            yield Block(g, pos, row, values, g + 1 == groups)
        row += meta.num_rows


def blocks(path: str, lo: int = 0, hi: int | None = None, column: str = "text",
           block_bytes: int | None = None) -> Iterator[Block]:
    """The file's blocks whose stored position is in [lo, hi), in order."""
    hi = os.path.getsize(path) + 1 if hi is None else hi
    lo, block_bytes = max(lo, 0), block_bytes or BLOCK_BYTES
    fmt, compression = kind(path)
    try:
        if fmt == "parquet":
            if compression:
                raise CorpusError(f"{path}: a compressed Parquet file (Parquet compresses its own pages)")
            yield from _parquet_blocks(path, column, lo, hi)
        elif not compression:
            yield from _plain_blocks(path, fmt, lo, hi, block_bytes)
        else:
            with open(path, "rb") as f:
                yield from _stream_blocks(_chunks(path, f, compression), fmt, lo, hi, block_bytes)
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e})") from None


def line_at(path: str, offset: int) -> int:
    """1-based line number of an uncompressed offset in a plain file (error messages only)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1
