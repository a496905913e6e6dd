r"""Benchmarks that print figures (markdown table + one JSON line), write JSON and TensorBoard.

The model, batch (--batch_size per rank), --seq_len, --precision, --jit_compile, --fp16_allreduce and
the step's shape (--parallel_slices, --grad_accum_steps, --clip_norm) come from the usual flags, so any
pretraining flagfile drives it and the step measured is the step that flagfile trains with.
--init_preset=DIR measures the preset's architecture (and vocabulary, unless --bench_vocab is given).
Modes (synthetic windows, warm-up steps excluded; see tfllm/benchmark.py, costmodel.py and scaling.py):
  step       step time, tokens/s, model FLOP/s and MFU, peak memory, allreduce share
  buckets    step time per --allreduce_buckets value (--bench_buckets), and the share of the allreduce hidden
  overhead   tfllm's step vs a plain keras-hub `model.fit` of the same model (single process)
  variants   float32 / mixed_bfloat16 x XLA on/off (single process)
  generate   key/value-cached generation vs a full forward pass per token
  costmodel  calibrates the ring-allreduce model on an N-rank `step` JSON, predicts 8..512 GPUs with and
             without buckets (--bench_buckets), plots a PNG; --buckets_json fits this machine's overlap

Single process, then 2 ranks (scaling efficiency against the 1-rank JSON), then the cost model:
    python -m pipelines.benchmark --flagfile=flags/shakespeare_char.cfg --mode=step --output_json=.bench/step1.json
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.benchmark --flagfile=flags/shakespeare_char.cfg \
        --mode=step --baseline_json=.bench/step1.json --output_json=.bench/step2.json
    mpirun -np 2 python -m pipelines.benchmark --flagfile=flags/shakespeare_char.cfg --mode=step ...
    python -m pipelines.benchmark --flagfile=flags/shakespeare_char.cfg --mode=costmodel \
        --calibration_json=.bench/step2.json --plot=.bench/scaling.png
On GPUs: --flagfile=flags/gpt2_124m.cfg --bench_vocab=50304 (bf16 + XLA come from that flagfile).
"""

import dataclasses
import json

from tfllm import atomic, benchmark, cli, costmodel, distributed, scaling
from tfllm.config import ConfigError, TrainConfig
from tfllm.flags import (Options, define_data_flags, define_model_flags, define_options, define_train_flags,
                         model_config_from_flags, option, preset_model_config, read_options, shared)
from tfllm.models import flops_per_token
from tfllm.summary import SummaryWriter

define_data_flags()
define_model_flags()
define_train_flags()  # so that pretraining flagfiles drive the benchmark as they are


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions(Options):
    mode: str = option("step", "What to measure.",
                       choices=("step", "buckets", "overhead", "variants", "generate", "costmodel"))
    bench_buckets: list = option(["1", "2", "4", "8"], "buckets and costmodel modes: --allreduce_buckets values.")
    bench_vocab: int = option(68, "Vocabulary size of the synthetic data.")
    bench_steps: int = option(60, "Measured steps.")
    bench_warmup: int = option(10, "Unmeasured warm-up steps (tracing, XLA compilation).")
    variant_precisions: list = option(["float32", "mixed_bfloat16"], "variants mode: precisions to try.")
    gen_prompt_len: int = option(16, "generate mode: prompt tokens.")
    gen_new_tokens: int = option(256, "generate mode: tokens to generate.")
    baseline_json: str = option("", "step mode: a 1-rank step JSON; adds the scaling efficiency.")
    calibration_json: str = option("", "costmodel mode: an N-rank (N >= 2) step JSON.")
    plot: str = option("", "costmodel mode: write the efficiency curves here (PNG).")
    gpu_peak_tflops: float = option(989.0, "costmodel: dense bf16 peak per GPU (H100 SXM).")
    gpu_mfu: float = option(0.4, "costmodel: assumed MFU of the per-GPU compute.")
    gpu_tokens_per_step: int = option(16 * 1024, "costmodel: tokens per GPU per optimizer step.")
    gpu_micro_batches: int = option(1, "costmodel: micro-batches those tokens are accumulated over; only the last "
                                    "one's backward pass can hide the allreduce.")
    intra_node_gbps: float = option(300.0, "costmodel: allreduce bus bandwidth inside a node, GB/s (NVLink).")
    inter_node_gbps: float = option(40.0, "costmodel: per-GPU network bandwidth, GB/s (400 Gb/s NIC per GPU).")
    intra_node_latency_us: float = option(5.0, "costmodel: ring step latency inside a node.")
    inter_node_latency_us: float = option(10.0, "costmodel: ring step latency across nodes.")
    gpus_per_node: int = option(8, "costmodel: GPUs per node.")
    gpu_overlap: float = option(1.0, "costmodel: share of the link's speed an allreduce keeps while the backward "
                                "pass runs (1: no contention, as with NCCL next to GPU kernels; 0: nothing hides).")
    buckets_json: str = option("", "costmodel mode: a --mode=buckets record of this machine; fits its overlap.")
    local_overlap: float = option(-1.0, "costmodel mode with --buckets_json: predict its steps with this overlap "
                                  "instead of fitting one (-1), e.g. 3 hosts with the overlap fitted on 2.")
    output_json: str = option("", "Also write the JSON result here.")
    tb_dir: str = option("", "Also log the numeric results to TensorBoard here (split benchmark/<mode>).")
    # Flags of the training groups: the step measured is the step pretraining runs with them.
    batch_size: int = shared()
    seq_len: int = shared()
    parallel_slices: int = shared()
    grad_accum_steps: int = shared()
    clip_norm: float = shared()
    precision: str = shared()
    jit_compile: bool = shared()
    fp16_allreduce: bool = shared()
    init_preset: str = shared()


define_options(BenchmarkOptions)


def _costmodel(opts: BenchmarkOptions, cfg) -> tuple[dict, str]:
    scaling.check_overlaps(opts.gpu_overlap, opts.gpu_micro_batches, opts.local_overlap,
                           "local_overlap" in opts.given, opts.buckets_json)
    record = scaling.read_record(opts.calibration_json, "calibration_json")
    counts = scaling.bucket_counts(opts.bench_buckets, cfg, "bench_buckets" in opts.given)
    pieces, sizes, params = scaling.model_pieces(cfg, opts.seq_len)
    cluster = costmodel.Cluster(costmodel.Link(opts.intra_node_gbps * 1e9, opts.intra_node_latency_us * 1e-6),
                                costmodel.Link(opts.inter_node_gbps * 1e9, opts.inter_node_latency_us * 1e-6),
                                opts.gpus_per_node)
    scenario = costmodel.GpuScenario(params, flops_per_token(cfg, opts.seq_len, params), opts.gpu_tokens_per_step,
                                     opts.gpu_peak_tflops * 1e12, opts.gpu_mfu, 2 if opts.fp16_allreduce else 4,
                                     cluster, opts.gpu_micro_batches)
    return scaling.report(record, opts.calibration_json, scenario, pieces, sizes, counts, opts.gpu_overlap, opts.plot,
                          opts.buckets_json, opts.local_overlap)


def _model_config(opts: BenchmarkOptions):
    """The flags' architecture, or --init_preset's (only its shape matters here, not its weights)."""
    cfg = model_config_from_flags()
    if opts.init_preset:
        cfg = preset_model_config(opts.init_preset, cfg)
        if "bench_vocab" not in opts.given:
            return cfg
    return dataclasses.replace(cfg, vocab_size=opts.bench_vocab)


def main(argv):
    world, opts = distributed.init(), read_options(BenchmarkOptions)
    cfg = _model_config(opts)
    # The step pretraining would run with these flags: its slices, accumulation and clipping.
    step = dict(batch=opts.batch_size, seq_len=opts.seq_len, steps=opts.bench_steps, warmup=opts.bench_warmup,
                parallel_slices=opts.parallel_slices, grad_accum_steps=opts.grad_accum_steps, clip_norm=opts.clip_norm)
    TrainConfig(model_dir="(benchmark)", batch_size=opts.batch_size, grad_accum_steps=opts.grad_accum_steps,
                parallel_slices=opts.parallel_slices, precision=opts.precision).validate()
    if opts.mode in ("overhead", "variants", "generate", "costmodel") and world.size > 1:
        raise ConfigError(f"--mode={opts.mode} runs in a single process; use --mode=step under horovodrun/mpirun")
    table, text = None, ""
    if opts.mode == "step":
        result = benchmark.measure_step(cfg, **step, jit_compile=opts.jit_compile, precision=opts.precision,
                                        fp16_allreduce=opts.fp16_allreduce)
        if opts.baseline_json:
            result["scaling_efficiency"] = benchmark.scaling_efficiency(
                result, scaling.read_record(opts.baseline_json, "baseline_json"))
        table = [list(benchmark.TABLE_FIELDS), benchmark.table_row(result)]
    elif opts.mode == "buckets":
        counts = scaling.bucket_counts(opts.bench_buckets, cfg, "bench_buckets" in opts.given)
        result = benchmark.measure_buckets(cfg, **step, jit_compile=opts.jit_compile, precision=opts.precision,
                                           fp16_allreduce=opts.fp16_allreduce, buckets=counts)
        table = benchmark.buckets_table(result)
    elif opts.mode == "overhead":
        result, table = benchmark.measure_overhead(cfg, **step, jit_compile=opts.jit_compile, precision=opts.precision)
    elif opts.mode == "variants":
        runs = [benchmark.measure_step(cfg, **step, jit_compile=jit, precision=p, mode="variants")
                for p in opts.variant_precisions for jit in (True, False)]
        result = {"mode": "variants", "runs": runs}
        table = [list(benchmark.TABLE_FIELDS)] + [benchmark.table_row(r) for r in runs]
    elif opts.mode == "generate":
        result, table = benchmark.generation_report(cfg, opts.batch_size, opts.gen_prompt_len, opts.gen_new_tokens)
    else:
        result, text = _costmodel(opts, cfg)
    if world.is_chief:
        print(text or benchmark.markdown(table))
        for key in ("overhead_ratio", "allreduce_share", "scaling_efficiency", "tokens_per_sec_global", "speedup"):
            if isinstance(result.get(key), float):
                print(f"{key}={result[key]:.4f}")
        print(json.dumps(result), flush=True)
        if opts.output_json:
            atomic.write_json(opts.output_json, result, sort_keys=False)
    if opts.tb_dir:
        writer = SummaryWriter(opts.tb_dir, world.is_chief)
        for r in result.get("runs", [result]):
            tag = f"{r.get('precision', '')}{'_xla' if r.get('jit_compile') else ''}".strip("_")
            writer.scalars(f"benchmark/{opts.mode}" + (f"/{tag}" if opts.mode == "variants" else ""),
                           world.size, {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        writer.close()


if __name__ == "__main__":
    cli.run(main)
