"""Preparation at scale: the same bytes for any number of workers, bounded memory, every input format."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SHARED, run, subprocess_env
from tfllm.config import DataConfig
from tfllm.data import formats
from tfllm.data import prepare as prep
from tfllm.data.corpus import Corpus, CorpusError

IMDB_TRAIN = SHARED / "data" / "imdb" / "train.jsonl.gz"


def quiet(*_):
    pass


def data_only(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in prep.RUN_FIELDS}


def shard_bytes(data_dir) -> dict:
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.suffix == ".tfrecord"}


@pytest.fixture
def mixed_corpus(tmp_path):
    """Every text format, several blocks each (blocks of 4 KiB here), a multi-member gzip."""
    import zstandard

    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijé"), size=rng.integers(1, 9))) for _ in range(300)]

    def text(n):
        return " ".join(rng.choice(words, size=n))

    lines = [json.dumps({"text": text(int(rng.integers(1, 120)))}) for _ in range(300)]
    with open(root / "a.jsonl.gz", "wb") as f:  # two gzip members, as `cat x.gz y.gz` makes
        f.write(gzip.compress("\n".join(lines[:150]).encode() + b"\n"))
        f.write(gzip.compress("\n".join(lines[150:]).encode() + b"\n"))
    (root / "b.txt").write_text("\n".join(text(30) for _ in range(200)))  # one document of several blocks
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "\n".join(json.dumps({"text": text(50)}) for _ in range(100)).encode()))
    (root / "d.jsonl").write_text("\n".join(lines[::3]) + "\n")
    return root


def mixed_config(corpus, **kw):
    base = dict(corpus=[str(corpus)], tokenizer="sentencepiece_bpe", vocab_size=300, seq_len=32, num_shards=3,
                val_fraction=0.1)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("split", ["document", "tail"])
def test_any_number_of_workers_gives_identical_shards_and_manifest(tmp_path, mixed_corpus, monkeypatch, split):
    monkeypatch.setattr(formats, "BLOCK_BYTES", 4096)
    outs = {}
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        outs[workers] = (prep.prepare(mixed_config(mixed_corpus, workers=workers, split=split), str(out), log=quiet),
                         shard_bytes(out))
        assert outs[workers][0]["workers"] == workers
    assert data_only(outs[1][0]) == data_only(outs[2][0]) == data_only(outs[4][0])
    assert outs[1][1] == outs[2][1] == outs[4][1]
    assert outs[1][0]["corpus"]["documents"] == 300 + 1 + 100 + 100
    assert outs[1][0]["splits"]["validation"]["windows"] > 0


def test_blocks_give_the_documents_of_a_front_to_back_read(tmp_path, mixed_corpus, monkeypatch):
    """The packed stream is the corpus' documents in order, whatever the block size."""
    cfg = dict(tokenizer="char", vocab_size=0, val_fraction=0.0)
    whole = prep.prepare(mixed_config(mixed_corpus, **cfg), str(tmp_path / "w"), log=quiet)
    monkeypatch.setattr(formats, "BLOCK_BYTES", 4096)
    blocked = prep.prepare(mixed_config(mixed_corpus, tokenizer_dir=str(tmp_path / "w" / "tokenizer"), **cfg),
                           str(tmp_path / "b"), log=quiet)
    # char ids do not depend on where text is cut, so the shards equal those of whole-file reads
    assert blocked["splits"] == whole["splits"]
    docs = list(Corpus([str(mixed_corpus)]))
    assert whole["corpus"]["characters"] == sum(len(d.text) for d in docs)
    assert whole["corpus"]["documents"] == len(docs) == 501
    # every character, plus one <eod> per document, is a target, but the stream's first token
    assert whole["splits"]["train"]["tokens"] == whole["corpus"]["characters"] + len(docs) - 1


def test_parquet_and_zstd_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [f"review {i}: " + "good " * (i % 7) for i in range(500)]
    pq.write_table(pa.table({"id": list(range(500)), "content": texts}), tmp_path / "r.parquet", row_group_size=64)
    jsonl = "\n".join(json.dumps({"text": t}) for t in texts).encode()
    (tmp_path / "r.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    assert [d.text for d in Corpus([str(tmp_path / "r.parquet")], parquet_column="content")] == texts
    assert [d.text for d in Corpus([str(tmp_path / "r.parquet")], parquet_column="text,content")] == texts
    assert [d.text for d in Corpus([str(tmp_path / "r.jsonl.zst")])] == texts
    a = prep.prepare(DataConfig(corpus=[str(tmp_path / "r.parquet")], parquet_column="content", num_shards=2),
                     str(tmp_path / "pq"), log=quiet)
    b = prep.prepare(DataConfig(corpus=[str(tmp_path / "r.jsonl.zst")], num_shards=2), str(tmp_path / "zst"), log=quiet)
    assert a["splits"] == b["splits"] and a["corpus"]["documents"] == 500


def test_tsv_in_blocks_prepares_like_jsonl(tmp_path, monkeypatch):
    """A labelled .tsv (header, then label and text) gives the shards of its text column as JSONL."""
    texts = [f"phrase {i} " + "so good " * (i % 9) for i in range(400)]
    (tmp_path / "train.tsv").write_text("label\tsentence\n" + "".join(f"{i % 2}\t{t}\n" for i, t in enumerate(texts)))
    with gzip.open(tmp_path / "train.tsv.gz", "wt") as f:
        f.write((tmp_path / "train.tsv").read_text())
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    monkeypatch.setattr(formats, "BLOCK_BYTES", 2048)  # ten blocks: only block 0 holds the header
    cfg = dict(tokenizer="char", vocab_size=0, num_shards=2, val_fraction=0.1)
    want = prep.prepare(DataConfig(corpus=[str(tmp_path / "train.jsonl")], **cfg), str(tmp_path / "j"), log=quiet)
    for name, workers in (("train.tsv", 1), ("train.tsv", 3), ("train.tsv.gz", 2)):
        assert [d.text for d in Corpus([str(tmp_path / name)], tsv_column="sentence")] == texts
        got = prep.prepare(DataConfig(corpus=[str(tmp_path / name)], tsv_column="sentence", workers=workers, **cfg),
                           str(tmp_path / f"{name}-{workers}"), log=quiet)
        assert got["splits"] == want["splits"] and got["corpus"]["documents"] == 400


def test_tokenizer_sample_spans_every_file(tmp_path):
    for name, letter in (("a.txt", "a"), ("b.txt", "b"), ("c.txt", "c")):
        (tmp_path / name).write_text((letter + " ") * 5000)
    cfg = DataConfig(corpus=[str(tmp_path)], tokenizer="char", vocab_size=0, tokenizer_sample_bytes=3000,
                     num_shards=1, split="tail")
    m = prep.prepare(cfg, str(tmp_path / "out"), log=quiet)
    # a 3,000-character sample read front to back would hold only 'a' and ' '
    assert json.loads((tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text())["chars"] == [" ", "a", "b", "c"]
    assert m["vocab_size"] == 3 + 4


BAD_INPUTS = {
    "parquet without the column": ("t.parquet", r"t\.parquet: no column 'text' \(columns: body"),
    "corrupt zstd": ("t.jsonl.zst", r"t\.jsonl\.zst: corrupt zstd data in compressed bytes 0-"),
    "gzip member truncated mid-file": ("t.jsonl.gz", r"t\.jsonl\.gz: corrupt gzip data in compressed bytes 0-"),
    "jsonl line that is not JSON": ("t.jsonl", r"t\.jsonl:3: not valid JSON \(Expecting ',' delimiter at column 17; the line starts at byte offset 44\)"),
}


def write_bad(path):
    good = b'{"text": "first review"}\n{"text": "second"}\n'
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": ["x", "y"]}), path)
    elif path.name.endswith(".zst"):
        import zstandard
        blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(good * 50))  # as the zstd CLI writes
        blob[len(blob) // 2: len(blob) // 2 + 8] = b"\xff" * 8
        path.write_bytes(bytes(blob))
    elif path.name.endswith(".gz"):
        first = gzip.compress(good * 200)
        path.write_bytes(first[: len(first) // 2] + gzip.compress(good))  # a member cut short, then another
    else:
        path.write_bytes(good + b'{"text": "third"\n')


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_and_position_and_keeps_earlier_data(tmp_path, case):
    name, pattern = BAD_INPUTS[case]
    (tmp_path / "good.txt").write_text("some earlier text " * 200)
    out = tmp_path / "data"
    prep.prepare(DataConfig(corpus=[str(tmp_path / "good.txt")], num_shards=1, split="tail"), str(out), log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = tmp_path / "bad" / name
    bad.parent.mkdir()
    write_bad(bad)
    with pytest.raises(CorpusError, match=pattern):
        prep.prepare(DataConfig(corpus=[str(bad.parent)], num_shards=1, overwrite=True), str(out), log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_bad_input_is_one_error_line_from_the_command(tmp_path):
    bad = tmp_path / "t.jsonl"
    write_bad(bad)
    proc = run(["-m", "pipelines.prepare_data", f"--corpus={bad}", f"--data_dir={tmp_path / 'd'}"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "t.jsonl:3: not valid JSON" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "d").exists()


def peak_rss_mb(args) -> float:
    """Runs pipelines.prepare_data as its own process; returns that process' peak RSS."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.prepare_data", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out[-3000:]
    return usage.ru_maxrss / 1024


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    once = tmp_path / "x1.jsonl.gz"
    once.write_bytes(IMDB_TRAIN.read_bytes())
    four = tmp_path / "x4.jsonl.gz"
    four.write_bytes(IMDB_TRAIN.read_bytes() * 4)  # gzip members back to back: the corpus four times
    common = ["--tokenizer=sentencepiece_bpe", "--vocab_size=512", "--tokenizer_sample_bytes=2000000", "--seq_len=64",
              "--num_shards=4", "--workers=2"]
    rss1 = peak_rss_mb([f"--corpus={once}", f"--data_dir={tmp_path / 'd1'}", *common])
    rss4 = peak_rss_mb([f"--corpus={four}", f"--data_dir={tmp_path / 'd4'}", *common])
    m1 = json.loads((tmp_path / "d1" / "manifest.json").read_text())
    m4 = json.loads((tmp_path / "d4" / "manifest.json").read_text())
    assert m4["corpus"]["documents"] == 4 * m1["corpus"]["documents"] > 20_000
    print(f"peak RSS: {rss1:.0f} MB for 1x, {rss4:.0f} MB for 4x the corpus")
    assert abs(rss4 - rss1) < 0.10 * rss1, (rss1, rss4)
