"""Data preparation speed and memory: 1 and 2 workers and 2 ranks, on IMDB and on ~1 GB of it.

    python tests/benchmarks/prepare_bench.py --output_json=.bench/prepare.json      # or: make bench-prepare

The corpora are ../shared/data/imdb/unsup.jsonl.gz (66 MB of text) and that file repeated 15
times (gzip members back to back: ~1 GB of text), built in a scratch directory and removed at the
end. SentencePiece BPE and WordPiece tokenizers of 8,000 tokens are trained once on IMDB and
reused (--tokenizer_dir), so every run times preparation itself. Each run is its own process:
tokens/s is the manifest's (preparation after start-up), the wall time includes start-up, and
the peak RSS is the largest process's (the launcher's and every rank's, from wait4). The
tokenizer library's own speed on the same reviews (one thread) is the reference.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
IMDB = REPO.parent / "shared" / "data" / "imdb" / "unsup.jsonl.gz"
BIN = pathlib.Path(sys.executable).parent


def env() -> dict:
    out = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return out


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the largest process, output)."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out[-4000:]}")
    return time.time() - started, usage.ru_maxrss / 1024, out


def make_tokenizers(scratch: pathlib.Path) -> dict[str, str]:
    code = f"""
import itertools
from tfllm import tokenizers
from tfllm.data.corpus import Corpus
for kind, name in (("sentencepiece_bpe", "spm_bpe_8000"), ("wordpiece", "wordpiece_8000")):
    texts = (d.text for d in itertools.islice(Corpus([{str(IMDB)!r}]), 20000))
    tokenizers.train_tokenizer(kind, texts, 8000).save({str(scratch)!r} + "/" + name)
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), check=True, capture_output=True)
    return {"sentencepiece_bpe_8000": str(scratch / "spm_bpe_8000"), "wordpiece_8000": str(scratch / "wordpiece_8000")}


def library_speed(tokenizer_dir: str) -> dict:
    """The tokenizer library alone on the reviews: one thread, no preparation around it."""
    code = f"""
import gzip, json, time
from tfllm import tokenizers
docs = [json.loads(line)["text"] for line in gzip.open({str(IMDB)!r}, "rt")]
tok = tokenizers.load_tokenizer({tokenizer_dir!r})
tok.encode_batch(docs[:100])
started = time.time()
n = sum(len(tok.encode_batch(docs[i:i + 256])[0]) for i in range(0, len(docs), 256))
print(json.dumps({{"tokens": n, "tokens_per_sec": n / (time.time() - started)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def text_bytes(path: pathlib.Path) -> int:
    with gzip.open(path, "rb") as f:
        return sum(len(b) for b in iter(lambda: f.read(1 << 24), b""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_json", default="")
    parser.add_argument("--repeat", type=int, default=15, help="copies of the IMDB corpus in the large one")
    parser.add_argument("--scratch", default="", help="scratch directory (default: a new temporary one)")
    args = parser.parse_args()
    scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix="tfllm-prepare-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    records = []
    try:
        large = scratch / f"imdb_x{args.repeat}.jsonl.gz"
        with open(large, "wb") as f:
            for _ in range(args.repeat):
                f.write(IMDB.read_bytes())
        corpora = {"imdb_unsup": IMDB, f"imdb_unsup_x{args.repeat}": large}
        sizes = {name: text_bytes(path) for name, path in corpora.items()}
        toks = make_tokenizers(scratch)
        reference = {name: library_speed(d) for name, d in toks.items()}
        for corpus, path in corpora.items():
            for tok, tok_dir in toks.items():
                for mode, launcher, workers in (("1 worker", [], 1), ("2 workers", [], 2),
                                                ("2 ranks", [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2",
                                                             "--gloo"], 0)):
                    out_dir = scratch / "out"
                    shutil.rmtree(out_dir, ignore_errors=True)
                    cmd = launcher + [sys.executable, "-m", "pipelines.prepare_data", f"--corpus={path}",
                                      f"--tokenizer_dir={tok_dir}", "--seq_len=256", "--num_shards=8",
                                      f"--workers={workers}", f"--data_dir={out_dir}"]
                    wall, rss, _ = timed(cmd)
                    m = json.loads((out_dir / "manifest.json").read_text())
                    tokens = m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"]
                    rec = {"corpus": corpus, "text_mb": round(sizes[corpus] / 1e6, 1), "tokenizer": tok, "mode": mode,
                           "ranks": m["ranks"], "workers": m["workers"], "seconds": m["seconds"],
                           "tokens_per_sec": m["tokens_per_sec"], "mb_per_sec": round(sizes[corpus] / 1e6 / m["seconds"], 2),
                           "wall_seconds": round(wall, 1), "peak_rss_mb": round(rss), "target_tokens": tokens,
                           "library_tokens_per_sec_1_thread": round(reference[tok]["tokens_per_sec"])}
                    records.append(rec)
                    print(f"{corpus:>18} {rec['text_mb']:>7.1f} MB  {tok:<22} {mode:<9} "
                          f"{rec['tokens_per_sec']:>12,.0f} tokens/s {rec['mb_per_sec']:>6.2f} MB/s  "
                          f"{rec['seconds']:>6.1f} s (wall {rec['wall_seconds']:>6.1f} s)  peak RSS {rss:>6,.0f} MB",
                          flush=True)
        for tok, ref in reference.items():
            print(f"library alone, 1 thread: {tok}: {ref['tokens_per_sec']:,.0f} tokens/s")
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.output_json:
        pathlib.Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.output_json).write_text(json.dumps({"runs": records, "library": reference}, indent=1))


if __name__ == "__main__":
    main()
