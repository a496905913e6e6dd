"""CPU generation latency and size of float and int8 SavedModels, as pipelines.export writes them.

    python tests/benchmarks/quantize_bench.py --output_json=.bench/quantize.json    # or: make bench-quantize

Two architectures: the Shakespeare baby GPT (flags/shakespeare_char.cfg: 6 layers, width 384,
context 256, 63 characters; 10.7M parameters) and one 10x its size (16 layers, width 768). Weights
are random, which changes neither size nor speed. Each variant is saved as a SavedModel with
tfllm's serving module and loaded back, and its `generate` signature (greedy, keras-hub's cached
sampler) is timed in this process at batch 1 and 8 from a 16-token prompt: ms per token is the
time of 72 new tokens minus that of 8, over 64, so that the prompt's forward pass and the call
overhead cancel (the int8 export's once-per-call dequantization is part of that overhead, so the
time of 8 new tokens is reported too). Median of --repeats (5 in make bench-quantize). Variants,
all but float storing the same int8 weights (Keras's int8: per-channel scales):
  float       float32 weights
  int8        what `pipelines.export --quantize=int8` writes: the weights are dequantized once per
              call into a float twin of the model (tfllm/quantize.py: FloatTwin), which decodes
  int8-keras  Keras's own int8 layers: inputs quantized per token, int8 matmuls at every step
  int8-w      Keras's weight-only int8: the kernel cast to float at every step
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ARCHS = {"baby-gpt-10.7M": dict(num_layers=6, hidden_dim=384, num_heads=6),
         "10x-107M": dict(num_layers=16, hidden_dim=768, num_heads=12)}


def build(arch: dict, variant: str, vocab_size: int):
    import keras

    from tfllm.config import ModelConfig
    from tfllm.models import build_causal_lm

    keras.utils.set_random_seed(0)
    cfg = ModelConfig(family="gpt2", vocab_size=vocab_size, max_sequence_length=256, dropout=0.0, **arch)
    model = build_causal_lm(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        if variant in ("int8", "int8-keras"):
            model.quantize("int8")
        elif variant == "int8-w":
            model.quantize(config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
    twin = None
    if variant == "int8":
        from tfllm.quantize import FloatTwin

        twin = FloatTwin(model, build_causal_lm(cfg))
    return model, twin


def measure(arch_name: str, variant: str, scratch: str, repeats: int) -> dict:
    import tensorflow as tf

    from tfllm.export import ServingModule
    from tfllm.tokenizers import train_tokenizer

    tokenizer = train_tokenizer("char", ["".join(chr(c) for c in range(32, 95))], 0)
    model, twin = build(ARCHS[arch_name], variant, tokenizer.vocab_size)
    path = os.path.join(scratch, f"{arch_name}-{variant}")
    module = ServingModule(model, tokenizer, 256, twin)
    tf.saved_model.save(module, path, signatures={"generate": module.generate})
    size = sum(f.stat().st_size for f in pathlib.Path(path, "variables").iterdir())
    generate = tf.saved_model.load(path).signatures["generate"]
    out = {"arch": arch_name, "variant": variant, "weights_mb": size / 1e6}
    for batch in (1, 8):
        prompts = tf.constant(["ROMEO: What news?"[:16]] * batch)

        def timed(n: int) -> float:
            start = time.perf_counter()
            generate(prompts=prompts, max_new_tokens=tf.constant(n))
            return time.perf_counter() - start
        timed(8), timed(72)  # trace and warm up
        short, per_token = [], []
        for _ in range(repeats):
            short.append(timed(8))
            per_token.append((timed(72) - short[-1]) / 64)
        out[f"ms_per_token_b{batch}"] = 1000 * statistics.median(per_token)
        out[f"ms_8_tokens_b{batch}"] = 1000 * statistics.median(short)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_json", default="")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--variants", default="float,int8,int8-keras,int8-w")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for arch in args.archs.split(","):
            for variant in args.variants.split(","):
                row = measure(arch, variant, scratch, args.repeats)
                rows.append(row)
                print(f"{arch:15s} {variant:10s} weights {row['weights_mb']:7.2f} MB | ms/token "
                      f"{row['ms_per_token_b1']:6.2f} at batch 1, {row['ms_per_token_b8']:6.2f} at batch 8 | "
                      f"8 tokens {row['ms_8_tokens_b1']:6.1f} ms at batch 1, {row['ms_8_tokens_b8']:6.1f} at batch 8",
                      flush=True)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
