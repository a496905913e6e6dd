"""Benchmarks that print figures (markdown table + one JSON line), write JSON and TensorBoard.

The model, batch (--batch_size per rank), --seq_len, --precision, --jit_compile, --fp16_allreduce and
the step's shape (--parallel_slices, --grad_accum_steps, --clip_norm) come from the usual flags, so any
pretraining flagfile drives it and the step measured is the step that flagfile trains with.
--init_preset=DIR measures the preset's architecture (and vocabulary, unless --bench_vocab is given).
Modes (synthetic windows, warm-up steps excluded; see tfllm/benchmark.py and tfllm/costmodel.py):
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

from tfllm import atomic, benchmark, cli, costmodel, distributed, segments
from tfllm.config import ConfigError, ModelConfig, TrainConfig
from tfllm.flags import (Options, define_data_flags, define_model_flags, define_options, define_train_flags,
                         model_config_from_flags, option, preset_model_config, read_options, shared)
from tfllm.models import count_params, flops_per_token, lm_chain
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


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--{what}={path}: cannot read a benchmark JSON ({e})") from None


def _pieces(cfg, seq_len: int) -> tuple[list, list[int], int]:
    """The model's pieces for the cost model, its units' parameter counts (top first, what
    `--allreduce_buckets` balances) and its size."""
    model = benchmark.build(cfg)
    sizes = segments.unit_params(lm_chain(model), model.trainable_variables)
    return costmodel.lm_pieces(sizes, cfg.vocab_size, cfg.hidden_dim, seq_len), sizes, count_params(model)


def _fit_overlap(opts: BenchmarkOptions, calibration: dict) -> dict:
    """--buckets_json: the overlap that predicts this machine's bucketed steps, from the link that
    --calibration_json fitted (the record's own model and bucket plan)."""
    record = _read_json(opts.buckets_json, "buckets_json")
    try:
        n, wire, micro = record["world_size"], 2 if record["fp16_allreduce"] else 4, record.get("grad_accum_steps", 1)
        if n < 2:
            raise ValueError("it was measured on one rank, where nothing is reduced")
        cfg = ModelConfig(**record["model"])
        pieces, sizes, _ = _pieces(cfg, record["seq_len"])
        runs = record["runs"]
        if not all(1 <= r["allreduce_buckets"] <= len(sizes) for r in runs):
            raise ValueError(f"bucket counts outside 1..{len(sizes)}")
        cuts = {r["allreduce_buckets"]: segments.balanced_cuts(sizes, r["allreduce_buckets"]) for r in runs}
        link = costmodel.Link(calibration["bandwidth_bytes_per_s"], calibration["latency_s"])
        overlap = (opts.local_overlap if opts.local_overlap >= 0
                   else costmodel.fit_overlap(runs, pieces, cuts, n, link, wire, micro_batches=micro))
        rows = []
        for r in runs:
            model = costmodel.bucketed_step(pieces, cuts[r["allreduce_buckets"]], r["compute_ms"] / 1000, n, link,
                                            wire, overlap, micro_batches=micro)
            rows.append({"allreduce_buckets": r["allreduce_buckets"], "measured_step_ms": float(r["step_ms"]),
                         "predicted_step_ms": 1000 * model["step_s"],
                         "measured_hidden_share": float(r["hidden_share"]),
                         "predicted_hidden_share": model["hidden_share"]})
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--buckets_json={opts.buckets_json}: not a usable --mode=buckets record "
                          f"({'no field ' + str(e) if isinstance(e, KeyError) else e})") from None
    return {"overlap": overlap, "fitted": opts.local_overlap < 0, "world_size": n, "runs": rows}


def _costmodel(opts: BenchmarkOptions, cfg) -> tuple[dict, list]:
    if not 0 <= opts.gpu_overlap <= 1 or opts.gpu_micro_batches < 1:
        raise ConfigError(f"--gpu_overlap={opts.gpu_overlap} --gpu_micro_batches={opts.gpu_micro_batches}: "
                          "expected an overlap within [0, 1] and at least one micro-batch")
    if not (opts.local_overlap == -1 or 0 <= opts.local_overlap <= 1):
        raise ConfigError(f"--local_overlap={opts.local_overlap}: expected -1 (fit it) or a value within [0, 1]")
    if "local_overlap" in opts.given and not opts.buckets_json:
        raise ConfigError("--local_overlap applies to the steps of --buckets_json, which is not given")
    record = _read_json(opts.calibration_json, "calibration_json")
    counts = _bucket_counts(opts, cfg)
    pieces, sizes, params = _pieces(cfg, opts.seq_len)
    cuts = {b: segments.balanced_cuts(sizes, b) for b in counts}
    scenario = costmodel.GpuScenario(
        params, flops_per_token(cfg, opts.seq_len, params), opts.gpu_tokens_per_step,
        opts.gpu_peak_tflops * 1e12, opts.gpu_mfu, 2 if opts.fp16_allreduce else 4, costmodel.Cluster(
            costmodel.Link(opts.intra_node_gbps * 1e9, opts.intra_node_latency_us * 1e-6),
            costmodel.Link(opts.inter_node_gbps * 1e9, opts.inter_node_latency_us * 1e-6), opts.gpus_per_node),
        opts.gpu_micro_batches)
    try:
        result, table = costmodel.report(record, scenario, opts.plot, pieces, cuts, opts.gpu_overlap)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"--calibration_json={opts.calibration_json}: not a usable N-rank step record "
                          f"({'no field ' + str(e) if isinstance(e, KeyError) else e})") from None
    if opts.buckets_json:
        result["local_overlap"] = fit = _fit_overlap(opts, result["calibration"])
        print(f"overlap {'fitted to' if fit['fitted'] else 'given for'} {opts.buckets_json} "
              f"({fit['world_size']} ranks): {fit['overlap']:.3f}")
        print(benchmark.markdown([["allreduce buckets", "step ms (measured)", "step ms (model)", "hidden (measured)",
                                   "hidden (model)"]] + [
            [r["allreduce_buckets"], f"{r['measured_step_ms']:.1f}", f"{r['predicted_step_ms']:.1f}",
             f"{100 * r['measured_hidden_share']:.1f}%", f"{100 * r['predicted_hidden_share']:.1f}%"]
            for r in fit["runs"]]))
    return result, table


def _model_config(opts: BenchmarkOptions):
    """The flags' architecture, or --init_preset's (only its shape matters here, not its weights)."""
    cfg = model_config_from_flags()
    if opts.init_preset:
        cfg = preset_model_config(opts.init_preset, cfg)
        if not "bench_vocab" in opts.given:
            return cfg
    return dataclasses.replace(cfg, vocab_size=opts.bench_vocab)


def _bucket_counts(opts: BenchmarkOptions, cfg) -> tuple[int, ...]:
    """--bench_buckets; left at its default, the counts this model has units for."""
    try:
        counts = tuple(int(b) for b in opts.bench_buckets)
        if not "bench_buckets" in opts.given:
            counts = tuple(b for b in counts if b <= cfg.num_layers + 2)
    except ValueError:
        raise ConfigError(f"--bench_buckets={','.join(opts.bench_buckets)}: expected integers") from None
    if 1 not in counts or not all(1 <= b <= cfg.num_layers + 2 for b in counts):
        raise ConfigError(f"--bench_buckets={','.join(opts.bench_buckets)}: include 1 (no overlap) and stay "
                          f"within 1..{cfg.num_layers + 2} for a {cfg.num_layers}-layer model")
    return counts


def main(argv):
    world, opts = distributed.init(), read_options(BenchmarkOptions)
    cfg = _model_config(opts)
    common = dict(batch=opts.batch_size, seq_len=opts.seq_len, steps=opts.bench_steps, warmup=opts.bench_warmup)
    # The step pretraining would run with these flags: its slices, accumulation and clipping.
    step_shape = dict(parallel_slices=opts.parallel_slices, grad_accum_steps=opts.grad_accum_steps,
                      clip_norm=opts.clip_norm)
    TrainConfig(model_dir="(benchmark)", batch_size=opts.batch_size, grad_accum_steps=opts.grad_accum_steps,
                parallel_slices=opts.parallel_slices, precision=opts.precision).validate()
    if opts.mode in ("overhead", "variants", "generate", "costmodel") and world.size > 1:
        raise ConfigError(f"--mode={opts.mode} runs in a single process; use --mode=step under horovodrun/mpirun")
    if opts.mode == "step":
        result = benchmark.measure_step(cfg, **common, jit_compile=opts.jit_compile, precision=opts.precision,
                                        fp16_allreduce=opts.fp16_allreduce, **step_shape)
        if opts.baseline_json:
            result["scaling_efficiency"] = benchmark.scaling_efficiency(result, _read_json(opts.baseline_json, "baseline_json"))
        table = [list(benchmark.TABLE_FIELDS)] + [benchmark.table_row(result)]
    elif opts.mode == "buckets":
        result = benchmark.measure_buckets(cfg, **common, jit_compile=opts.jit_compile, precision=opts.precision,
                                           fp16_allreduce=opts.fp16_allreduce, buckets=_bucket_counts(opts, cfg), **step_shape)
        table = [["allreduce buckets", "step ms", "compute ms", "exposed allreduce ms", "hidden share",
                  "step / unbucketed"]] + [
            [r["allreduce_buckets"], f"{r['step_ms']:.1f}", f"{r['compute_ms']:.1f}", f"{r['exposed_allreduce_ms']:.1f}",
             "" if r["hidden_share"] is None else f"{100 * r['hidden_share']:.1f}%", f"{r['step_over_unbucketed']:.3f}"]
            for r in result["runs"]]
    elif opts.mode == "overhead":
        result = benchmark.measure_step(cfg, **common, jit_compile=opts.jit_compile, precision=opts.precision,
                                        mode="overhead", **step_shape)
        # keras's equivalent of K accumulated micro-batches is one batch K times as large.
        fit = benchmark.time_keras_fit(cfg, **dict(common, batch=opts.grad_accum_steps * opts.batch_size),
                                       jit_compile=opts.jit_compile, precision=opts.precision,
                                       clip_norm=opts.clip_norm)
        result.update(keras_fit_step_ms=1000 * fit.median_s, overhead_ratio=result["step_ms_median"] / (1000 * fit.median_s))
        table = [["", "median ms", "p10 ms", "p90 ms"],
                 ["tfllm step", *(f"{result[k]:.2f}" for k in ("step_ms_median", "step_ms_p10", "step_ms_p90"))],
                 ["keras model.fit", *(f"{1000 * t:.2f}" for t in (fit.median_s, fit.p10_s, fit.p90_s))]]
    elif opts.mode == "variants":
        runs = [benchmark.measure_step(cfg, **common, jit_compile=jit, precision=p, mode="variants", **step_shape)
                for p in opts.variant_precisions for jit in (True, False)]
        result = {"mode": "variants", "runs": runs}
        table = [list(benchmark.TABLE_FIELDS)] + [benchmark.table_row(r) for r in runs]
    elif opts.mode == "generate":
        r = benchmark.time_generation(cfg, opts.batch_size, opts.gen_prompt_len, opts.gen_new_tokens)
        result = {"mode": "generate", "model": dataclasses.asdict(cfg), **r}
        table = [[f"generate {opts.gen_new_tokens} tokens, batch {opts.batch_size}", "seconds"],
                 ["key/value cache (keras-hub)", f"{r['cached_s']:.3f}"],
                 ["full forward pass per token", f"{r['uncached_s']:.3f}"], ["speedup", f"{r['speedup']:.2f}"]]
    else:
        result, table = _costmodel(opts, cfg)
    if world.is_chief:
        print(benchmark.markdown(table))
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
