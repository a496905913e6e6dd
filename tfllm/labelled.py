"""Labelled text for classification: TSV/CSV/JSONL reading, label vocabularies, token batches.

Rows are read in full (plain or .gz) and checked before training starts: a missing column or
field, an empty text (or one that --clean empties), a label the training data never showed, or a
training file with a single class is a one-line `LabelledDataError` naming the file and line.
Labels are class names (strings); when every label is an integer they are ordered numerically, so
"0"/"1" map to classes 0/1. Files are often sorted by label: subsets (`sample`) and held-out
validation (`hold_out`) are drawn at random, and training batches are shuffled every epoch.

An example is encoded as one int32 row `[label, <eod>, tokens..., <pad>...]` of length
1 + max_length: the label rides in column 0 so that classification batches travel through the
same distributed step as language-model windows. <eod> first, because pretraining saw every
document begin after one. `tokenizers.Encoding` (cleaning, then truncation to max_length) is
TensorFlow ops, shared by training, evaluation and the exported `classify` signature.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os

import numpy as np
import tensorflow as tf

from tfllm.data import cleaning
from tfllm.data.formats import first_named
from tfllm.tokenizers import PAD_ID, Encoding, Tokenizer

FORMATS = ("auto", "tsv", "csv", "jsonl")
NO_LABEL = -1  # rows added to fill a last evaluation batch; excluded from every metric


class LabelledDataError(ValueError):
    """Unusable labelled data; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Columns:
    label: str = "label"
    text: str = "sentence"  # or several names, comma-separated: the first one a file has is used
    header: bool = True  # without a header, columns are 0-based indices
    file_format: str = "auto"


@dataclasses.dataclass
class Examples:
    texts: list[str]
    labels: list[str]  # class names as written in the file
    path: str
    lines: list[int] = dataclasses.field(default_factory=list)  # each example's line in the file

    def take(self, index) -> "Examples":
        return Examples([self.texts[i] for i in index], [self.labels[i] for i in index], self.path,
                        [self.lines[i] for i in index] if self.lines else [])


def _open(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _format(path: str, file_format: str) -> str:
    if file_format != "auto":
        return file_format
    ext = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()
    return {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(ext, "tsv")


def read_examples(path: str, cols: Columns, clean: str = "none") -> Examples:
    """The file's examples, as written; with `clean`, a text that cleaning would empty is an error
    (the text itself is cleaned later, by `Encoding`, exactly as a served text is)."""
    if not path:
        raise LabelledDataError("no labelled file given")
    if not os.path.isfile(path):
        raise LabelledDataError(f"{path}: no such file")
    fmt = _format(path, cols.file_format)
    try:
        with _open(path) as f:
            rows = _jsonl_rows(f, path, cols) if fmt == "jsonl" else _delimited_rows(f, path, cols, fmt)
            texts, labels, lines = [], [], []
            for line, label, text in rows:
                if label is None or str(label).strip() == "":
                    raise LabelledDataError(f"{path}:{line}: empty label")
                if text is None or not str(text).strip():
                    raise LabelledDataError(f"{path}:{line}: empty text")
                texts.append(str(text))
                labels.append(str(label).strip())
                lines.append(line)
    except UnicodeDecodeError as e:
        raise LabelledDataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (OSError, EOFError) as e:  # a damaged .gz
        raise LabelledDataError(f"{path}: unreadable ({e})") from None
    if not texts:
        raise LabelledDataError(f"{path}: no examples")
    for start in range(0, len(texts) if clean != "none" else 0, 4096):
        for i, text in enumerate(cleaning.clean_texts(texts[start:start + 4096], clean), start):
            if not text:
                raise LabelledDataError(f"{path}:{lines[i]}: the text is empty after --clean={clean} "
                                        f"({texts[i][:60]!r})")
    return Examples(texts, labels, path, lines)


def _delimited_rows(f, path, cols, fmt):
    # TSV as GLUE writes it: no quoting, so quotes inside sentences stay literal.
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise LabelledDataError(f"{path}: empty file")
    if cols.header:
        text = first_named(cols.text, header)
        missing = [cols.label] if cols.label not in header else [] if text else [cols.text]
        if missing:
            raise LabelledDataError(f"{path}: no column {missing[0]!r} in the header (columns: {', '.join(header)})")
        li, ti = header.index(cols.label), header.index(text)
        first = []
    else:
        try:
            li, ti = int(cols.label), int(cols.text)
        except ValueError:
            raise LabelledDataError(f"{path}: without a header, --label_column and --text_column are column "
                                    f"numbers (got {cols.label!r}, {cols.text!r})") from None
        first = [header]
    for n, row in enumerate(first + list(reader), start=1 if not cols.header else 2):
        if not row:
            continue
        if max(li, ti) >= len(row):
            raise LabelledDataError(f"{path}:{n}: {len(row)} columns, expected at least {max(li, ti) + 1}")
        yield n, row[li], row[ti]


def _jsonl_rows(f, path, cols):
    for n, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise LabelledDataError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise LabelledDataError(f"{path}:{n}: not a JSON object")
        key = first_named(cols.text, rec)
        if cols.label not in rec or key is None:
            missing, flag = (cols.label, "label") if cols.label not in rec else (cols.text, "text")
            raise LabelledDataError(f"{path}:{n}: no field {missing!r} (--{flag}_column); the record has "
                                    f"{', '.join(map(repr, rec)) or 'no fields'}")
        yield n, rec[cols.label], rec[key]


def label_vocabulary(train: Examples, num_classes: int = 0) -> list[str]:
    """Class names in class-index order, from the training labels (or 0..num_classes-1)."""
    names = sorted(set(train.labels))
    all_int = all(_is_int(n) for n in names)
    if num_classes:
        if not all_int:
            raise LabelledDataError(f"--num_classes={num_classes} needs integer labels; {train.path} has "
                                    f"{names[0]!r}")
        bad = [n for n in names if not 0 <= int(n) < num_classes]
        if bad:
            raise LabelledDataError(f"{train.path}: label {bad[0]} outside 0..{num_classes - 1} (--num_classes)")
        return [str(i) for i in range(num_classes)]
    if len(names) < 2:
        raise LabelledDataError(f"{train.path}: every example has label {names[0]!r}; a classifier needs 2 classes or more")
    return sorted(names, key=int) if all_int else names


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def label_ids(examples: Examples, classes: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    if all(_is_int(c) for c in classes):  # "01" and "1" are the same class
        index.update({str(int(c)): i for i, c in enumerate(classes)})
    ids = []
    for n, label in enumerate(examples.labels):
        key = label if label in index else (str(int(label)) if _is_int(label) else label)
        if key not in index:
            where = f"{examples.path}:{examples.lines[n]}" if examples.lines else examples.path
            raise LabelledDataError(f"{where}: label {label!r} (example {n + 1}) is not among the "
                                    f"training labels {classes}")
        ids.append(index[key])
    return np.asarray(ids, np.int32)


def sample(examples: Examples, n: int, seed: int = 0) -> Examples:
    """n examples drawn at random (in file order): the first n of a file sorted by label would
    hold one class."""
    if n >= len(examples.texts):
        return examples
    return examples.take(np.sort(np.random.default_rng([seed, 1]).permutation(len(examples.texts))[:n]))


def hold_out(examples: Examples, fraction: float, seed: int = 0) -> tuple[Examples, Examples]:
    """(training, validation) examples: a random `fraction` held out, the same for every
    fine-tuning seed, so runs that differ in seed are scored on the same examples."""
    order = np.random.default_rng([seed, 2]).permutation(len(examples.texts))
    n = int(round(fraction * len(order)))
    if not 0 < n < len(order):
        raise LabelledDataError(f"--validation_fraction={fraction} of {len(order)} examples holds out {n}")
    return examples.take(np.sort(order[n:])), examples.take(np.sort(order[:n]))


def encode(tokenizer: Tokenizer, texts: list[str], encoding: Encoding, batch: int = 4096) -> np.ndarray:
    """[N, max_length] int32 token rows (see `Encoding`), padded."""
    out = np.full((len(texts), encoding.max_length), PAD_ID, np.int32)
    for start in range(0, len(texts), batch):
        ragged = encoding.token_ids(tokenizer, tf.constant(texts[start:start + batch]))
        out[start:start + ragged.nrows()] = ragged.to_tensor(default_value=PAD_ID, shape=[None, encoding.max_length])
    return out


def rows(tokens: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, 1 + max_length] rows with the label in column 0."""
    return np.concatenate([labels.astype(np.int32)[:, None], tokens], axis=1)


def split_rows(batch: tf.Tensor):
    """(features dict, labels) of a [B, 1 + T] batch of rows."""
    labels, tokens = batch[:, 0], batch[:, 1:]
    return {"token_ids": tokens, "padding_mask": tokens != PAD_ID}, labels


class Batches:
    """Deterministic per-rank training batches: step s of a run is a pure function of
    (seed, s, world size), so a resumed run continues with exactly the batches it would have seen."""

    def __init__(self, data: np.ndarray, batch_size: int, rank: int, size: int, seed: int):
        self.data, self.batch, self.rank, self.size, self.seed = data, batch_size, rank, size, seed
        self.global_batch = batch_size * size
        self.steps_per_epoch = len(data) // self.global_batch
        if self.steps_per_epoch < 1:
            raise LabelledDataError(f"{len(data)} training examples cannot fill one global batch of "
                                    f"{self.global_batch} ({size} ranks x --batch_size={batch_size})")
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        start = index * self.global_batch + self.rank * self.batch
        return self.data[self._order[start:start + self.batch]]
