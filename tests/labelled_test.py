"""Labelled data at scale: gzip JSONL, cleaning, head+tail truncation, sorted files, held-out validation."""

import gzip
import json

import numpy as np
import pytest

from conftest import run
from tfllm import labelled
from tfllm.tokenizers import CharTokenizer, Encoding

TOKENIZER = CharTokenizer(list("abcdefghij\n<>/ "))


def _jsonl_gz(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_reads_gzip_jsonl_with_line_numbers(tmp_path):
    path = _jsonl_gz(tmp_path / "t.jsonl.gz", [{"label": "neg", "text": "bad"}, {"label": "pos", "text": "good"}])
    ex = labelled.read_examples(path, labelled.Columns(text="text"))
    assert ex.texts == ["bad", "good"] and ex.labels == ["neg", "pos"] and ex.lines == [1, 2]


def test_text_column_list_drops_edge_spaces_in_tsv_and_jsonl(tmp_path):
    (tmp_path / "dev.tsv").write_text("content\tlabel\nbad\t0\n")
    ex = labelled.read_examples(str(tmp_path / "dev.tsv"), labelled.Columns(text="sentence, content"))
    assert ex.texts == ["bad"] and ex.labels == ["0"]
    path = _jsonl_gz(tmp_path / "t.jsonl.gz", [{"label": "pos", "body": "b"}, {"label": "neg", "text": "t"}])
    assert labelled.read_examples(path, labelled.Columns(text="text, body")).texts == ["b", "t"]


@pytest.mark.parametrize("records,clean,message", [
    ([{"text": "fine", "label": "pos"}, {"text": "no label", "rating": 3}], "none",
     r"t.jsonl.gz:2: no field 'label' \(--label_column\); the record has 'text', 'rating'"),
    ([{"label": "pos", "text": "a<br />b"}, {"label": "neg", "text": "<br /> <br />"}], "html",
     r"t.jsonl.gz:2: the text is empty after --clean=html \('<br /> <br />'\)"),
])
def test_bad_records_name_file_and_line(tmp_path, records, clean, message):
    path = _jsonl_gz(tmp_path / "t.jsonl.gz", records)
    with pytest.raises(labelled.LabelledDataError, match=message):
        labelled.read_examples(path, labelled.Columns(text="text"), clean)


def test_label_outside_training_classes_names_the_line(tmp_path):
    path = _jsonl_gz(tmp_path / "t.jsonl.gz", [{"label": "pos", "text": "a"}, {"label": "meh", "text": "b"}])
    with pytest.raises(labelled.LabelledDataError, match=r"t.jsonl.gz:2: label 'meh' \(example 2\) is not among"):
        labelled.label_ids(labelled.read_examples(path, labelled.Columns(text="text")), ["neg", "pos"])


def test_head_tail_truncation_keeps_the_end():
    texts = ["abcdefghij", "ab", "abcde"]
    head = labelled.encode(TOKENIZER, texts, Encoding(5, "head"))
    head_tail = labelled.encode(TOKENIZER, texts, Encoding(5, "head_tail"))
    a = TOKENIZER.encode("a")[0]
    # 4 text tokens after <eod>: head_tail keeps 1 from the start and 3 from the end.
    assert [TOKENIZER.decode(r) for r in head] == ["abcd", "ab", "abcd"]
    assert [TOKENIZER.decode(r) for r in head_tail] == ["ahij", "ab", "acde"]
    assert head_tail[:, 0].tolist() == [1, 1, 1] and head_tail[0, 1] == a
    long = labelled.encode(TOKENIZER, ["abcdefghij" * 3], Encoding(21, "head_tail"))
    assert TOKENIZER.decode(long[0]) == "abcde" + ("abcdefghij" * 3)[-15:]


def test_encoding_logs_nothing_in_a_plain_process():
    """A served model encodes outside the pipelines' console filter: a ragged concat there logged an
    oneDNN "E0000 ... DT_INT64" line on CPUs without AVX-512, in every user's process."""
    script = ("import json\nfrom tfllm.tokenizers import CharTokenizer, Encoding\n"
              "t = CharTokenizer(list('abcdefghij'))\n"
              "for how in ('head', 'head_tail'):\n"
              "    ids = Encoding(5, how).token_ids(t, tf.constant(['abcdefghij', '', 'ab']))\n"
              "    print(json.dumps([[t.decode(r[1:]) for r in ids.to_list()], [r[0] for r in ids.to_list()]]))\n")
    proc = run(["-c", "import tensorflow as tf\n" + script], TF_CPP_MIN_LOG_LEVEL="0")
    assert "oneDNN supports" not in proc.stderr, proc.stderr
    head, head_tail = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert head == [["abcd", "", "ab"], [1, 1, 1]] and head_tail == [["ahij", "", "ab"], [1, 1, 1]]


def test_encoding_cleans_in_graph():
    enc = Encoding(8, "head", "html")
    assert TOKENIZER.decode(labelled.encode(TOKENIZER, ["a<br />b <i>c</i>"], enc)[0]) == "a\nb c"


def test_sorted_file_sample_and_hold_out_are_random_and_fixed():
    ex = labelled.Examples([f"t{i}" for i in range(100)], ["neg"] * 50 + ["pos"] * 50, "sorted.tsv", list(range(2, 102)))
    first = labelled.Examples(ex.texts[:20], ex.labels[:20], ex.path)
    assert labelled.label_vocabulary(labelled.sample(ex, 20)) == ["neg", "pos"]
    with pytest.raises(labelled.LabelledDataError, match="every example has label 'neg'"):
        labelled.label_vocabulary(first)  # what taking the first N of a sorted file gave
    train, val = labelled.hold_out(ex, 0.2)
    assert len(val.texts) == 20 and len(train.texts) == 80 and not set(val.texts) & set(train.texts)
    assert set(val.labels) == {"neg", "pos"} and val.lines == sorted(val.lines)
    again = labelled.hold_out(ex, 0.2)[1]
    assert again.texts == val.texts
    with pytest.raises(labelled.LabelledDataError, match="holds out 0"):
        labelled.hold_out(ex, 0.001)
    assert np.array_equal(labelled.sample(ex, 20).texts, labelled.sample(ex, 20).texts)
