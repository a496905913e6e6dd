"""Benchmarks that print figures: tfllm's step vs keras `fit`, and the allreduce share.

Single process (overhead of tfllm's step over a plain keras-hub `model.fit`, same model/data):
    python -m pipelines.benchmark --mode=overhead --num_layers=4 --num_heads=4 --hidden_dim=128 \
        --bench_batch=12 --seq_len=64 --bench_vocab=68
Two ranks on one machine (step time and the share spent in the gradient allreduce):
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.benchmark --mode=allreduce --num_layers=4 \
        --num_heads=4 --hidden_dim=128 --bench_batch=12 --seq_len=64 --bench_vocab=68
    mpirun -np 2 python -m pipelines.benchmark --mode=allreduce ...
On GPUs add --precision=mixed_bfloat16 and a GPU-sized model (e.g. --flagfile=flags/gpt2_124m.cfg).
Rank 0 prints a markdown table and one JSON line (also written to --output_json when given).
"""

import dataclasses
import json

from absl import flags

from tfllm import atomic, benchmark, cli, distributed
from tfllm.config import PRECISIONS
from tfllm.flags import define_data_flags, define_model_flags, model_config_from_flags

define_data_flags()
define_model_flags()
flags.DEFINE_enum("mode", "overhead", ["overhead", "allreduce", "generate"], "What to measure.")
flags.DEFINE_integer("gen_prompt_len", 16, "generate mode: prompt tokens.")
flags.DEFINE_integer("gen_new_tokens", 256, "generate mode: tokens to generate.")
flags.DEFINE_integer("bench_batch", 12, "Windows per rank per step.")
flags.DEFINE_integer("bench_vocab", 68, "Vocabulary size of the synthetic data.")
flags.DEFINE_integer("bench_steps", 60, "Measured steps.")
flags.DEFINE_integer("bench_warmup", 10, "Unmeasured warm-up steps (tracing, XLA compilation).")
flags.DEFINE_enum("bench_precision", "float32", PRECISIONS, "Dtype policy.")
flags.DEFINE_bool("bench_jit", True, "XLA-compile both sides.")
flags.DEFINE_string("output_json", "", "Also write the JSON result here.")
FLAGS = flags.FLAGS


def main(argv):
    world = distributed.init()
    cfg = dataclasses.replace(model_config_from_flags(), vocab_size=FLAGS.bench_vocab)
    if FLAGS.mode == "generate":
        if world.is_chief:
            r = benchmark.time_generation(cfg, FLAGS.bench_batch, FLAGS.gen_prompt_len, FLAGS.gen_new_tokens)
            print(f"| generate {FLAGS.gen_new_tokens} tokens, batch {FLAGS.bench_batch} | seconds |\n|---|---|\n"
                  f"| key/value cache (keras-hub) | {r['cached_s']:.3f} |\n| full forward pass per token | "
                  f"{r['uncached_s']:.3f} |\nspeedup={r['speedup']:.2f}")
            print(json.dumps({"mode": "generate", "model": dataclasses.asdict(cfg), **r}), flush=True)
        return
    common = dict(batch=FLAGS.bench_batch, seq_len=FLAGS.seq_len, steps=FLAGS.bench_steps, warmup=FLAGS.bench_warmup,
                  jit_compile=FLAGS.bench_jit, precision=FLAGS.bench_precision)
    step, info = benchmark.time_tfllm_step(cfg, **common)
    tokens = FLAGS.bench_batch * FLAGS.seq_len
    result = {"mode": FLAGS.mode, "world_size": world.size, "model": dataclasses.asdict(cfg), **info, **common,
              "tfllm_step_ms": 1000 * step.median_s, "tfllm_step_p10_ms": 1000 * step.p10_s,
              "tfllm_step_p90_ms": 1000 * step.p90_s,
              "tokens_per_sec_per_rank": tokens / step.median_s, "tokens_per_sec_global": world.size * tokens / step.median_s}
    rows = [("tfllm step", step)]
    if FLAGS.mode == "overhead":
        fit = benchmark.time_keras_fit(cfg, **common)
        result.update(keras_fit_step_ms=1000 * fit.median_s, overhead_ratio=step.median_s / fit.median_s)
        rows.append(("keras model.fit", fit))
    else:
        shapes = [tuple(v.shape) for v in benchmark.build(cfg).trainable_variables]
        ar = benchmark.time_allreduce(shapes, FLAGS.bench_steps, FLAGS.bench_warmup)
        result.update(allreduce_ms=1000 * ar.median_s, allreduce_share=ar.median_s / step.median_s)
        rows.append(("grouped allreduce", ar))
    result["peak_memory_bytes"] = benchmark.peak_memory_bytes()
    if world.is_chief:
        print(f"| {FLAGS.mode} @ {world.size} rank(s) | median ms | p10 ms | p90 ms |")
        print("|---|---|---|---|")
        for name, t in rows:
            print(f"| {name} | {1000 * t.median_s:.2f} | {1000 * t.p10_s:.2f} | {1000 * t.p90_s:.2f} |")
        key = "overhead_ratio" if FLAGS.mode == "overhead" else "allreduce_share"
        print(f"{key}={result[key]:.4f}")
        print(json.dumps(result), flush=True)
        if FLAGS.output_json:
            atomic.write_json(FLAGS.output_json, result, sort_keys=False)


if __name__ == "__main__":
    cli.run(main)
