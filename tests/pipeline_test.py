"""The per-rank input: each rank's stream is a pure function of (rank, size), so ranks are
exercised here in one process exactly as each process of a 2-rank job computes them."""

import collections
import itertools

import pytest

from prepare_test import make_corpus
from tfllm.config import DataConfig
from tfllm.data.pipeline import DataError, WindowDataset
from tfllm.data.prepare import prepare


def prepared(tmp_path_factory, num_shards):
    tmp = tmp_path_factory.mktemp(f"shards{num_shards}")
    cfg = DataConfig(corpus=[str(make_corpus(tmp / "corpus", n_docs=30))], tokenizer="char", vocab_size=0,
                     seq_len=8, val_fraction=0.1, num_shards=num_shards)
    prepare(cfg, str(tmp / "data"), log=lambda *a: None)
    return str(tmp / "data")


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    return prepared(tmp_path_factory, 4)


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    return prepared(tmp_path_factory, 3)


def rows(batch):
    return [tuple(r) for r in batch.numpy().tolist()]


def epoch_rows(ds, epoch, rank, size, batch, seed=0):
    return [r for b in ds.epoch(epoch, rank, size, batch, seed, shuffle_buffer=64) for r in rows(b)]


def all_windows(ds):
    return [r for b in ds.epoch(0, 0, 1, 1, shuffle=False, drop_remainder=False) for r in rows(b)]


@pytest.mark.parametrize("fixture,size,element_level", [("four_shards", 1, False), ("four_shards", 2, False),
                                                         ("three_shards", 2, True)])
def test_one_epoch_covers_every_window_once(request, fixture, size, element_level):
    ds = WindowDataset(request.getfixturevalue(fixture))
    everything = collections.Counter(all_windows(ds))
    assert sum(everything.values()) == ds.num_windows
    batch = 3
    plan = ds.plan(0, 0, size, batch, 0)
    assert plan.element_level == element_level
    seen = collections.Counter(itertools.chain.from_iterable(epoch_rows(ds, 0, r, size, batch) for r in range(size)))
    assert sum(seen.values()) == plan.steps * batch * size  # equal steps on every rank
    assert not seen - everything  # nothing read twice (as a multiset: short windows can repeat)
    # only the remainder that does not fill a step on every rank is left for this epoch
    assert ds.num_windows - sum(seen.values()) < size * batch + (0 if element_level else max(s["windows"] for s in ds.shards))


def test_full_batches_cover_everything_when_divisible(four_shards):
    ds = WindowDataset(four_shards)
    n = ds.num_windows
    divisor = next(b for b in range(2, 50) if all(s["windows"] % b == 0 for s in ds.shards)) \
        if all(s["windows"] == ds.shards[0]["windows"] for s in ds.shards) else None
    if divisor is None:  # shards differ by one window: batch 1 on 1 rank still covers all
        seen = epoch_rows(ds, 0, 0, 1, 1)
    else:
        seen = epoch_rows(ds, 0, 0, 2, divisor) + epoch_rows(ds, 0, 1, 2, divisor)
    assert collections.Counter(seen) == collections.Counter(all_windows(ds)) and len(seen) == n


def test_epochs_reshuffle_deterministically(four_shards):
    ds = WindowDataset(four_shards)
    e0, e0_again, e1 = epoch_rows(ds, 0, 0, 2, 4), epoch_rows(ds, 0, 0, 2, 4), epoch_rows(ds, 1, 0, 2, 4)
    assert e0 == e0_again and e0 != e1 and sorted(e0) != sorted(epoch_rows(ds, 0, 1, 2, 4))
    assert epoch_rows(ds, 0, 0, 2, 4, seed=5) != e0


@pytest.mark.parametrize("fixture,size", [("four_shards", 1), ("four_shards", 2), ("three_shards", 2)])
def test_resume_continues_exactly_across_epochs(request, fixture, size):
    ds = WindowDataset(request.getfixturevalue(fixture))
    batch = 4
    per_epoch = ds.plan(0, 0, size, batch, 0).steps
    total = 2 * per_epoch + 5  # crosses two epoch boundaries
    for rank in range(size):
        straight = [(e, rows(b)) for e, b in itertools.islice(ds.stream(0, rank, size, batch, 0, 64), total)]
        for stop in (1, per_epoch - 1, per_epoch, per_epoch + 3):
            resumed = [(e, rows(b)) for e, b in itertools.islice(ds.stream(stop, rank, size, batch, 0, 64), total - stop)]
            assert resumed == straight[stop:], f"rank {rank} resumed at {stop}"


def test_truncated_and_corrupt_shards(tmp_path, four_shards):
    import shutil
    data = tmp_path / "d"
    shutil.copytree(four_shards, data)
    shard = sorted(data.glob("train-*"))[1]
    blob = bytearray(shard.read_bytes())
    blob[40] ^= 0xFF  # same size, flipped byte
    shard.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=f"{shard.name}: sha256 does not match"):
        WindowDataset(str(data), verify=True)
    ds = WindowDataset(str(data))  # sizes still match: found while reading
    with pytest.raises(DataError, match="corrupt record in split 'train'.*--verify_data"):
        for _ in ds.stream(0, 0, 1, 4, 0, 64):
            pass
    shard.write_bytes(bytes(blob[:-10]))
    with pytest.raises(DataError, match=f"{shard.name}: shard is .* bytes, the manifest says"):
        WindowDataset(str(data))
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        WindowDataset(str(data))


def test_too_little_data_for_one_global_batch(four_shards):
    ds = WindowDataset(four_shards)
    with pytest.raises(DataError, match="fewer than one global batch"):
        next(ds.stream(0, 0, 2, ds.num_windows, 0))


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        WindowDataset(str(tmp_path))


def test_default_shuffle_buffer_spans_the_whole_split(four_shards):
    ds = WindowDataset(four_shards)
    order = {w: i for i, w in enumerate(all_windows(ds))}  # position in corpus order (last one wins)

    def spread(buffer):
        first = [r for b in itertools.islice(ds.epoch(0, 0, 1, 16, 0, shuffle_buffer=buffer), 2) for r in rows(b)]
        positions = [order[r] for r in first]
        return (max(positions) - min(positions)) / ds.num_windows

    assert spread(0) > 0.5  # the automatic buffer draws the first batches from the whole split
    assert spread(8) < 0.2  # a small buffer keeps them in one stretch of text


def test_epochs_run_without_tf_data_autotuning(four_shards):
    """Autotuning made destroying each epoch's iterator wait up to 60 s for its sleeping thread."""
    ds = WindowDataset(four_shards)
    assert ds.epoch(0, 0, 1, 16, 0).options().autotune.enabled is False
    assert ds.epoch(0, 0, 1, 16, 0, shuffle=False, drop_remainder=False).options().autotune.enabled is False


def test_raw_text_evaluation_windows_run_without_tf_data_autotuning(tmp_path):
    from tfllm.evaluate import TextWindows

    class CodePoints:
        def encode(self, text):
            return [3 + ord(c) % 50 for c in text]

    path = tmp_path / "text.txt"
    path.write_text("to be, or not to be: that is the question\n" * 20, encoding="utf-8")
    ds = TextWindows(str(path), CodePoints(), seq_len=16).epoch(0, batch_size=4)
    assert ds.options().autotune.enabled is False


def test_raw_text_evaluation_reads_the_file_as_the_models_data_was(tmp_path):
    """A .tsv or .jsonl text file is read by the model's data fields: one document per row or record."""
    import json

    from tfllm.evaluate import TextWindows

    class CodePoints:
        def encode(self, text):
            return [3 + ord(c) % 50 for c in text]

    rows = ["a gripping , funny film .", "dull and overlong .", "the cast is superb ."]
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t1\n" for r in rows), encoding="utf-8")
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"review": r}) + "\n" for r in rows), encoding="utf-8")
    from_tsv = TextWindows(str(tmp_path / "dev.tsv"), CodePoints(), 16, DataConfig(tsv_column="sentence"))
    from_jsonl = TextWindows(str(tmp_path / "dev.jsonl"), CodePoints(), 16, DataConfig(jsonl_field="review"))
    assert from_tsv.windows.tolist() == from_jsonl.windows.tolist()
    detokenized = ["a gripping, funny film.", "dull and overlong.", "the cast is superb."]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in detokenized))
    cleaned = TextWindows(str(tmp_path / "dev.tsv"), CodePoints(), 16, DataConfig(tsv_column="sentence", clean="ptb"))
    assert cleaned.windows.tolist() == TextWindows(str(tmp_path / "plain.jsonl"), CodePoints(), 16).windows.tolist()
