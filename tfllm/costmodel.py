"""Ring-allreduce cost model: predicted data-parallel scaling efficiency for 8 to 512 GPUs.

A ring allreduce of B bytes over N workers sends 2 (N-1)/N B bytes through every worker's
link in 2 (N-1) steps (reduce-scatter then allgather), so

    t_allreduce(N) = 2 (N-1) alpha  +  2 (N-1)/N * B / beta

with alpha the per-step latency and beta the link ("bus") bandwidth in bytes/s. Horovod fuses
gradients into buffers of at most `fusion_bytes` (HOROVOD_FUSION_THRESHOLD, 64 MiB by default)
and runs one ring per buffer, so the latency term is paid once per buffer.

Assumptions (the plot and README state them too):
- tfllm's step runs the allreduce after the backward pass (no overlap), so
  t_step(N) = t_compute + t_allreduce(N) and efficiency(N) = t_compute / t_step(N). Weak
  scaling: the per-GPU batch, hence t_compute, does not change with N.
- A flat ring: once it leaves a node, every hop is limited by the inter-node bandwidth per GPU.
  NCCL's trees and hierarchical rings do better on latency at large N; this is the pessimistic
  bound.
- alpha and beta are constants; congestion, stragglers and input pipeline stalls are ignored.

Calibration solves the same formula for beta from one measured allreduce (and alpha from one
of a few bytes), so the model reproduces the measured point exactly.
"""

from __future__ import annotations

import dataclasses
import math

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


def report(calibration_record: dict, scenario: GpuScenario, plot_path: str = "") -> tuple[dict, list[list]]:
    """Calibration, GPU predictions (fp32 and 16-bit gradients) and the local curve; optional PNG.

    Returns the JSON-able result and a table (header row first) of efficiency per GPU count.
    """
    local = local_calibration(calibration_record)
    local_link = Link(local["bandwidth_bytes_per_s"], local["latency_s"])
    gpu = f"GPU: {scenario.params / 1e6:.0f}M params, {scenario.compute_s * 1e3:.0f} ms compute"
    curves = {
        f"{gpu}, {scenario.wire_bytes_per_param * 8}-bit gradients": predict(
            scenario.cluster, scenario.grad_bytes, scenario.compute_s),
        f"{gpu}, 16-bit gradients": predict(scenario.cluster, scenario.params * 2, scenario.compute_s),
        "this machine's calibrated link and compute": predict(
            Cluster(local_link, local_link, 1 << 30), local["grad_bytes"], local["compute_s"]),
    }
    c = scenario.cluster
    result = {"mode": "costmodel", "calibration": local,
              "gpu_scenario": {**{k: v for k, v in dataclasses.asdict(scenario).items() if k != "cluster"},
                               "cluster": dataclasses.asdict(c), "compute_s": scenario.compute_s,
                               "grad_bytes": scenario.grad_bytes},
              "curves": curves}
    if plot_path:
        notes = (f"intra-node alpha {c.intra_node.latency_s * 1e6:.1f} us, beta {c.intra_node.bandwidth_bytes_per_s / 1e9:.0f} GB/s; "
                 f"inter-node alpha {c.inter_node.latency_s * 1e6:.1f} us, beta {c.inter_node.bandwidth_bytes_per_s / 1e9:.0f} GB/s; "
                 f"{c.gpus_per_node} GPUs/node\n"
                 f"GPU compute = {scenario.tokens_per_gpu_step} tokens x {scenario.flops_per_token:.3g} FLOP / "
                 f"({scenario.peak_flops / 1e12:.0f} TFLOP/s x MFU {scenario.assumed_mfu}); 64 MiB fusion buffers\n"
                 f"local fit ({local['world_size']} ranks): alpha {local['latency_s'] * 1e6:.1f} us, "
                 f"beta {local['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, compute {local['compute_s'] * 1e3:.1f} ms")
        plot(curves, plot_path, "tfllm data parallelism: ring-allreduce model (no overlap, flat ring)", notes,
             measured=(local["world_size"], local["measured_efficiency"]))
    first = next(iter(curves.values()))
    rows = [[row["gpus"]] + [f"{100 * curve[i]['efficiency']:.1f}%" for curve in curves.values()]
            for i, row in enumerate(first)]
    return result, [["GPUs"] + list(curves)] + rows
