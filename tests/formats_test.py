import gzip
import os

import numpy as np
import pytest
import zstandard

from tfllm.data import formats
from tfllm.data.corpus import CorpusError


def corpus_bytes(seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    lines = ["".join(rng.choice(list("abcé€ \t"), size=int(rng.choice([0, 1, 5, 30, 200, 2000]))))
             for _ in range(1500)]
    return "\n".join(lines).encode()


def write_all(tmp_path, text: bytes) -> dict:
    files = {"a.txt": text, "a.jsonl": text}
    (tmp_path / "a.txt").write_bytes(text)
    (tmp_path / "a.jsonl").write_bytes(text)
    cut = len(text) // 3
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(text[:cut]) + gzip.compress(text[cut:]))
    files["m.jsonl.gz"] = text
    z = zstandard.ZstdCompressor(write_checksum=True)
    (tmp_path / "m.txt.zst").write_bytes(z.compress(text[:cut]) + z.compress(text[cut:]))
    files["m.txt.zst"] = text
    long_line = b"x" * 10000 + "é".encode() * 3000  # no line break for many blocks
    (tmp_path / "long.txt").write_bytes(long_line)
    files["long.txt"] = long_line
    return files


@pytest.mark.parametrize("block_bytes", [997, 4096, 1 << 20])
def test_blocks_cover_the_file_in_order_and_any_split_of_positions_partitions_them(tmp_path, block_bytes):
    for name, content in write_all(tmp_path, corpus_bytes()).items():
        path = str(tmp_path / name)
        blocks = list(formats.blocks(path, block_bytes=block_bytes))
        assert b"".join(b.data for b in blocks) == content, name
        assert [b.index for b in blocks] == list(range(max(1, -(-len(content) // block_bytes)))), name
        assert blocks[-1].last and not any(b.last for b in blocks[:-1])
        for b in blocks:
            if name.endswith((".jsonl", ".jsonl.gz")):  # a JSONL block starts at a line start
                assert b.start == 0 or content[b.start - 1:b.start] == b"\n" or b.start == len(content)
            else:  # never inside a UTF-8 character
                assert b.start == len(content) or (content[b.start] & 0xC0) != 0x80
            if b.line:
                assert b.line == content[: b.start].count(b"\n") + 1
        size = os.path.getsize(path)
        for cuts in ([0, size + 1], [0, size // 3, size // 2, size + 1], [0, 1, 2, size + 1]):
            shares = [list(formats.blocks(path, lo, hi, block_bytes=block_bytes)) for lo, hi in zip(cuts, cuts[1:])]
            assert [b.index for share in shares for b in share] == [b.index for b in blocks], (name, cuts)


def test_empty_file_is_one_empty_last_block(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b""))
    for name in ("e.txt", "e.jsonl.gz"):
        blocks = list(formats.blocks(str(tmp_path / name)))
        assert [(b.index, b.data, b.last) for b in blocks] == [(0, b"", True)]


def test_compressed_stream_cut_short_at_the_end(tmp_path):
    text = corpus_bytes()
    whole = gzip.compress(text)
    (tmp_path / "t.txt.gz").write_bytes(whole[:-100])
    with pytest.raises(CorpusError, match=r"t\.txt\.gz: truncated gzip data \(the stream ends inside a member"):
        list(formats.blocks(str(tmp_path / "t.txt.gz")))
    frame = zstandard.ZstdCompressor().compress(text)
    (tmp_path / "t.txt.zst").write_bytes(frame[:-50])
    with pytest.raises(CorpusError, match=r"t\.txt\.zst: truncated zstd data"):
        list(formats.blocks(str(tmp_path / "t.txt.zst")))


def test_kinds():
    assert formats.kind("a/b.JSONL.GZ") == ("jsonl", "gz")
    assert formats.kind("x.txt.zst") == ("text", "zst")
    assert formats.kind("x.py") == ("text", "")
    assert formats.kind("train-00000-of-00001.parquet") == ("parquet", "")
