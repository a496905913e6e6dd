"""Raw text corpora: files, directories and globs of .txt, .jsonl (and their .gz/.zst forms), Parquet and .tsv.

Files are read as blocks (`tfllm.data.formats`), so nothing holds a whole file in memory. A
`.txt` file is one document, cut into one piece per block; each line of a `.jsonl` file is one
document (its text field chosen by --jsonl_field), and so is each row of a Parquet file (its
text column chosen by --parquet_column), and so is each row of a `.tsv` file: tab-separated,
with a header line and no quoting, as GLUE writes them, its text column chosen by --tsv_column
(a labelled fine-tuning file, read as text for further pretraining on it). A `.tsv` file is read
only when named (by path or glob), never picked up from a directory. `--clean` cleans every document
(`tfllm.data.cleaning`); one that cleaning empties is an error naming its line. `builtin:python-stdlib` is the Python standard library's own source, which exists on
every machine that runs tfllm, so the demo needs no download.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator

from tfllm.config import ConfigError, clean_steps
from tfllm.data import cleaning, formats
from tfllm.data.formats import CorpusError  # noqa: F401  (raised here and by formats)

BUILTIN_STDLIB = "builtin:python-stdlib"
TEXT_SUFFIXES = (".txt", ".jsonl", ".py", ".md", ".parquet") + tuple(
    s + c for s in (".txt", ".jsonl") for c in (".gz", ".zst"))


@dataclass(frozen=True)
class Document:
    source: str
    text: str


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages and bytecode caches are not part of the standard library's text.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise CorpusError(f"{BUILTIN_STDLIB}: no .py files under {root}")
    return files


def resolve_files(specs: list[str]) -> list[str]:
    """Expands files, directories and globs into a sorted, de-duplicated file list."""
    files: list[str] = []
    for spec in specs:
        if spec == BUILTIN_STDLIB:
            files.extend(_stdlib_files())
        elif spec.startswith("builtin:"):
            raise ConfigError(f"--corpus={spec}: unknown built-in corpus (known: {BUILTIN_STDLIB})")
        elif any(ch in spec for ch in "*?["):
            matched = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            if not matched:
                raise CorpusError(f"{spec}: the glob matches no files")
            files.extend(matched)
        elif os.path.isdir(spec):
            found = []
            for dirpath, dirnames, filenames in os.walk(spec):
                dirnames.sort()
                found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(TEXT_SUFFIXES))
            if not found:
                raise CorpusError(f"{spec}: directory holds no {', '.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif os.path.isfile(spec):
            files.append(spec)
        else:
            raise CorpusError(f"{spec}: no such file or directory")
    seen, unique = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _decode(data: bytes, where: str, policy: str, offset: int = 0) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if policy == "strict":
            raise CorpusError(
                f"{where}: invalid UTF-8 at byte offset {offset + e.start} "
                "(use --on_decode_error=replace or skip to continue)") from None
        if policy == "skip":
            return None
        return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Piece:
    text: str
    last: bool  # the piece ends its document (a .txt file is one document, in one piece per block)


class Parser:
    """Turns a block of one file into pieces of documents; counts what on_decode_error=skip dropped."""

    def __init__(self, jsonl_field: str = "text", on_decode_error: str = "strict", parquet_column: str = "text",
                 clean: str = "none", tsv_column: str = "text"):
        self.jsonl_field = jsonl_field
        self.on_decode_error = on_decode_error
        self.parquet_column = parquet_column
        self.tsv_column = tsv_column
        clean_steps(clean)
        self.clean = clean
        self._columns: dict[str, tuple[int, int]] = {}  # .tsv path -> (text column's index, fields per row)

    @classmethod
    def from_config(cls, cfg) -> Parser:
        """The parser a DataConfig names: preparation and raw-text evaluation read files alike."""
        return cls(cfg.jsonl_field, cfg.on_decode_error, cfg.parquet_column, cfg.clean, cfg.tsv_column)

    def pieces(self, path: str, block: formats.Block) -> tuple[list[Piece], int]:
        fmt = formats.kind(path)[0]
        if fmt == "parquet":
            texts = [t for t in block.data if t]
            cleaned = self._cleaned(texts, lambda i: f"{path}: row group {block.index}, row {block.start + i}")
            return [Piece(t, True) for t in cleaned], 0
        if fmt == "text":
            text = _decode(block.data, path, self.on_decode_error, block.start)
            if text and self.clean != "none":
                # Not stripped: a .txt file is one document, cut into blocks (a tag across a cut stays).
                text = cleaning.clean_texts([text], self.clean, strip=False)[0]
            if text:
                return [Piece(text, block.last)], 0
            return ([Piece("", True)] if block.last else []), int(text is None)
        if fmt == "tsv":
            return self._tsv(path, block)
        return self._jsonl(path, block)

    def _line(self, path: str, block: formats.Block, index: int) -> int:
        first = block.line or formats.line_at(path, block.start)
        return first + index

    def _cleaned(self, texts: list[str], where) -> list[str]:
        """`texts` cleaned; a text that cleaning empties is a CorpusError at `where(index)`."""
        if self.clean == "none":
            return texts
        cleaned = cleaning.clean_texts(texts, self.clean)
        for i, text in enumerate(cleaned):
            if not text:
                raise CorpusError(f"{where(i)}: the text is empty after --clean={self.clean} "
                                  f"(it was {len(texts[i])} characters: {texts[i][:60]!r})")
        return cleaned

    def _lines(self, path: str, block: formats.Block, document, header: bool = False) -> tuple[list[Piece], int]:
        """Pieces of a block of one document per line: `document(text, index, start)` reads the text of
        the block's line `index` ('' for none). `header`: the file's first line is not one."""
        out, lines, skipped, offset = [], [], 0, block.start
        for index, line in enumerate(block.data.split(b"\n")):
            start, offset = offset, offset + len(line) + 1
            if not line.strip() or (header and start == 0):
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = _decode(line, self._where(path, block, index), self.on_decode_error, start)
            if text is None:
                skipped += 1
                continue
            value = document(text, index, start)
            if value:
                out.append(value)
                lines.append(index)
        out = self._cleaned(out, lambda i: self._where(path, block, lines[i]))
        return [Piece(text, True) for text in out], skipped

    def _where(self, path: str, block: formats.Block, index: int) -> str:
        return f"{path}:{self._line(path, block, index)}"

    def _jsonl(self, path: str, block: formats.Block) -> tuple[list[Piece], int]:
        def document(text: str, index: int, start: int) -> str:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{self._where(path, block, index)}: not valid JSON ({e.msg} at column "
                                  f"{e.colno}; the line starts at byte offset {start})") from None
            # The first listed field that holds a string: a null "body" falls through to "text".
            name = formats.first_named(self.jsonl_field, record, lambda k: isinstance(record[k], str)) \
                if isinstance(record, dict) else None
            if name is None:
                raise CorpusError(f"{self._where(path, block, index)}: no string field "
                                  f"{formats.quoted(self.jsonl_field)} (see --jsonl_field)")
            return record[name]

        return self._lines(path, block, document)

    def _tsv(self, path: str, block: formats.Block) -> tuple[list[Piece], int]:
        column, width = self._tsv_column(path)

        def document(text: str, index: int, start: int) -> str:
            fields = text.rstrip("\r").split("\t")
            if len(fields) != width:
                raise CorpusError(f"{self._where(path, block, index)}: {len(fields)} tab-separated fields, "
                                  f"the header names {width}")
            return fields[column]

        return self._lines(path, block, document, header=True)

    def _tsv_column(self, path: str) -> tuple[int, int]:
        """(the text column's index, fields per row): every block of a file needs the header block 0 holds."""
        if path not in self._columns:
            try:
                names = formats.first_line(path).decode("utf-8").lstrip("\ufeff").split("\t")
            except UnicodeDecodeError:
                raise CorpusError(f"{path}:1: the header line is not UTF-8") from None
            if names == [""]:
                raise CorpusError(f"{path}: empty; a .tsv file starts with a header line naming its columns")
            column = formats.first_named(self.tsv_column, names)
            if column is None:
                raise CorpusError(f"{path}: no column {formats.quoted(self.tsv_column)} (columns: {', '.join(names)}; "
                                  "see --tsv_column)")
            self._columns[path] = (names.index(column), len(names))
        return self._columns[path]


class Corpus:
    """An ordered, re-iterable stream of whole documents (evaluation and the tokenizer's sample)."""

    def __init__(self, specs: list[str], jsonl_field: str = "text", on_decode_error: str = "strict",
                 max_bytes: int = 0, parquet_column: str = "text", clean: str = "none", tsv_column: str = "text",
                 parser: Parser | None = None):
        self.files = resolve_files(specs)
        self.parser = parser or Parser(jsonl_field, on_decode_error, parquet_column, clean, tsv_column)
        self.max_bytes = max_bytes
        self.skipped = 0
        self.files_read: list[str] = []  # what the last full pass read (max_bytes may stop early)

    def fingerprint(self) -> list[dict]:
        return fingerprint(self.files_read or self.files)

    def documents(self, path: str) -> Iterator[Document]:
        parts: list[str] = []
        for block in formats.blocks(path, column=self.parser.parquet_column):
            pieces, skipped = self.parser.pieces(path, block)
            self.skipped += skipped
            for piece in pieces:
                parts.append(piece.text)
                if piece.last:
                    text = "".join(parts) if len(parts) > 1 else parts[0]
                    parts = []
                    if text:
                        yield Document(path, text)

    def __iter__(self) -> Iterator[Document]:
        total = 0
        self.skipped = 0
        files_read = []
        for path in self.files:
            files_read.append(path)
            self.files_read = files_read
            for doc in self.documents(path):
                if self.max_bytes and total >= self.max_bytes:
                    return
                total += len(doc.text)
                yield doc


def fingerprint(files: list[str]) -> list[dict]:
    """Path, size and sha256 of every input file, for the manifest."""
    out = []
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()})
    return out
