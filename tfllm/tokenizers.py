"""Tokenizers: training, saving, loading, and in-graph tokenize/detokenize.

Every tokenizer is a `tf.Module` whose `tokenize`/`detokenize` are TensorFlow (and
tensorflow-text) ops. Data preparation runs them inside tf.data, generation calls them, and
the exported SavedModel embeds the very same objects, so the text->ids mapping can never
drift between preparation, training and serving.

Special tokens are the same for every kind: id 0 pad, 1 end of document, 2 unknown.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import os
from typing import Iterable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

from tfllm.config import TRUNCATIONS, ConfigError
from tfllm.data import cleaning

PAD, EOD, UNK = "<pad>", "<eod>", "<unk>"
SPECIAL_TOKENS = (PAD, EOD, UNK)
PAD_ID, EOD_ID, UNK_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(tf.Module):
    kind = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def tokenize(self, strings: tf.Tensor) -> tf.RaggedTensor:
        """[batch] strings -> [batch, None] int32 ids."""
        raise NotImplementedError

    def detokenize(self, ids) -> tf.Tensor:
        """[batch, None] ids (ragged or dense) -> [batch] strings; special tokens are dropped."""
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """Files that, written to a directory, let `load_tokenizer` rebuild this tokenizer."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.tokenize(tf.constant([text]))[0].numpy().tolist()

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids concatenated, int32; each text's id count) for bulk preparation.

        Safe to call from several threads at once: TensorFlow kernels run without the GIL.
        """
        flat, lengths, group, size = [], [], [], 0
        for text in list(texts) + [None]:
            # Calls of ~1 MB: one call for a whole 8 MB block held ~340 MB of intermediates (WordPiece).
            if group and (text is None or size + len(text) > 1 << 20 or len(group) == 256):
                ids = self.tokenize(tf.constant(group))
                flat.append(ids.flat_values.numpy().astype(np.int32, copy=False))
                lengths.append(ids.row_lengths().numpy().astype(np.int64))
                group, size = [], 0
            if text is not None:
                group.append(text)
                size += len(text)
        if not flat:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        return np.concatenate(flat), np.concatenate(lengths)

    def decode(self, ids: Iterable[int]) -> str:
        ids = tf.ragged.constant([list(ids)], dtype=tf.int32)
        return self.detokenize(ids)[0].numpy().decode("utf-8", errors="replace")

    def continuations(self, prompt_ids: tf.RaggedTensor, whole_ids: tf.RaggedTensor,
                      new_ids: tf.RaggedTensor) -> tf.Tensor:
        """[N] texts that `new_ids` add after their prompts (`whole_ids`: prompt then new), in-graph.
        Decoded with the prompt, because WordPiece puts the space between words at detokenization:
        alone, "a great film" after "This movie was" would read "This movie wasa great film".
        The caller passes the whole rows because a ragged concat here would log an oneDNN error line."""
        whole, prompt = self.detokenize(whole_ids), self.detokenize(prompt_ids)
        # tf.where computes both branches: a prompt that decodes longer than its row must not fail the batch
        n = tf.minimum(tf.strings.length(prompt), tf.strings.length(whole))
        joined = tf.equal(tf.strings.substr(whole, tf.zeros_like(n), n), prompt)
        return tf.where(joined, tf.strings.substr(whole, n, tf.strings.length(whole) - n), self.detokenize(new_ids))

    def continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """`continuations` for one prompt, as a Python string."""
        rows = [list(prompt_ids), list(prompt_ids) + list(new_ids), list(new_ids)]
        ids = [tf.ragged.constant([row], dtype=tf.int32, ragged_rank=1) for row in rows]
        return self.continuations(*ids)[0].numpy().decode("utf-8", errors="replace")

    def save(self, directory: str) -> dict[str, str]:
        """Writes the tokenizer files; returns {file name: sha256}."""
        os.makedirs(directory, exist_ok=True)
        hashes = {}
        for name, content in self.files().items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(content)
            hashes[name] = hashlib.sha256(content).hexdigest()
        return hashes


HEAD_SHARE = 4  # head_tail keeps the first 1/HEAD_SHARE of the token budget, the rest from the end


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How a text becomes the tokens of one row."""
    max_length: int  # tokens per row, <eod> included
    truncation: str = "head"  # head: the first tokens; head_tail: the first quarter and the end
    clean: str = "none"  # tfllm.data.cleaning

    def token_ids(self, tokenizer: Tokenizer, texts: tf.Tensor) -> tf.RaggedTensor:
        """[N] strings -> [N, None] int32 ids: <eod>, then at most max_length - 1 text tokens."""
        ids = tf.cast(tokenizer.tokenize(cleaning.clean_strings(texts, self.clean)), tf.int32)
        return _prepend_eod(truncate(ids, self.max_length - 1, self.truncation))


# Rows are built by gathers and scatters, not a ragged tf.concat: that concatenates int64 row
# splits, whose oneDNN kernel logs an "E0000 ... oneDNN supports DT_INT64 only on platforms with
# AVX-512" line on most CPUs, which an exported model's classify or score printed in users' processes.
def _prepend_eod(ids: tf.RaggedTensor) -> tf.RaggedTensor:
    n_values, rows = tf.size(ids.values, out_type=ids.row_splits.dtype), ids.nrows()
    slots = tf.range(n_values) + ids.value_rowids() + 1  # each value moves right by its row's index + 1
    values = tf.tensor_scatter_nd_update(tf.fill([n_values + rows], tf.constant(EOD_ID, ids.dtype)),
                                         slots[:, None], ids.values)
    return tf.RaggedTensor.from_row_splits(values, ids.row_splits + tf.range(rows + 1), validate=False)


def truncate(ids: tf.RaggedTensor, n: int, how: str) -> tf.RaggedTensor:
    """Each row cut to n ids. head_tail keeps n // HEAD_SHARE from the start and the rest from the
    end: a long review's verdict tends to be in its last lines (Sun et al. 2019, "How to Fine-Tune
    BERT for Text Classification", found head+tail best on IMDB)."""
    if how == "head":
        return ids[:, :n]
    if how != "head_tail":
        raise ConfigError(f"--truncation={how!r}: expected one of {', '.join(TRUNCATIONS)}")
    lengths = ids.row_lengths()
    head_end = tf.minimum(lengths, n // HEAD_SHARE)
    tail_start = tf.maximum(head_end, lengths - (n - n // HEAD_SHARE))
    kept = tf.ragged.range(head_end + lengths - tail_start, row_splits_dtype=lengths.dtype)
    rows = kept.value_rowids()
    head = tf.gather(head_end, rows)
    index = tf.where(kept.values < head, kept.values, kept.values - head + tf.gather(tail_start, rows))
    return tf.gather(ids, kept.with_values(index), batch_dims=1)


def _drop_specials(ids) -> tf.RaggedTensor:
    if not isinstance(ids, tf.RaggedTensor):
        ids = tf.RaggedTensor.from_tensor(tf.convert_to_tensor(ids))
    ids = tf.cast(ids, tf.int32)
    return tf.ragged.boolean_mask(ids, (ids != PAD_ID) & (ids != EOD_ID))


class CharTokenizer(Tokenizer):
    """Unicode code points; the `vocab_size - 3` most frequent characters of the corpus."""

    kind = "char"

    def __init__(self, chars: list[str], name=None):
        super().__init__(name=name)
        self.chars = list(chars)
        codepoints = tf.constant([ord(c) for c in self.chars], tf.int64)
        ids = tf.range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(self.chars), dtype=tf.int64)
        self._encode_table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(codepoints, ids), default_value=UNK_ID)
        # U+FFFD renders unknown characters visibly instead of silently dropping them.
        self._decode_codepoints = tf.constant([0, 0, 0xFFFD] + [ord(c) for c in self.chars], tf.int32)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.chars)

    def tokenize(self, strings):
        cps = tf.strings.unicode_decode(strings, "UTF-8", errors="replace")
        return tf.cast(tf.ragged.map_flat_values(self._encode_table.lookup, tf.cast(cps, tf.int64)), tf.int32)

    def detokenize(self, ids):
        ids = _drop_specials(ids)
        cps = tf.ragged.map_flat_values(tf.gather, self._decode_codepoints, ids)
        return tf.strings.unicode_encode(cps, "UTF-8")

    def files(self):
        return {TOKENIZER_FILE: json.dumps({"kind": self.kind, "chars": self.chars}, ensure_ascii=True).encode()}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "CharTokenizer":
        counts = collections.Counter()
        for text in texts:
            counts.update(text)
        if not counts:
            raise ConfigError("the corpus has no characters to build a character vocabulary from")
        limit = vocab_size - len(SPECIAL_TOKENS) if vocab_size > 0 else len(counts)
        if limit < 1:
            raise ConfigError(f"--vocab_size={vocab_size}: a char tokenizer needs more than {len(SPECIAL_TOKENS)}")
        # Most frequent first for the cut, then sorted so the ids do not depend on ties in counting.
        kept = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]
        return cls(sorted(kept))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: 256 ids after the specials; needs no training."""

    kind = "byte"

    def __init__(self, name=None):
        super().__init__(name=name)
        self._byte_strings = tf.constant([b""] * len(SPECIAL_TOKENS) + [bytes([i]) for i in range(256)])

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + 256

    def tokenize(self, strings):
        pieces = tf.strings.bytes_split(strings)
        raw = tf.ragged.map_flat_values(lambda b: tf.io.decode_raw(b, tf.uint8)[:, 0], pieces)
        return tf.cast(raw, tf.int32) + len(SPECIAL_TOKENS)

    def detokenize(self, ids):
        ids = _drop_specials(ids)
        return tf.strings.reduce_join(tf.ragged.map_flat_values(tf.gather, self._byte_strings, ids), axis=-1)

    def files(self):
        return {TOKENIZER_FILE: json.dumps({"kind": self.kind}).encode()}


class WordPieceTokenizer(Tokenizer):
    """BERT-style WordPiece over whitespace/punctuation words (case kept)."""

    kind = "wordpiece"

    def __init__(self, vocab: list[str], name=None):
        super().__init__(name=name)
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ConfigError(f"wordpiece vocabulary must start with {SPECIAL_TOKENS}")
        self.vocab = list(vocab)
        self._tokenizer = tf_text.FastWordpieceTokenizer(
            vocab=self.vocab, token_out_type=tf.int32, unknown_token=UNK,
            no_pretokenization=False, support_detokenization=True)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, strings):
        return self._tokenizer.tokenize(strings)

    def detokenize(self, ids):
        return self._tokenizer.detokenize(_drop_specials(ids))

    def files(self):
        return {TOKENIZER_FILE: json.dumps({"kind": self.kind, "vocab": self.vocab}).encode()}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "WordPieceTokenizer":
        # The vocabulary is learned with the Rust `tokenizers` trainer (a keras-hub dependency):
        # tensorflow-text's pure-Python learner needs ~40 s for tiny Shakespeare alone. Both
        # split on whitespace and punctuation first, as FastWordpieceTokenizer does at run time.
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                            continuing_subword_prefix="##", show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        # The trainer numbers its pieces in the order of a Rust hash map, which differs from run to run.
        # Sorted, the ids depend only on which pieces were learned: preparing one corpus twice gives the
        # same ids (on IMDB's reviews the pieces were the same and 174 of 8,192 ids had moved).
        vocab = list(SPECIAL_TOKENS) + sorted(t for t in hf.get_vocab() if t not in SPECIAL_TOKENS)
        if len(vocab) < 0.9 * vocab_size:
            raise ConfigError(
                f"--vocab_size={vocab_size}: the corpus supports only about {len(vocab)} wordpieces; ask for fewer")
        return cls(vocab)


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece unigram or BPE, identity normalisation so whitespace and code survive."""

    def __init__(self, model_proto: bytes, kind: str, name=None):
        super().__init__(name=name)
        self.kind = kind
        self.model_proto = model_proto
        self._tokenizer = tf_text.SentencepieceTokenizer(model=model_proto, out_type=tf.int32)
        self._vocab_size = int(self._tokenizer.vocab_size().numpy())
        self._processor = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, strings):
        return self._tokenizer.tokenize(strings)

    def detokenize(self, ids):
        return self._tokenizer.detokenize(_drop_specials(ids))

    def encode_batch(self, texts):
        # The sentencepiece library itself, on the same model proto (the same C++ code tensorflow-text
        # wraps): it releases the GIL, so preparation threads scale across cores (measured 2.2x on 2
        # cores, against 1.2x for the TF op, which serialises). tokenizers_test checks the ids agree.
        if self._processor is None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        ids = self._processor.encode(list(texts), num_threads=1)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())), lengths

    def files(self):
        return {
            TOKENIZER_FILE: json.dumps({"kind": self.kind, "model": "spm.model"}).encode(),
            "spm.model": self.model_proto,
        }

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, kind: str) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        def lines() -> Iterator[str]:
            for text in texts:
                for line in text.split("\n"):
                    if line.strip():
                        yield line

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
                model_type="unigram" if kind.endswith("unigram") else "bpe",
                pad_id=PAD_ID, eos_id=EOD_ID, unk_id=UNK_ID, bos_id=-1,
                pad_piece=PAD, eos_piece=EOD, unk_piece=UNK,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=True, character_coverage=0.9995,
                # Byte fallback keeps newlines and rare characters round-trippable.
                byte_fallback=vocab_size >= 300, max_sentence_length=1 << 16,
                minloglevel=2, num_threads=os.cpu_count() or 1)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            raise ConfigError(f"--vocab_size={vocab_size}: sentencepiece could not train ({msg})") from None
        return cls(model.getvalue(), kind)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(texts, vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "wordpiece":
        return WordPieceTokenizer.train(texts, vocab_size)
    if kind.startswith("sentencepiece_"):
        return SentencePieceTokenizer.train(texts, vocab_size, kind)
    raise ConfigError(f"--tokenizer={kind!r}: unknown tokenizer")


def load_tokenizer(directory: str) -> Tokenizer:
    path = os.path.join(directory, TOKENIZER_FILE)
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no tokenizer here (was the data prepared with pipelines.prepare_data?)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: corrupt tokenizer file ({e})") from None
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "wordpiece":
        return WordPieceTokenizer(spec["vocab"])
    if kind in ("sentencepiece_unigram", "sentencepiece_bpe"):
        with open(os.path.join(directory, spec["model"]), "rb") as f:
            return SentencePieceTokenizer(f.read(), kind)
    raise ConfigError(f"{path}: unknown tokenizer kind {kind!r}")
