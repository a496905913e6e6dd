"""Renders a tfllm pretraining MPIJob (and its flagfile ConfigMap); prints, writes or submits it.

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

import pathlib
import sys

from absl import flags

from tfllm import cli
from tfllm.config import ConfigError
from tfllm.k8s import JobRequest, apply, follow, render

TEMPLATE = pathlib.Path(__file__).resolve().parents[1] / "k8s" / "base" / "mpijob.yaml"

flags.DEFINE_string("name", "tfllm-pretrain", "MPIJob name (also names the run directory on the volume).")
flags.DEFINE_string("namespace", "default", "Kubernetes namespace.")
flags.DEFINE_integer("workers", 2, "Worker pods.")
flags.DEFINE_integer("gpus_per_worker", 0, "GPUs per worker pod (0: CPU workers).")
flags.DEFINE_integer("slots_per_worker", 0, "Ranks per worker (0: = GPUs per worker, or 1 on CPU).")
flags.DEFINE_string("image", "", "Container image built from k8s/images/{cpu,gpu}.Dockerfile.")
flags.DEFINE_string("job_flagfile", "flags/tiny.cfg", "Pretraining flagfile shipped to the pods in a ConfigMap.")
flags.DEFINE_string("model_dir", "", "Model dir on the shared volume (default /data/runs/<name>/model).")
flags.DEFINE_string("data_dir", "", "Prepared data dir on the shared volume (default /data/runs/<name>/data).")
flags.DEFINE_string("worker_cpu", "", "CPU request and limit per worker (e.g. 64).")
flags.DEFINE_string("worker_memory", "", "Memory request and limit per worker (e.g. 512Gi).")
flags.DEFINE_list("extra_args", [], "More pretraining flags, comma-separated (e.g. --corpus=/data/text).")
flags.DEFINE_string("output", "-", "Write the manifests here ('-': stdout).")
flags.DEFINE_bool("apply", False, "Submit through the Kubernetes API (kubeconfig or in-cluster config).")
flags.DEFINE_bool("follow", False, "With --apply: stream the launcher's log and exit with the job's result.")
flags.DEFINE_string("kubeconfig", "", "Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster).")
flags.DEFINE_string("context", "", "Kubeconfig context.")
flags.DEFINE_float("follow_timeout", 0, "With --follow: give up after so many seconds (0: never).")
FLAGS = flags.FLAGS


def _api_client():
    from kubernetes import client, config

    try:
        return config.new_client_from_config(config_file=FLAGS.kubeconfig or None, context=FLAGS.context or None)
    except (config.ConfigException, OSError) as e:
        if FLAGS.kubeconfig:
            raise ConfigError(f"--kubeconfig={FLAGS.kubeconfig}: {e}") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise ConfigError(f"no Kubernetes configuration: {e}") from None
        return client.ApiClient()


def main(argv):
    import yaml

    req = JobRequest(name=FLAGS.name, flagfile=FLAGS.job_flagfile, image=FLAGS.image, workers=FLAGS.workers,
                     gpus_per_worker=FLAGS.gpus_per_worker, slots_per_worker=FLAGS.slots_per_worker,
                     namespace=FLAGS.namespace, model_dir=FLAGS.model_dir, data_dir=FLAGS.data_dir,
                     worker_cpu=FLAGS.worker_cpu, worker_memory=FLAGS.worker_memory, extra_args=tuple(FLAGS.extra_args))
    objects = render(yaml.safe_load(TEMPLATE.read_text()), req)
    text = yaml.safe_dump_all(objects, sort_keys=False)
    if FLAGS.output == "-":
        if not FLAGS.apply:
            sys.stdout.write(text)
    else:
        from tfllm.atomic import write_text

        write_text(FLAGS.output, text)
        print(f"wrote {FLAGS.output}", file=sys.stderr)
    if not FLAGS.apply:
        return
    api = _api_client()
    apply(objects, api)
    print(f"submitted MPIJob {req.namespace}/{req.name} ({req.workers} workers x {req.slots} slots)", flush=True)
    if FLAGS.follow:
        phase = follow(req.name, req.namespace, api, sys.stdout, timeout_s=FLAGS.follow_timeout)
        print(f"MPIJob {req.namespace}/{req.name}: {phase}", flush=True)
        if phase != "Succeeded":
            sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
