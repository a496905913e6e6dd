import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfllm import tokenizers
from tfllm.config import ConfigError, DataConfig
from tfllm.data import prepare as prep
from tfllm.data import shards
from tfllm.data.corpus import CorpusError


def make_corpus(directory, n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(200)]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (directory / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words, size=rng.integers(20, 120))))
    return directory


def read_windows(data_dir, split):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    dtype = np.uint16 if manifest["dtype"] == "uint16" else np.int32
    shards = [[np.frombuffer(r.numpy(), dtype).astype(np.int32) for r in tf.data.TFRecordDataset(str(data_dir / s["file"]))]
              for s in manifest["splits"][split]["shards"]]
    # round-robin: window i lives in shard i % N at position i // N
    out, i = [], 0
    while True:
        shard, pos = shards[i % len(shards)], i // len(shards)
        if pos >= len(shard):
            return manifest, out
        out.append(shard[pos])
        i += 1


@pytest.fixture
def corpus_dir(tmp_path):
    return make_corpus(tmp_path / "corpus")


def config(corpus_dir, **kw):
    base = dict(corpus=[str(corpus_dir)], tokenizer="char", vocab_size=0, seq_len=16, val_fraction=0.2,
                num_shards=3, seed=1)
    base.update(kw)
    return DataConfig(**base)


def test_manifest_counts_hashes_and_exact_packing(tmp_path, corpus_dir):
    out = tmp_path / "data"
    manifest = prep.prepare(config(corpus_dir), str(out), log=lambda *a: None)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["seq_len"] == 16 and manifest["tokenizer"]["kind"] == "char"
    assert set(manifest["tokenizer"]["files"]) == {"tokenizer.json"}
    assert manifest["config"]["num_shards"] == 3 and manifest["tool_version"]
    assert len(manifest["corpus"]["files"]) == 40 and all(len(f["sha256"]) == 64 for f in manifest["corpus"]["files"])
    total_targets = 0
    for split in ("train", "validation"):
        m, windows = read_windows(out, split)
        info = manifest["splits"][split]
        assert len(windows) == info["windows"] == sum(s["windows"] for s in info["shards"])
        assert max(s["windows"] for s in info["shards"]) - min(s["windows"] for s in info["shards"]) <= 1
        assert all(len(w) == 17 for w in windows)
        for a, b in zip(windows, windows[1:]):  # consecutive windows overlap by one token
            assert a[-1] == b[0]
        targets = sum(int(np.count_nonzero(w[1:] != tokenizers.PAD_ID)) for w in windows)
        assert targets == info["tokens"]
        total_targets += targets
        for s in info["shards"]:
            import hashlib
            assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    # every character plus one <eod> per document is in a stream; the first token of each split is never a target
    chars = sum(len(p.read_text()) for p in corpus_dir.iterdir())
    assert total_targets == chars + 40 - 2


def test_document_split_is_deterministic_and_by_document(tmp_path, corpus_dir):
    a = prep.prepare(config(corpus_dir), str(tmp_path / "a"), log=lambda *a: None)
    b = prep.prepare(config(corpus_dir), str(tmp_path / "b"), log=lambda *a: None)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [s["sha256"] for s in b["splits"]["train"]["shards"]]
    val_docs = [i for i in range(40) if shards.is_val_document(i, 1, 0.2)]
    assert 0 < len(val_docs) < 40
    c = prep.prepare(config(corpus_dir, seed=2), str(tmp_path / "c"), log=lambda *a: None)
    assert c["splits"]["validation"]["tokens"] != a["splits"]["validation"]["tokens"]


def test_tail_split_matches_nanogpt_character_split(tmp_path, shakespeare):
    m = prep.prepare(DataConfig(corpus=[str(shakespeare)], tokenizer="char", vocab_size=0, seq_len=64,
                                val_fraction=0.1, split="tail", num_shards=2), str(tmp_path / "d"), log=lambda *a: None)
    assert m["vocab_size"] == 65 + 3
    # nanoGPT: 1,003,854 train and 111,540 val characters; each split predicts all but its first
    # token, plus the <eod> that closes the document (it falls in validation)
    assert m["splits"]["train"]["tokens"] == 1_003_854
    assert m["splits"]["validation"]["tokens"] == 111_540


@pytest.mark.parametrize("kind,vocab", [("byte", 0), ("wordpiece", 60), ("sentencepiece_bpe", 40)])
def test_other_tokenizers_prepare(tmp_path, corpus_dir, kind, vocab):
    m = prep.prepare(config(corpus_dir, tokenizer=kind, vocab_size=vocab), str(tmp_path / kind), log=lambda *a: None)
    assert m["tokenizer"]["kind"] == kind and m["splits"]["train"]["windows"] > 3
    tok = tokenizers.load_tokenizer(str(tmp_path / kind / "tokenizer"))
    assert tok.vocab_size == m["vocab_size"]


def test_refuses_existing_output_and_keeps_it(tmp_path, corpus_dir):
    out = tmp_path / "data"
    prep.prepare(config(corpus_dir), str(out), log=lambda *a: None)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="exists.*--overwrite"):
        prep.prepare(config(corpus_dir, seq_len=8), str(out), log=lambda *a: None)
    assert (out / "manifest.json").read_bytes() == before
    prep.prepare(config(corpus_dir, seq_len=8, overwrite=True), str(out), log=lambda *a: None)
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 8


def test_interrupted_run_keeps_previous_output_and_a_rerun_reuses_its_parts(tmp_path, corpus_dir, monkeypatch):
    out = tmp_path / "data"
    first = prep.prepare(config(corpus_dir), str(out), log=lambda *a: None)
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if name != "tokenizer"}
    calls = []
    extend = shards.Packer.extend

    def boom(self, tokens):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        extend(self, tokens)
    monkeypatch.setattr(shards.Packer, "extend", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(config(corpus_dir, overwrite=True), str(out), log=lambda *a: None)
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if name != "tokenizer"} == before
    # nothing that looks like a dataset: only the finished parts, for the rerun
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data", "data.parts"]
    assert not (tmp_path / "data.parts" / prep.MANIFEST).exists()
    monkeypatch.setattr(shards.Packer, "extend", extend)
    said = []
    again = prep.prepare(config(corpus_dir, overwrite=True), str(out), log=said.append)
    assert any(line.startswith("reused 40 of") for line in said)
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in first["splits"]["train"]["shards"]]
    assert sorted(os.listdir(tmp_path)) == ["corpus", "data"]


def test_bad_inputs_are_clear_errors(tmp_path, corpus_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        prep.prepare(config(corpus_dir, corpus=[str(tmp_path / "empty.txt")]), str(tmp_path / "o1"), log=lambda *a: None)
    with pytest.raises(ConfigError, match="--num_shards=4000: more shards than the"):
        prep.prepare(config(corpus_dir, num_shards=4000), str(tmp_path / "o2"), log=lambda *a: None)
    (tmp_path / "one.txt").write_text("a single document " * 50)
    with pytest.raises(ConfigError, match="validation split is empty.*--split=tail"):
        prep.prepare(config(corpus_dir, corpus=[str(tmp_path / "one.txt")], num_shards=1),
                     str(tmp_path / "o3"), log=lambda *a: None)
    # Settings errors found while assembling keep the tokenized parts: fixing the flag reuses them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "empty.txt", "o2.parts", "o3.parts", "one.txt"]
    said = []
    prep.prepare(config(corpus_dir), str(tmp_path / "o2"), log=said.append)
    assert any(line.startswith("reused 40 of") for line in said) and not (tmp_path / "o2.parts").exists()


def test_ensure_prepared_reuses_or_refuses(tmp_path, corpus_dir):
    cfg = config(corpus_dir, data_dir=str(tmp_path / "d"))
    first = prep.ensure_prepared(cfg, log=lambda *a: None)
    assert prep.ensure_prepared(cfg, log=lambda *a: None)["created"] == first["created"]
    cfg.seq_len = 8
    with pytest.raises(ConfigError, match="prepared with other settings \\(seq_len\\)"):
        prep.ensure_prepared(cfg, log=lambda *a: None)


def test_window_stride_overlaps_windows_and_still_covers_every_token(tmp_path, corpus_dir):
    base = prep.prepare(config(corpus_dir, num_shards=1, val_fraction=0.0), str(tmp_path / "a"), log=lambda *a: None)
    m = prep.prepare(config(corpus_dir, num_shards=1, val_fraction=0.0, window_stride=4), str(tmp_path / "b"),
                     log=lambda *a: None)
    assert m["window_stride"] == 4 and base["window_stride"] == 16
    _, windows = read_windows(tmp_path / "b", "train")
    _, plain = read_windows(tmp_path / "a", "train")
    for a, b in zip(windows, windows[1:]):
        assert np.array_equal(a[4:], b[:13]) or b[-1] == tokenizers.PAD_ID  # next window starts 4 tokens later
    stream = np.concatenate([plain[0]] + [w[1:] for w in plain[1:]])
    stream = stream[stream != tokenizers.PAD_ID]
    rebuilt = np.concatenate([windows[0]] + [w[-4:] for w in windows[1:-1]])
    assert np.array_equal(rebuilt, stream[: len(rebuilt)])
    tail = windows[-1][windows[-1] != tokenizers.PAD_ID]
    assert np.array_equal(tail[-3:], stream[-3:])  # the last tokens are in the final (padded) window
    assert 3.5 < len(windows) / len(plain) < 4.5


def test_window_stride_leaves_validation_one_prediction_per_token(tmp_path, corpus_dir):
    a = prep.prepare(config(corpus_dir), str(tmp_path / "a"), log=lambda *a: None)
    b = prep.prepare(config(corpus_dir, window_stride=4), str(tmp_path / "b"), log=lambda *a: None)
    assert b["splits"]["validation"] == a["splits"]["validation"]
    assert b["splits"]["train"]["tokens"] > 3 * a["splits"]["train"]["tokens"]


def test_saved_tokenizer_is_reused_instead_of_trained(tmp_path, corpus_dir):
    saved = tokenizers.train_tokenizer("wordpiece", iter(["jihgfedcba " * 50, "abc def ghij"]), 36)
    saved.save(str(tmp_path / "tok"))
    cfg = config(corpus_dir, tokenizer="char", tokenizer_dir=str(tmp_path / "tok"))
    manifest = prep.prepare(cfg, str(tmp_path / "data"), log=lambda *a: None)
    assert manifest["tokenizer"]["kind"] == "wordpiece" and manifest["vocab_size"] == saved.vocab_size
    assert manifest["config"]["tokenizer_dir"] == str(tmp_path / "tok")
    targets = 0
    for split in ("train", "validation"):
        targets += sum(int(np.count_nonzero(w[1:] != tokenizers.PAD_ID)) for w in read_windows(tmp_path / "data", split)[1])
    # every document in the saved tokenizer's ids plus one <eod>, less each split's first token
    assert targets == sum(len(saved.encode(p.read_text())) + 1 for p in corpus_dir.iterdir()) - 2

    with pytest.raises(ConfigError, match=r"--tokenizer_dir=.*absent: no tokenizer.json there"):
        prep.prepare(config(corpus_dir, tokenizer_dir=str(tmp_path / "absent")), str(tmp_path / "data2"),
                     log=lambda *a: None)
    assert not (tmp_path / "data2").exists()
