"""The cost model applied to this machine's benchmark records (pipelines.benchmark --mode=costmodel).

`report` calibrates the ring-allreduce model of tfllm/costmodel.py on an N-rank `--mode=step`
record, predicts GPU clusters with and without gradient buckets, and, given a `--mode=buckets`
record, fits the overlap that predicts its bucketed steps (or checks a given one against them).
A record or value it cannot use is a ConfigError naming the flag it came from.
"""

from __future__ import annotations

import json

from tfllm import benchmark, costmodel, segments
from tfllm.config import ConfigError, ModelConfig
from tfllm.models import count_params, lm_chain


def read_record(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--{flag}={path}: cannot read a benchmark JSON ({e})") from None


def model_pieces(cfg: ModelConfig, seq_len: int) -> tuple[list[costmodel.Piece], list[int], int]:
    """The model's pieces for the cost model, its units' parameter counts (top first, what
    `--allreduce_buckets` balances) and its size."""
    model = benchmark.build(cfg)
    sizes = segments.unit_params(lm_chain(model), model.trainable_variables)
    return costmodel.lm_pieces(sizes, cfg.vocab_size, cfg.hidden_dim, seq_len), sizes, count_params(model)


def bucket_counts(requested: list[str], cfg: ModelConfig, given: bool) -> tuple[int, ...]:
    """--bench_buckets as integers; left at its default (not `given`), the counts this model has units for."""
    units = cfg.num_layers + 2
    try:
        counts = tuple(int(b) for b in requested)
    except ValueError:
        raise ConfigError(f"--bench_buckets={','.join(requested)}: expected integers") from None
    counts = counts if given else tuple(b for b in counts if b <= units)
    if 1 not in counts or not all(1 <= b <= units for b in counts):
        raise ConfigError(f"--bench_buckets={','.join(requested)}: include 1 (no overlap) and stay "
                          f"within 1..{units} for a {cfg.num_layers}-layer model")
    return counts


def _usable(flag: str, path: str, what: str, e: Exception) -> ConfigError:
    return ConfigError(f"--{flag}={path}: not a usable {what} "
                       f"({'no field ' + str(e) if isinstance(e, KeyError) else e})")


def fit_buckets_record(path: str, link: costmodel.Link, local_overlap: float) -> dict:
    """The overlap that predicts the bucketed steps of the `--mode=buckets` record at `path` over
    `link` (its own model and bucket plan), or `local_overlap` if it is not -1; each run's
    measured and predicted step."""
    record = read_record(path, "buckets_json")
    try:
        n, wire, micro = record["world_size"], 2 if record["fp16_allreduce"] else 4, record.get("grad_accum_steps", 1)
        if n < 2:
            raise ValueError("it was measured on one rank, where nothing is reduced")
        cfg = ModelConfig(**record["model"])
        pieces, sizes, _ = model_pieces(cfg, record["seq_len"])
        runs = record["runs"]
        if not all(1 <= r["allreduce_buckets"] <= len(sizes) for r in runs):
            raise ValueError(f"bucket counts outside 1..{len(sizes)}")
        cuts = {r["allreduce_buckets"]: segments.balanced_cuts(sizes, r["allreduce_buckets"]) for r in runs}
        overlap = (local_overlap if local_overlap >= 0
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
        raise _usable("buckets_json", path, "--mode=buckets record", e) from None
    return {"overlap": overlap, "fitted": local_overlap < 0, "world_size": n, "runs": rows}


def check_overlaps(gpu_overlap: float, gpu_micro_batches: int, local_overlap: float, local_overlap_given: bool,
                   buckets_path: str) -> None:
    """Refuses --gpu_overlap, --gpu_micro_batches and --local_overlap values `report` cannot use,
    before any model is built."""
    if not 0 <= gpu_overlap <= 1 or gpu_micro_batches < 1:
        raise ConfigError(f"--gpu_overlap={gpu_overlap} --gpu_micro_batches={gpu_micro_batches}: "
                          "expected an overlap within [0, 1] and at least one micro-batch")
    if not (local_overlap == -1 or 0 <= local_overlap <= 1):
        raise ConfigError(f"--local_overlap={local_overlap}: expected -1 (fit it) or a value within [0, 1]")
    if local_overlap_given and not buckets_path:
        raise ConfigError("--local_overlap applies to the steps of --buckets_json, which is not given")


def report(record: dict, calibration_path: str, scenario: costmodel.GpuScenario, pieces: list[costmodel.Piece],
           sizes: list[int], counts: tuple[int, ...], gpu_overlap: float, plot_path: str = "", buckets_path: str = "",
           local_overlap: float = -1.0) -> tuple[dict, str]:
    """The JSON-able result and its markdown: the fit to a buckets record (if `buckets_path`),
    then efficiency per GPU count for each curve. `record` is the N-rank step record read from
    `calibration_path`; the overlaps are values `check_overlaps` accepts."""
    cuts = {b: segments.balanced_cuts(sizes, b) for b in counts}
    try:
        result, table = costmodel.report(record, scenario, plot_path, pieces, cuts, gpu_overlap)
    except (KeyError, ValueError) as e:
        raise _usable("calibration_json", calibration_path, "N-rank step record", e) from None
    text = []
    if buckets_path:
        link = costmodel.Link(result["calibration"]["bandwidth_bytes_per_s"], result["calibration"]["latency_s"])
        result["local_overlap"] = fit = fit_buckets_record(buckets_path, link, local_overlap)
        text.append(f"overlap {'fitted to' if fit['fitted'] else 'given for'} {buckets_path} "
                    f"({fit['world_size']} ranks): {fit['overlap']:.3f}")
        text.append(benchmark.markdown([["allreduce buckets", "step ms (measured)", "step ms (model)",
                                         "hidden (measured)", "hidden (model)"]] + [
            [r["allreduce_buckets"], f"{r['measured_step_ms']:.1f}", f"{r['predicted_step_ms']:.1f}",
             f"{100 * r['measured_hidden_share']:.1f}%", f"{100 * r['predicted_hidden_share']:.1f}%"]
            for r in fit["runs"]]))
    return result, "\n".join([*text, benchmark.markdown(table)])
