"""Raw text corpora: files, directories, globs, .txt/.jsonl and their .gz forms.

Documents are streamed one at a time; nothing holds the whole corpus in memory. A `.txt`
file is one document; each line of a `.jsonl` file is one document (its text field chosen by
flag). `builtin:python-stdlib` is the Python standard library's own source, which exists on
every machine that runs tfllm, so the demo needs no download.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator

from tfllm.config import ConfigError

BUILTIN_STDLIB = "builtin:python-stdlib"
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".py", ".md")


class CorpusError(ValueError):
    """Bad input data; the message names the file."""


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


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise CorpusError(f"{path}: cannot read ({e})") from None


def _decode(data: bytes, path: str, policy: str, line_offset: int = 0) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if policy == "strict":
            raise CorpusError(
                f"{path}: invalid UTF-8 at byte offset {line_offset + e.start} "
                "(use --on_decode_error=replace or skip to continue)") from None
        if policy == "skip":
            return None
        return data.decode("utf-8", errors="replace")


class Corpus:
    """An ordered, re-iterable stream of documents."""

    def __init__(self, specs: list[str], jsonl_field: str = "text", on_decode_error: str = "strict",
                 max_bytes: int = 0):
        self.files = resolve_files(specs)
        self.jsonl_field = jsonl_field
        self.on_decode_error = on_decode_error
        self.max_bytes = max_bytes
        self.skipped = 0
        self.files_read: list[str] = []  # what the last full pass read (max_bytes may stop early)

    def fingerprint(self) -> list[dict]:
        """Path, size and sha256 of every input file, for the manifest."""
        out = []
        for path in self.files_read or self.files:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()})
        return out

    def __iter__(self) -> Iterator[Document]:
        total = 0
        self.skipped = 0
        files_read = []
        for path in self.files:
            files_read.append(path)
            self.files_read = files_read
            for doc in self._documents(path):
                if self.max_bytes and total >= self.max_bytes:
                    return
                total += len(doc.text)
                yield doc

    def _documents(self, path: str) -> Iterator[Document]:
        data = _read_bytes(path)
        if path.endswith((".jsonl", ".jsonl.gz")):
            offset = 0
            for lineno, line in enumerate(data.split(b"\n"), 1):
                start, offset = offset, offset + len(line) + 1
                if not line.strip():
                    continue
                text = _decode(line, f"{path}:{lineno}", self.on_decode_error, start)
                if text is None:
                    self.skipped += 1
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                value = record.get(self.jsonl_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise CorpusError(f"{path}:{lineno}: no string field {self.jsonl_field!r} (see --jsonl_field)")
                if value:
                    yield Document(path, value)
        else:
            text = _decode(data, path, self.on_decode_error)
            if text is None:
                self.skipped += 1
                return
            if text:
                yield Document(path, text)
