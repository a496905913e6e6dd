r"""Renders a tfllm pretraining MPIJob (and its flagfile ConfigMap); prints, writes or submits it.

Apply the shared volume and TensorBoard once (kubectl apply -k k8s/base), then per job:
    python -m pipelines.submit --name=gpt2-4x8 --workers=4 --gpus_per_worker=8 \
        --image=ghcr.io/you/tfllm-gpu:0.1.0 --job_flagfile=flags/gpt2_124m.cfg --extra_args=--corpus=/data/text
    python -m pipelines.submit ... --output=job.yaml          # write instead of printing
    python -m pipelines.submit ... --apply --follow            # submit, then stream the launcher's log
The launcher runs `mpirun python -m pipelines.pretrain --flagfile=flags/<file> --model_dir=...`:
the same command line as `horovodrun -np N python -m pipelines.pretrain ...` or
`mpirun -np N python -m pipelines.pretrain ...` on a single machine. Invalid requests (no workers,
slots that differ from GPUs per worker, a missing flagfile) are refused before anything is sent.
"""

import dataclasses
import pathlib
import sys

from tfllm import cli
from tfllm.config import ConfigError
from tfllm.flags import Options, define_options, option, read_options
from tfllm.k8s import JobRequest, apply, follow, render

TEMPLATE = pathlib.Path(__file__).resolve().parents[1] / "k8s" / "base" / "mpijob.yaml"



@dataclasses.dataclass(frozen=True)
class SubmitOptions(Options):
    name: str = option("tfllm-pretrain", "MPIJob name (also names the run directory on the volume).")
    namespace: str = option("default", "Kubernetes namespace.")
    workers: int = option(2, "Worker pods.")
    gpus_per_worker: int = option(0, "GPUs per worker pod (0: CPU workers).")
    slots_per_worker: int = option(0, "Ranks per worker (0: = GPUs per worker, or 1 on CPU).")
    image: str = option("", "Container image built from k8s/images/{cpu,gpu}.Dockerfile.")
    job_flagfile: str = option("flags/tiny.cfg", "Pretraining flagfile shipped to the pods in a ConfigMap.")
    model_dir: str = option("", "Model dir on the shared volume (default /data/runs/<name>/model).")
    data_dir: str = option("", "Prepared data dir on the shared volume (default /data/runs/<name>/data).")
    worker_cpu: str = option("", "CPU request and limit per worker (e.g. 64).")
    worker_memory: str = option("", "Memory request and limit per worker (e.g. 512Gi).")
    extra_args: list = option([], "More pretraining flags, comma-separated (e.g. --corpus=/data/text).")
    output: str = option("-", "Write the manifests here ('-': stdout).")
    apply: bool = option(False, "Submit through the Kubernetes API (kubeconfig or in-cluster config).")
    follow: bool = option(False, "With --apply: stream the launcher's log and exit with the job's result.")
    kubeconfig: str = option("", "Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster).")
    context: str = option("", "Kubeconfig context.")
    follow_timeout: float = option(0.0, "With --follow: give up after so many seconds (0: never).")


define_options(SubmitOptions)


def _api_client(opts: SubmitOptions):
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=opts.kubeconfig or None, context=opts.context or None)
    except (config.ConfigException, OSError) as e:
        if opts.kubeconfig:
            raise ConfigError(f"--kubeconfig={opts.kubeconfig}: {e}") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ConfigError(f"no Kubernetes configuration: {e}") from None
        return client.ApiClient()


def main(argv):
    import yaml

    opts = read_options(SubmitOptions)
    req = JobRequest(name=opts.name, flagfile=opts.job_flagfile, image=opts.image, workers=opts.workers,
                     gpus_per_worker=opts.gpus_per_worker, slots_per_worker=opts.slots_per_worker,
                     namespace=opts.namespace, model_dir=opts.model_dir, data_dir=opts.data_dir,
                     worker_cpu=opts.worker_cpu, worker_memory=opts.worker_memory, extra_args=tuple(opts.extra_args))
    objects = render(yaml.safe_load(TEMPLATE.read_text()), req)
    text = yaml.safe_dump_all(objects, sort_keys=False)
    if opts.output == "-":
        if not opts.apply:
            sys.stdout.write(text)
    else:
        from tfllm.atomic import write_text

        write_text(opts.output, text)
        print(f"wrote {opts.output}", file=sys.stderr)
    if not opts.apply:
        return
    api = _api_client(opts)
    apply(objects, api)
    print(f"submitted MPIJob {req.namespace}/{req.name} ({req.workers} workers x {req.slots} slots)", flush=True)
    if opts.follow:
        phase = follow(req.name, req.namespace, api, sys.stdout, timeout_s=opts.follow_timeout)
        print(f"MPIJob {req.namespace}/{req.name}: {phase}", flush=True)
        if phase != "Succeeded":
            sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
