"""How precise is nanoGPT's published validation loss? Scores a trained model both ways.

nanoGPT's `estimate_loss` averages 20 batches of 12 windows drawn at random offsets of the
validation text; tfllm's evaluation scores every validation token once. This script computes
the loss of every window at every `--offset_stride`-th offset of the validation text, then
redraws nanoGPT's 240-window estimate many times, printing its mean and spread next to the
full-split loss. Not a test: a figure for the Shakespeare benchmark's closing note.
    python tests/benchmarks/nanogpt_estimate.py runs/shakespeare ../shared/data/tinyshakespeare.txt
"""

import argparse

import numpy as np
import tensorflow as tf

from tfllm.evaluate import make_eval_fn
from tfllm.restore import load_trained_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("corpus")
    p.add_argument("--offset_stride", type=int, default=4)
    p.add_argument("--draws", type=int, default=5000)
    p.add_argument("--eval_iters", type=int, default=20)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--published", type=float, default=1.88)
    a = p.parse_args()
    trained = load_trained_model(a.model_dir)
    ctx = trained.config.data.seq_len
    text = open(a.corpus, encoding="utf-8").read()
    ids = np.array(trained.tokenizer.encode(text[int(0.9 * len(text)):]), np.int32)
    starts = np.arange(0, len(ids) - ctx - 1, a.offset_stride)
    eval_fn = make_eval_fn(trained.model, jit_compile=True)
    per_window = []
    for chunk in np.array_split(starts, max(1, len(starts) // 256)):
        windows = np.stack([ids[s:s + ctx + 1] for s in chunk])
        sums = eval_fn(tf.constant(windows)).numpy().astype(np.float64)
        per_window.append(sums[:, 0] / sums[:, 2])
    per_window = np.concatenate(per_window)
    rng = np.random.default_rng(0)
    draws = per_window[rng.integers(0, len(per_window), (a.draws, a.eval_iters * a.batch))].mean(axis=1)
    print(f"windows={len(per_window)} all_offsets_loss={per_window.mean():.4f} "
          f"nanogpt_estimate_mean={draws.mean():.4f} std={draws.std():.4f} "
          f"p5={np.percentile(draws, 5):.4f} p95={np.percentile(draws, 95):.4f} "
          f"share_at_or_below_{a.published}={np.mean(draws <= a.published):.3f}")


if __name__ == "__main__":
    main()
