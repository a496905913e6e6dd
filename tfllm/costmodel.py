"""Ring-allreduce cost model: predicted data-parallel scaling efficiency for 8 to 512 GPUs.

A ring allreduce of B bytes over N workers sends 2 (N-1)/N B bytes through every worker's
link in 2 (N-1) steps (reduce-scatter then allgather), so

    t_allreduce(N) = 2 (N-1) alpha  +  2 (N-1)/N * B / beta

with alpha the per-step latency and beta the link ("bus") bandwidth in bytes/s. Horovod fuses
gradients into buffers of at most `fusion_bytes` (HOROVOD_FUSION_THRESHOLD, 64 MiB by default)
and runs one ring per buffer, so the latency term is paid once per buffer.

Assumptions (the plot and README state them too):
- With one bucket (the default) tfllm's step runs the allreduce after the backward pass, so
  t_step(N) = t_compute + t_allreduce(N) and efficiency(N) = t_compute / t_step(N). Weak
  scaling: the per-GPU batch, hence t_compute, does not change with N.
- A flat ring: once it leaves a node, every hop is limited by the inter-node bandwidth per GPU.
  NCCL's trees and hierarchical rings do better on latency at large N; this is the pessimistic
  bound.
- alpha and beta are constants; congestion, stragglers and input pipeline stalls are ignored.

Calibration solves the same formula for beta from one measured allreduce (and alpha from one
of a few bytes), so the model reproduces the measured point exactly.

With `--allreduce_buckets=B` the gradients go out in B allreduces, top of the model first, each
as soon as the backward pass has produced it (`bucketed_step`): what the remaining backward
covers is hidden, the rest is exposed. Two things bound what that can hide in a GPT: the
vocabulary projection's backward, a large share of the whole, produces no gradient bytes of its
own when the head is tied, and the tied embedding's gradient, about a third of GPT-2 124M's
bytes, is complete only when the backward pass ends, so its allreduce is always exposed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

DEFAULT_FUSION_BYTES = 64 * 1024 * 1024
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class Link:
    bandwidth_bytes_per_s: float  # beta: bus bandwidth per worker
    latency_s: float  # alpha: per ring step

    def __post_init__(self):
        if self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"link needs bandwidth > 0 and latency >= 0, got {self}")


@dataclasses.dataclass(frozen=True)
class Cluster:
    intra_node: Link
    inter_node: Link
    gpus_per_node: int = 8

    def link(self, n: int) -> Link:
        """The ring's slowest hop: inside one node, or the network once the ring spans nodes."""
        if n <= self.gpus_per_node:
            return self.intra_node
        return Link(min(self.intra_node.bandwidth_bytes_per_s, self.inter_node.bandwidth_bytes_per_s),
                    max(self.intra_node.latency_s, self.inter_node.latency_s))


def ring_allreduce_seconds(nbytes: float, n: int, link: Link, fusion_bytes: float = DEFAULT_FUSION_BYTES) -> float:
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    if n == 1:
        return 0.0
    buffers = max(1, math.ceil(nbytes / fusion_bytes))
    return buffers * 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s


def efficiency(compute_s: float, allreduce_s: float) -> float:
    return compute_s / (compute_s + allreduce_s)


def calibrate_link(nbytes: float, n: int, measured_s: float, latency_s: float,
                   fusion_bytes: float = DEFAULT_FUSION_BYTES) -> Link:
    """The link for which `ring_allreduce_seconds(nbytes, n, link)` equals `measured_s`.

    `latency_s` usually comes from timing an allreduce of a few bytes, whose time is almost all
    latency: t_small = 2 (N-1) alpha.
    """
    if n < 2:
        raise ValueError("calibration needs a measurement with at least 2 workers")
    buffers = max(1, math.ceil(nbytes / fusion_bytes))
    transfer_s = measured_s - buffers * 2 * (n - 1) * latency_s
    if transfer_s <= 0:
        raise ValueError(f"measured allreduce ({measured_s:.3g} s) is not longer than its latency term; "
                         f"measure a larger tensor or a smaller latency")
    return Link(2 * (n - 1) / n * nbytes / transfer_s, latency_s)


def latency_from_small_allreduce(small_allreduce_s: float, n: int) -> float:
    return small_allreduce_s / (2 * (n - 1))


def predict(cluster: Cluster, grad_bytes: float, compute_s: float, gpu_counts=GPU_COUNTS,
            fusion_bytes: float = DEFAULT_FUSION_BYTES) -> list[dict]:
    """Predicted allreduce time, step time and efficiency per GPU count."""
    rows = []
    for n in gpu_counts:
        ar = ring_allreduce_seconds(grad_bytes, n, cluster.link(n), fusion_bytes)
        rows.append({"gpus": n, "allreduce_s": ar, "step_s": compute_s + ar, "efficiency": efficiency(compute_s, ar)})
    return rows


@dataclasses.dataclass(frozen=True)
class Piece:
    """One unit of the bucketed backward (tfllm.segments), as the model sees it: the parameters whose
    gradients it completes, and its forward FLOPs per token (its backward costs twice that)."""
    params: int
    forward_flops_per_token: float


def lm_pieces(unit_params: Sequence[int], vocab_size: int, hidden_dim: int, seq_len: int) -> list[Piece]:
    """A GPT-2 or Llama language model's pieces, top first, from its units' parameter counts (the
    top, the transformer layers top down, the embeddings; `segments.unit_params`). The top
    projects onto the vocabulary, tied or not; a layer multiplies by each of its weights once and
    attends over seq_len positions (4 T d, as `models.flops_per_token` counts); a lookup is free."""
    if len(unit_params) < 3:
        raise ValueError(f"expected the top, at least one layer and the embeddings, got {len(unit_params)} units")
    top, *layers, embed = unit_params
    return [Piece(top, 2 * vocab_size * hidden_dim),
            *(Piece(p, 2 * p + 4 * seq_len * hidden_dim) for p in layers), Piece(embed, 0)]


def _finish(start: float, work: float, backward_end: float, overlap: float) -> float:
    """When an allreduce of `work` seconds that starts at `start` ends, moving at `overlap` times
    its speed until the backward pass ends and at full speed after."""
    if start < backward_end and overlap > 0:
        during = overlap * (backward_end - start)
        if work <= during:
            return start + work / overlap
        start, work = backward_end, work - during
    return max(start, backward_end) + work


def bucketed_step(pieces: Sequence[Piece], cuts: Sequence[int], compute_s: float, n: int, link: Link,
                  bytes_per_param: float, overlap: float = 1.0, fusion_bytes: float = DEFAULT_FUSION_BYTES,
                  micro_batches: int = 1) -> dict:
    """Step time when each bucket's allreduce starts once its gradients exist and the link is free.

    Bucket k holds pieces[cuts[k]:cuts[k+1]] (cuts as `segments.balanced_cuts` draws them). The
    forward pass takes a third of compute_s and the backward the rest, spread over the pieces by
    FLOPs, top first; a bucket is ready once the backward has passed its lowest piece, the last
    one when the backward ends. Allreduces run one at a time, in order, each paying its own
    latency. While the backward runs they move at `overlap` times their speed: 1 when
    communication and computation do not compete (a GPU's copy engines and NCCL's few SMs),
    0 when they share the same cores. One bucket is the unbucketed step, compute + allreduce.
    With gradient accumulation only the last of `micro_batches` backward passes can hide them.
    """
    if list(cuts[:1]) != [0] or cuts[-1] != len(pieces) or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"bucket cuts {list(cuts)} do not split {len(pieces)} pieces into runs")
    if not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be within [0, 1], got {overlap}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    flops = sum(p.forward_flops_per_token for p in pieces) or 1.0
    backward_s = compute_s / micro_batches * 2 / 3
    done, link_free, allreduce_s = compute_s - backward_s, 0.0, 0.0
    for start, stop in zip(cuts, cuts[1:]):
        done += backward_s * sum(p.forward_flops_per_token for p in pieces[start:stop]) / flops
        ready = compute_s if stop == len(pieces) else min(done, compute_s)
        work = ring_allreduce_seconds(bytes_per_param * sum(p.params for p in pieces[start:stop]), n, link,
                                      fusion_bytes)
        allreduce_s += work
        link_free = _finish(max(ready, link_free), work, compute_s, overlap)
    step_s = max(compute_s, link_free)
    exposed_s = step_s - compute_s
    return {"buckets": len(cuts) - 1, "step_s": step_s, "compute_s": compute_s, "allreduce_s": allreduce_s,
            "exposed_s": exposed_s, "hidden_share": (allreduce_s - exposed_s) / allreduce_s if allreduce_s else 0.0}


def predict_bucketed(cluster: Cluster, pieces: Sequence[Piece], cuts: Sequence[int], compute_s: float,
                     bytes_per_param: float, overlap: float = 1.0, gpu_counts=GPU_COUNTS,
                     fusion_bytes: float = DEFAULT_FUSION_BYTES, micro_batches: int = 1) -> list[dict]:
    """`predict`'s rows for a bucketed step: efficiency is compute / step once some allreduce hides."""
    rows = []
    for n in gpu_counts:
        r = bucketed_step(pieces, cuts, compute_s, n, cluster.link(n), bytes_per_param, overlap, fusion_bytes,
                          micro_batches)
        rows.append({"gpus": n, "allreduce_s": r["allreduce_s"], "exposed_s": r["exposed_s"], "step_s": r["step_s"],
                     "efficiency": compute_s / r["step_s"]})
    return rows


def fit_overlap(runs: Sequence[dict], pieces: Sequence[Piece], cuts: dict[int, Sequence[int]], n: int, link: Link,
                bytes_per_param: float, fusion_bytes: float = DEFAULT_FUSION_BYTES, micro_batches: int = 1) -> float:
    """The `overlap` that best predicts measured bucketed steps (a `--mode=buckets` record's runs,
    each step against its own computation alone), by least squares over a grid of 0.001."""
    bucketed = [r for r in runs if r["allreduce_buckets"] > 1]
    if not bucketed:
        raise ValueError("no run with more than one bucket to fit an overlap to")

    def error(overlap):
        return sum((bucketed_step(pieces, cuts[r["allreduce_buckets"]], r["compute_ms"] / 1000, n, link,
                                  bytes_per_param, overlap, fusion_bytes, micro_batches)["step_s"]
                    - r["step_ms"] / 1000) ** 2 for r in bucketed)
    errors = [error(i / 1000) for i in range(1001)]
    if max(errors) - min(errors) <= 1e-12 * max(1.0, max(errors)):
        raise ValueError("the modelled steps do not depend on the overlap (every allreduce waits for the end of "
                         "the backward pass), so these runs cannot measure it")
    return errors.index(min(errors)) / 1000


def plot(curves: dict[str, list[dict]], path: str, title: str, notes: str = "",
         measured: tuple[int, float] | None = None) -> None:
    """Efficiency against GPU count, one line per scenario (and the measured point), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for label, rows in curves.items():
        ax.plot([r["gpus"] for r in rows], [100 * r["efficiency"] for r in rows], marker="o", label=label)
    xs = sorted({r["gpus"] for rows in curves.values() for r in rows})
    if measured:
        ax.plot([measured[0]], [100 * measured[1]], marker="*", markersize=14, linestyle="none", color="black",
                label=f"measured here at {measured[0]} ranks (calibration point)")
        xs = sorted(set(xs) | {measured[0]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_ylim(0, 105)
    ax.set_xlabel("data-parallel workers (GPUs)")
    ax.set_ylabel("scaling efficiency (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if notes:
        fig.text(0.01, 0.01, notes, fontsize=6.5, va="bottom", family="monospace")
        fig.subplots_adjust(bottom=0.28)
    fig.savefig(path)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class GpuScenario:
    """A GPU cluster to extrapolate to: per-GPU compute time from FLOPs, links from data sheets."""
    params: int
    flops_per_token: float
    tokens_per_gpu_step: int
    peak_flops: float
    assumed_mfu: float
    wire_bytes_per_param: int
    cluster: Cluster
    micro_batches: int = 1  # tokens_per_gpu_step is accumulated over this many forward/backward passes

    @property
    def compute_s(self) -> float:
        return self.tokens_per_gpu_step * self.flops_per_token / (self.peak_flops * self.assumed_mfu)

    @property
    def grad_bytes(self) -> int:
        return self.params * self.wire_bytes_per_param


def local_calibration(step_record: dict) -> dict:
    """Fits alpha and beta to an N-rank benchmark record (N >= 2) and checks the fit.

    The record's allreduce of the gradients gives beta, its 4-byte allreduce gives alpha; the
    compute time is the measured step minus the measured allreduce. At the calibration point the
    model's allreduce time and efficiency equal the measured ones by construction.
    """
    n = step_record["world_size"]
    latency = latency_from_small_allreduce(step_record["latency_allreduce_ms"] / 1000, n)
    link = calibrate_link(step_record["grad_bytes"], n, step_record["allreduce_ms"] / 1000, latency)
    compute_s = (step_record["step_ms_median"] - step_record["allreduce_ms"]) / 1000
    predicted_ar = ring_allreduce_seconds(step_record["grad_bytes"], n, link)
    return {"world_size": n, "latency_s": link.latency_s, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
            "compute_s": compute_s, "grad_bytes": step_record["grad_bytes"],
            "measured_allreduce_s": step_record["allreduce_ms"] / 1000, "predicted_allreduce_s": predicted_ar,
            "measured_efficiency": 1 - step_record["allreduce_share"],
            "predicted_efficiency": efficiency(compute_s, predicted_ar)}


def report(calibration_record: dict, scenario: GpuScenario, plot_path: str = "", pieces: Sequence[Piece] = (),
           cuts: dict[int, Sequence[int]] | None = None, overlap: float = 1.0) -> tuple[dict, list[list]]:
    """Calibration, GPU predictions (fp32 and 16-bit gradients, then 16-bit gradients in each
    bucket count of `cuts` over the scenario model's `pieces`) and the local curve; optional PNG.

    Returns the JSON-able result and a table (header row first) of efficiency per GPU count.
    """
    local = local_calibration(calibration_record)
    local_link = Link(local["bandwidth_bytes_per_s"], local["latency_s"])
    gpu = f"GPU: {scenario.params / 1e6:.0f}M params, {scenario.compute_s * 1e3:.0f} ms compute"
    curves = {
        f"{gpu}, {scenario.wire_bytes_per_param * 8}-bit gradients": predict(
            scenario.cluster, scenario.grad_bytes, scenario.compute_s),
        f"{gpu}, 16-bit gradients": predict(scenario.cluster, scenario.params * 2, scenario.compute_s),
        **{f"16-bit gradients, {b} buckets": predict_bucketed(scenario.cluster, pieces, cut, scenario.compute_s, 2, overlap,
                                                               micro_batches=scenario.micro_batches)
           for b, cut in sorted((cuts or {}).items()) if b > 1},
        "this machine's calibrated link and compute": predict(
            Cluster(local_link, local_link, 1 << 30), local["grad_bytes"], local["compute_s"]),
    }
    c = scenario.cluster
    result = {"mode": "costmodel", "calibration": local,
              "gpu_scenario": {**{k: v for k, v in dataclasses.asdict(scenario).items() if k != "cluster"},
                               "cluster": dataclasses.asdict(c), "compute_s": scenario.compute_s,
                               "grad_bytes": scenario.grad_bytes, "overlap": overlap,
                               "pieces": [dataclasses.asdict(p) for p in pieces],
                               "bucket_cuts": {str(b): list(cut) for b, cut in sorted((cuts or {}).items())}},
              "curves": curves}
    if plot_path:
        notes = (f"intra-node alpha {c.intra_node.latency_s * 1e6:.1f} us, beta {c.intra_node.bandwidth_bytes_per_s / 1e9:.0f} GB/s; "
                 f"inter-node alpha {c.inter_node.latency_s * 1e6:.1f} us, beta {c.inter_node.bandwidth_bytes_per_s / 1e9:.0f} GB/s; "
                 f"{c.gpus_per_node} GPUs/node\n"
                 f"GPU compute = {scenario.tokens_per_gpu_step} tokens x {scenario.flops_per_token:.3g} FLOP / "
                 f"({scenario.peak_flops / 1e12:.0f} TFLOP/s x MFU {scenario.assumed_mfu}); 64 MiB fusion buffers\n"
                 f"local fit ({local['world_size']} ranks): alpha {local['latency_s'] * 1e6:.1f} us, "
                 f"beta {local['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, compute {local['compute_s'] * 1e3:.1f} ms")
        plot(curves, plot_path, "tfllm data parallelism: ring-allreduce model (flat ring; buckets overlap the backward)",
             notes,
             measured=(local["world_size"], local["measured_efficiency"]))
    first = next(iter(curves.values()))
    rows = [[row["gpus"]] + [f"{100 * curve[i]['efficiency']:.1f}%" for curve in curves.values()]
            for i, row in enumerate(first)]
    return result, [["GPUs"] + list(curves)] + rows
