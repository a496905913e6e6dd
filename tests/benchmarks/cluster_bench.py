r"""Step and allreduce times across emulated hosts on shaped links; the cost model calibrated on
2 hosts and checked against 3.

    python tests/benchmarks/cluster_bench.py --output_json=.bench/cluster.json     # or: make bench-cluster

For each link rate (tc tbf, both directions) and model, `pipelines.benchmark --mode=step` runs
under horovodrun on 2 and then 3 hosts of one emulated cluster (one rank per host). The 2-host
record calibrates tfllm/costmodel.py's link (alpha from the 4-byte allreduce, beta from the
gradients' allreduce); its 3-host prediction of the gradient allreduce is set against the
3-host measurement. With --buckets, `--mode=buckets` runs instead, and the cost model's overlap
(the share of the link's speed an allreduce keeps during the backward pass) is fitted on 2 hosts
and predicts the 3-host steps. The hosts share this machine's 2 cores, so compute is inflated and each rank
gets one intra-op thread; the allreduce figures are the ones that speak for real links. With --pin each
host runs on one core of its own, as one-core machines would (a third host shares the first one's):

    python tests/benchmarks/cluster_bench.py --buckets --pin --rates=1gbit --host_counts=2 --bench_steps=15 \
        --models=shakespeare_x10_deep [--model_flags=--batch_size=24]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "cluster")]

from emulated import Cluster  # noqa: E402
from tfllm.costmodel import Link, local_calibration, ring_allreduce_seconds  # noqa: E402

MODELS = {
    "shakespeare_char": ["--flagfile=flags/shakespeare_char.cfg"],
    # About 10x the parameters: width 384 (6 heads) instead of 128, same depth and context.
    "shakespeare_x10": ["--flagfile=flags/shakespeare_char.cfg", "--hidden_dim=384", "--num_heads=6"],
    # About 10x too, but deep enough for 8 allreduce buckets (a 4-layer model has 6 units).
    "shakespeare_x10_deep": ["--flagfile=flags/shakespeare_char.cfg", "--num_layers=10", "--hidden_dim=256",
                             "--num_heads=8"],
}
# --buckets: the --allreduce_buckets values compared per model (at most layers + 2).
BUCKETS = {"shakespeare_char": "1,2,4,6", "shakespeare_x10": "1,2,4,6", "shakespeare_x10_deep": "1,2,4,8"}


def run_step(cluster: Cluster, hosts: int, model_flags: list[str], steps: int, out: pathlib.Path,
             mode: list[str] = ("--mode=step",)) -> dict:
    bin_dir = pathlib.Path(sys.executable).parent
    spec = ",".join(f"h{i}:1" for i in range(1, hosts + 1))
    argv = [str(bin_dir / "horovodrun"), "-np", str(hosts), "-H", spec, "--gloo", "--disable-cache", sys.executable,
            "-m", "pipelines.benchmark", *model_flags, *mode, f"--bench_steps={steps}",
            "--parallel_slices=1", f"--output_json={out}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", TF_NUM_INTRAOP_THREADS="1",
               TF_NUM_INTEROP_THREADS="2")
    log = out.with_suffix(".log")
    try:
        proc = cluster.run(argv, cwd=str(REPO), env=env, timeout=900)
    except subprocess.TimeoutExpired as e:
        _save(log, argv, e.stdout, e.stderr)
        raise SystemExit(f"error: benchmark on {hosts} hosts did not finish within 900 s (output: {log})") from None
    if proc.returncode != 0:
        _save(log, argv, proc.stdout, proc.stderr)
        # A traceback ends stderr; stdout holds the ranks' normal output, read only when stderr is empty.
        lines = [line.strip() for line in (proc.stderr or proc.stdout or "no output").splitlines() if line.strip()]
        detail = ([line for line in lines if "error" in line.lower()] or lines or ["no output"])[-1]
        raise SystemExit(f"error: benchmark on {hosts} hosts failed (exit {proc.returncode}): {detail} (output: {log})")
    return json.loads(out.read_text())


def _save(log: pathlib.Path, argv: list[str], stdout, stderr) -> None:
    text = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (stdout, stderr)]
    log.write_text(f"$ {' '.join(argv)}\n--- stdout\n{text[0]}\n--- stderr\n{text[1]}")


def overlap_model(model_flags: list[str], step2: pathlib.Path, record: pathlib.Path, out: pathlib.Path,
                  overlap: float = -1.0) -> dict:
    """pipelines.benchmark --mode=costmodel on a bucket record: the link fitted on the 2-host step, the
    overlap fitted on this record (-1) or given (the 2-host fit, to predict 3 hosts)."""
    argv = [sys.executable, "-m", "pipelines.benchmark", *model_flags, "--mode=costmodel",
            f"--calibration_json={step2}", f"--buckets_json={record}", f"--local_overlap={overlap}",
            f"--output_json={out}"]
    try:
        proc = subprocess.run(argv, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2"),
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: the cost model on {record} did not finish within 600 s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"error: the cost model on {record} failed: {last}")
    return json.loads(out.read_text())["local_overlap"]


def buckets(args, out_dir: pathlib.Path) -> int:
    """Step, compute and exposed allreduce per bucket count, 2 and 3 hosts, each rate and model; the
    cost model's overlap fitted on 2 hosts (link from a 2-host step) and its 3-host prediction."""
    rows = []
    with Cluster(3, pin=args.pin) as cluster:
        for rate in args.rates.split(","):
            cluster.set_rate(rate)
            for name in args.models.split(","):
                step2 = out_dir / f"buckets-step-{rate}-{name}-2.json"
                run_step(cluster, 2, MODELS[name], args.bench_steps, step2)
                overlap = -1.0
                for n in args.host_counts:
                    record = out_dir / f"buckets-{rate}-{name}-{n}.json"
                    r = run_step(cluster, n, MODELS[name], args.bench_steps, record,
                                 mode=("--mode=buckets", f"--bench_buckets={BUCKETS[name]}"))
                    fit = overlap_model(MODELS[name], step2, record, out_dir / f"overlap-{rate}-{name}-{n}.json", overlap)
                    overlap = fit["overlap"]
                    model = {m["allreduce_buckets"]: m for m in fit["runs"]}
                    rows += [{"rate": rate, "model": name, "hosts": n, "params": r["params"],
                              "allreduce_ms": r["allreduce_ms"], "overlap": overlap, "overlap_fitted": fit["fitted"],
                              "predicted_step_ms": model[run["allreduce_buckets"]]["predicted_step_ms"],
                              "predicted_hidden_share": model[run["allreduce_buckets"]]["predicted_hidden_share"],
                              **run} for run in r["runs"]]
                    print(json.dumps(rows[-1]), flush=True)
    pathlib.Path(args.output_json).write_text(json.dumps(rows, indent=1))
    print("| link | model | hosts | buckets | step ms | compute ms | allreduce ms | exposed ms | hidden | step vs B=1 "
          "| model: overlap, step ms, hidden |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        how = "fitted" if r["overlap_fitted"] else "from 2 hosts"
        print(f"| {r['rate']} | {r['model']} | {r['hosts']} | {r['allreduce_buckets']} | {r['step_ms']:.1f} | "
              f"{r['compute_ms']:.1f} | {r['allreduce_ms']:.1f} | {r['exposed_allreduce_ms']:.1f} | "
              f"{100 * r['hidden_share']:.0f}% | {r['step_over_unbucketed']:.3f} | {r['overlap']:.3f} ({how}), "
              f"{r['predicted_step_ms']:.1f}, {100 * r['predicted_hidden_share']:.0f}% |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="1gbit,10gbit")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--bench_steps", type=int, default=30)
    p.add_argument("--buckets", action="store_true",
                   help="compare --allreduce_buckets values (step, compute, hidden allreduce) instead")
    p.add_argument("--model_flags", default="",
                   help="added to every model's flags, e.g. --batch_size=24 (more compute per gradient byte)")
    p.add_argument("--host_counts", default="2,3",
                   help="--buckets: the cluster sizes, 2 first (the overlap is fitted there)")
    p.add_argument("--pin", action="store_true",
                   help="one core per host (h1, h2 on cores 0, 1; h3 shares core 0), as separate machines would have")
    p.add_argument("--output_json", default="", help="default: .bench/cluster.json, or .bench/cluster-buckets.json")
    args = p.parse_args()
    if args.host_counts not in ("2", "2,3"):
        raise SystemExit(f"error: --host_counts={args.host_counts}: 2, or 2,3")
    args.host_counts = [int(n) for n in args.host_counts.split(",")]
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"error: --models: no model {unknown[0]!r} (known: {', '.join(MODELS)})")
    try:
        extra = shlex.split(args.model_flags)
    except ValueError as e:
        raise SystemExit(f"error: --model_flags={args.model_flags!r}: {e}") from None
    for name in MODELS:
        MODELS[name] = MODELS[name] + extra
    args.output_json = args.output_json or (".bench/cluster-buckets.json" if args.buckets else ".bench/cluster.json")
    out_dir = pathlib.Path(args.output_json).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.buckets:
        return buckets(args, out_dir)
    rows = []
    with Cluster(3, pin=args.pin) as cluster:
        for rate in args.rates.split(","):
            cluster.set_rate(rate)
            for name in args.models.split(","):
                records = {n: run_step(cluster, n, MODELS[name], args.bench_steps, out_dir / f"cluster-{rate}-{name}-{n}.json")
                           for n in (2, 3)}
                cal = local_calibration(records[2])
                predicted = ring_allreduce_seconds(records[3]["grad_bytes"], 3,
                                                   Link(cal["bandwidth_bytes_per_s"], cal["latency_s"]))
                for n, r in records.items():
                    rows.append({"rate": rate, "model": name, "hosts": n, "params": r.get("params"),
                                 "grad_bytes": r["grad_bytes"], "step_ms": r["step_ms_median"],
                                 "allreduce_ms": r["allreduce_ms"], "allreduce_share": r["allreduce_share"],
                                 "predicted_allreduce_ms": 1000 * predicted if n == 3 else None,
                                 "calibrated_bandwidth_gbit": 8 * cal["bandwidth_bytes_per_s"] / 1e9,
                                 "latency_us": 1e6 * cal["latency_s"]})
                print(json.dumps(rows[-2:]), flush=True)
    pathlib.Path(args.output_json).write_text(json.dumps(rows, indent=1))
    print("| link | model | hosts | step ms | allreduce ms (share) | 3-host allreduce predicted from 2 | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pred = r["predicted_allreduce_ms"]
        err = f"{100 * (pred - r['allreduce_ms']) / r['allreduce_ms']:+.1f}%" if pred else ""
        print(f"| {r['rate']} | {r['model']} | {r['hosts']} | {r['step_ms']:.1f} | {r['allreduce_ms']:.1f} "
              f"({100 * r['allreduce_share']:.1f}%) | {f'{pred:.1f}' if pred else ''} | {err} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
