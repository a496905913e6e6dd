"""Preparation under horovodrun and mpirun: every rank tokenizes its share, the result is one process's."""

import gzip
import json

import pytest

from conftest import SHAKESPEARE, SHARED, run

pytestmark = pytest.mark.slow

RUN_FIELDS = ("created", "seconds", "tokens_per_sec", "workers", "ranks", "peak_rss_mb")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks-corpus")
    (root / "a.txt").write_bytes(SHAKESPEARE.read_bytes())
    with gzip.open(SHARED / "data" / "imdb" / "train.jsonl.gz", "rt") as f:
        lines = [next(f) for _ in range(6000)]
    (root / "b.jsonl").write_text("".join(lines))  # ~8 MB: two blocks, so the second rank has work
    return root


def prepare(corpus, out, launcher, *extra):
    proc = run(["-m", "pipelines.prepare_data", f"--corpus={corpus}", f"--data_dir={out}", "--tokenizer=sentencepiece_bpe",
                "--vocab_size=400", "--tokenizer_sample_bytes=1000000", "--seq_len=64", "--num_shards=4", *extra],
               launcher=launcher)
    return json.loads((out / "manifest.json").read_text()), proc


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_two_ranks_prepare_what_one_process_prepares(corpus, tmp_path, launcher):
    one, _ = prepare(corpus, tmp_path / "one", "none", "--workers=1")
    two, proc = prepare(corpus, tmp_path / "two", launcher)
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert {k: v for k, v in one.items() if k not in RUN_FIELDS} == {k: v for k, v in two.items() if k not in RUN_FIELDS}
    for shard in one["splits"]["train"]["shards"] + one["splits"]["validation"]["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()
    assert proc.stdout.count("prepared ") == 1  # rank 0 alone reports
    assert not (tmp_path / "two.parts").exists()


def test_a_bad_file_stops_every_rank_with_its_error(corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(SHAKESPEARE.read_bytes())
    (bad / "b.jsonl").write_bytes((corpus / "b.jsonl").read_bytes() + b'{"text": broken\n')
    proc = run(["-m", "pipelines.prepare_data", f"--corpus={bad}", f"--data_dir={tmp_path / 'out'}",
                "--tokenizer_dir=", "--tokenizer=char", "--vocab_size=0", "--num_shards=2"],
               launcher="gloo", check=False, timeout=300)
    assert proc.returncode != 0
    assert "b.jsonl:6001: not valid JSON" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()
