import pytest
import tensorflow as tf

from tfllm import tokenizers as T
from tfllm.config import ConfigError

TEXT = "Hello, world!\n  def f(x):\n\treturn x + 1  # ünïcode ✓\n"
CORPUS = [TEXT * 3, "The quick brown fox jumps over the lazy dog.\n" * 50, "\n".join(f"line {i} of text" for i in range(300))]


@pytest.mark.parametrize("kind,vocab", [("char", 0), ("byte", 0), ("sentencepiece_unigram", 312), ("sentencepiece_bpe", 312)])
def test_lossless_round_trip_and_reload(tmp_path, kind, vocab):
    tok = T.train_tokenizer(kind, CORPUS, vocab)
    ids = tok.encode(TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert T.PAD_ID not in ids and T.EOD_ID not in ids
    assert tok.decode(ids) == TEXT
    hashes = tok.save(str(tmp_path))
    assert "tokenizer.json" in hashes
    again = T.load_tokenizer(str(tmp_path))
    assert again.kind == kind and again.vocab_size == tok.vocab_size
    assert again.encode(TEXT) == ids


def test_wordpiece_round_trips_words_and_reloads(tmp_path):
    tok = T.train_tokenizer("wordpiece", CORPUS, 120)
    assert tok.vocab_size <= 120 and tok.vocab[:3] == list(T.SPECIAL_TOKENS)
    ids = tok.encode("The quick brown fox")
    assert T.UNK_ID not in ids
    assert tok.decode(ids) == "The quick brown fox"
    tok.save(str(tmp_path))
    assert T.load_tokenizer(str(tmp_path)).encode("The quick brown fox") == ids


def test_wordpiece_ids_do_not_change_between_trainings(shakespeare):
    """The trainer numbers its pieces in a hash map's order, which the sorted vocabulary must hide. Ties
    between equally frequent merges can change the pieces themselves, rarely on this much text, so
    trainings are compared within groups that learned the same pieces."""
    lines = shakespeare.read_text()[:400_000].split("\n")
    vocabs = [T.train_tokenizer("wordpiece", lines, 400).vocab for _ in range(4)]
    groups = {}
    for vocab in vocabs:
        groups.setdefault(frozenset(vocab), []).append(vocab)
    assert max(len(g) for g in groups.values()) >= 2
    assert all(v == g[0] for g in groups.values() for v in g)


@pytest.mark.parametrize("kind,vocab", [("wordpiece", 120), ("char", 0), ("sentencepiece_bpe", 312)])
def test_continuation_joins_the_prompt_as_the_whole_text_reads(kind, vocab):
    tok = T.train_tokenizer(kind, CORPUS, vocab)
    prompt, new = tok.encode("The quick"), tok.encode(" brown fox")
    assert "The quick" + tok.continuation(prompt, new) == tok.decode(prompt + new)
    if kind == "wordpiece":  # alone, the first new word would stick to the prompt
        assert tok.continuation(prompt, new) == " brown fox" and tok.decode(new) == "brown fox"


def test_specials_are_shared_and_dropped_on_decode():
    tok = T.train_tokenizer("char", ["abc"], 0)
    assert tok.vocab_size == 6
    assert tok.decode([T.PAD_ID, tok.encode("a")[0], T.EOD_ID, tok.encode("c")[0]]) == "ac"
    assert tok.encode("z") == [T.UNK_ID]
    assert tok.decode([T.UNK_ID]) == "\ufffd"


def test_char_vocab_cap_keeps_most_frequent():
    tok = T.train_tokenizer("char", ["aaaabbbc"], 5)
    assert tok.chars == ["a", "b"]


def test_batch_tokenize_is_ragged_int32():
    tok = T.ByteTokenizer()
    out = tok.tokenize(tf.constant(["ab", "", "é"]))
    assert out.dtype == tf.int32
    assert out.to_list() == [[97 + 3, 98 + 3], [], [0xC3 + 3, 0xA9 + 3]]


def test_vocab_the_corpus_cannot_support_is_a_clear_error():
    with pytest.raises(ConfigError, match="--vocab_size=5000"):
        T.train_tokenizer("sentencepiece_unigram", ["tiny corpus"], 5000)
    with pytest.raises(ConfigError, match="--vocab_size=5000"):
        T.train_tokenizer("wordpiece", ["tiny corpus"], 5000)


def test_missing_or_corrupt_tokenizer_dir(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer"):
        T.load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        T.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("kind,vocab", [("char", 0), ("byte", 0), ("wordpiece", 400), ("sentencepiece_bpe", 400),
                                        ("sentencepiece_unigram", 400)])
def test_bulk_encoding_gives_the_ids_of_the_graph_tokenizer(kind, vocab):
    """Preparation encodes with encode_batch (for SentencePiece, the library itself); training,
    generation and the export use tokenize. Both must give the same ids."""
    import gzip
    import json

    from conftest import SHAKESPEARE, SHARED

    with gzip.open(SHARED / "data" / "imdb" / "test.jsonl.gz", "rt") as f:
        reviews = [json.loads(next(f))["text"] for _ in range(400)]
    play = SHAKESPEARE.read_text()
    texts = reviews + [play[i: i + 3000] for i in range(0, 60000, 3000)] + [
        "", " leading and trailing  ", "tabs\tand\nnewlines\n\n", "ünïcödé — ✓ 漢字 🙂", "x" * 5000]
    tok = T.train_tokenizer(kind, iter(reviews[:200] + [play[:50000]]), vocab)
    flat, lengths = tok.encode_batch(texts)
    expected = tok.tokenize(tf.constant(texts))
    assert lengths.tolist() == expected.row_lengths().numpy().tolist()
    assert flat.tolist() == expected.flat_values.numpy().tolist()
    assert flat.dtype.name == "int32" and lengths.sum() == len(flat)
