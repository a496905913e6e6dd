import gzip
import json

import pytest

from tfllm.config import ConfigError, DataConfig
from tfllm.data.corpus import BUILTIN_STDLIB, Corpus, CorpusError, resolve_files


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_txt_jsonl_gz_directories_and_globs(tmp_path):
    write(tmp_path / "a.txt", b"first doc")
    write(tmp_path / "sub" / "b.jsonl", b'{"text": "x1"}\n\n{"text": "x2", "other": 1}\n')
    with gzip.open(tmp_path / "c.txt.gz", "wb") as f:
        f.write("gz doc ü".encode())
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
        f.write(b'{"body": "in body"}\n')
    docs = [d.text for d in Corpus([str(tmp_path / "a.txt"), str(tmp_path / "sub"), str(tmp_path / "c.txt.gz")])]
    assert docs == ["first doc", "x1", "x2", "gz doc ü"]
    assert [d.text for d in Corpus([str(tmp_path / "*.jsonl.gz")], jsonl_field="body")] == ["in body"]


def test_files_are_deduplicated_and_sorted(tmp_path):
    for n in "cab":
        write(tmp_path / f"{n}.txt", n.encode())
    files = resolve_files([str(tmp_path), str(tmp_path / "a.txt")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.txt", "b.txt", "c.txt"]


def test_builtin_stdlib_corpus_exists_without_downloads():
    corpus = Corpus([BUILTIN_STDLIB], max_bytes=200_000)
    docs = list(corpus)
    assert docs and sum(len(d.text) for d in docs) >= 200_000
    assert all(d.source.endswith(".py") for d in docs)


def test_missing_path_empty_glob_and_unknown_builtin(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        resolve_files([str(tmp_path / "nope.txt")])
    with pytest.raises(CorpusError, match="matches no files"):
        resolve_files([str(tmp_path / "*.txt")])
    with pytest.raises(ConfigError, match="unknown built-in"):
        resolve_files(["builtin:nope"])


def test_invalid_utf8_strict_names_file_and_offset(tmp_path):
    bad = write(tmp_path / "bad.txt", b"hello \xff world")
    with pytest.raises(CorpusError, match=r"bad.txt: invalid UTF-8 at byte offset 6"):
        list(Corpus([str(bad)]))
    assert [d.text for d in Corpus([str(bad)], on_decode_error="replace")] == ["hello \ufffd world"]
    good = write(tmp_path / "good.txt", b"fine")
    corpus = Corpus([str(bad), str(good)], on_decode_error="skip")
    assert [d.text for d in corpus] == ["fine"] and corpus.skipped == 1


def test_invalid_utf8_in_jsonl_names_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: invalid UTF-8 at byte offset 25"):
        list(Corpus([str(bad)]))


def test_jsonl_without_the_field_or_broken_json(tmp_path):
    write(tmp_path / "a.jsonl", json.dumps({"body": "x"}).encode() + b"\n")
    with pytest.raises(CorpusError, match="no string field 'text'"):
        list(Corpus([str(tmp_path / "a.jsonl")]))
    write(tmp_path / "b.jsonl", b"{oops\n")
    with pytest.raises(CorpusError, match="b.jsonl:1: not valid JSON"):
        list(Corpus([str(tmp_path / "b.jsonl")]))


def test_tsv_reads_the_named_column_of_each_row_after_the_header(tmp_path):
    rows = b"label\tsentence\n0\thide new secretions\n\n1\tit does n't matter -lrb- much -rrb-\r\n1\t\n"
    write(tmp_path / "train.tsv", rows)
    with gzip.open(tmp_path / "train.tsv.gz", "wb") as f:
        f.write(b"\xef\xbb\xbf" + rows)  # a byte-order mark before the header, as some exporters write
    for name in ("train.tsv", "train.tsv.gz"):
        assert [d.text for d in Corpus([str(tmp_path / name)], tsv_column="sentence")] == [
            "hide new secretions", "it does n't matter -lrb- much -rrb-"]
    assert [d.text for d in Corpus([str(tmp_path / "train.tsv")], tsv_column="sentence", clean="ptb")][1] == (
        "it doesn't matter (much)")
    # A directory's .tsv files are tables, not text, unless named: its .txt is all it holds
    write(tmp_path / "notes.txt", b"notes")
    assert [d.text for d in Corpus([str(tmp_path)])] == ["notes"]


def test_tsv_errors_name_the_file_and_line(tmp_path):
    write(tmp_path / "a.tsv", b"label\tsentence\n0\tfine\n1\tone\ttab too many\n")
    with pytest.raises(CorpusError, match=r"a.tsv: no column 'text' \(columns: label, sentence; see --tsv_column\)"):
        list(Corpus([str(tmp_path / "a.tsv")]))
    with pytest.raises(CorpusError, match=r"a.tsv:3: 3 tab-separated fields, the header names 2"):
        list(Corpus([str(tmp_path / "a.tsv")], tsv_column="sentence"))
    write(tmp_path / "empty.tsv", b"")
    with pytest.raises(CorpusError, match=r"empty.tsv: empty; a .tsv file starts with a header line"):
        list(Corpus([str(tmp_path / "empty.tsv")]))
    write(tmp_path / "html.tsv", b"text\n<p>kept</p>\n<br /><br />\n")
    with pytest.raises(CorpusError, match=r"html.tsv:3: the text is empty after --clean=html"):
        list(Corpus([str(tmp_path / "html.tsv")], clean="html"))
    with pytest.raises(ConfigError, match=r"--tsv_column='': name the text field or column"):
        DataConfig(corpus=[str(tmp_path / "a.tsv")], tsv_column="").validate()


def test_a_list_of_names_reads_the_first_each_file_or_record_has(tmp_path):
    """GLUE's SST-2 calls its text `sentence` in train.tsv and `content` in dev.tsv; one flag reads both."""
    write(tmp_path / "train.tsv", b"label\tsentence\n1\tgood\n")
    write(tmp_path / "dev.tsv", b"content\tlabel\nbad\t0\n")
    write(tmp_path / "mixed.jsonl", b'{"body": "b1", "text": "t1"}\n{"text": "t2"}\n')
    files = [str(tmp_path / n) for n in ("train.tsv", "dev.tsv")]
    assert [d.text for d in Corpus(files, tsv_column="sentence,content")] == ["good", "bad"]
    assert [d.text for d in Corpus([str(tmp_path / "mixed.jsonl")], jsonl_field="body,text")] == ["b1", "t2"]
    with pytest.raises(CorpusError, match=r"dev.tsv: no column 'sentence' or 'text' \(columns: content, label"):
        list(Corpus(files, tsv_column="sentence,text"))
    with pytest.raises(CorpusError, match=r"mixed.jsonl:2: no string field 'body' or 'title'"):
        list(Corpus([str(tmp_path / "mixed.jsonl")], jsonl_field="body,title"))
    for flag in ("jsonl_field", "parquet_column", "tsv_column"):
        with pytest.raises(ConfigError, match=f"--{flag}='text,': name the text field or column"):
            DataConfig(corpus=files, **{flag: "text,"}).validate()
        with pytest.raises(ConfigError, match=f"--{flag}='text, ': name the text field or column"):
            DataConfig(corpus=files, **{flag: "text, "}).validate()


def test_a_list_of_names_drops_edge_spaces_skips_non_strings_and_reads_a_name_with_a_comma(tmp_path):
    write(tmp_path / "train.tsv", b"label\tsentence\n1\tgood\n")
    write(tmp_path / "dev.tsv", b"content\tlabel\nbad\t0\n")
    write(tmp_path / "null.jsonl", b'{"body": null, "text": "t1"}\n{"body": 3, "text": "t2"}\n{"body": "b3"}\n')
    write(tmp_path / "comma.tsv", b"label\ttitle, text\n1\tkept whole\n")
    files = [str(tmp_path / n) for n in ("train.tsv", "dev.tsv")]
    assert [d.text for d in Corpus(files, tsv_column="sentence, content")] == ["good", "bad"]
    assert [d.text for d in Corpus([str(tmp_path / "null.jsonl")], jsonl_field="body,text")] == ["t1", "t2", "b3"]
    assert [d.text for d in Corpus([str(tmp_path / "comma.tsv")], tsv_column="title, text")] == ["kept whole"]
