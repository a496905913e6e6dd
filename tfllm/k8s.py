"""MPIJob rendering and submission for Kubeflow's mpi-operator (kubeflow.org/v2beta1).

The MPIJob is rendered from the same template the kustomize base uses
(`k8s/base/mpijob.yaml`), so the CLI and the overlays cannot drift apart. A job request
becomes two objects: a ConfigMap holding the chosen flagfile (and the flagfiles it includes)
and the MPIJob whose launcher runs the pretraining pipeline through mpirun. The shared volume
and TensorBoard are applied once from the kustomize base.

Submission uses the official `kubernetes` client: create (or replace) both objects, then
follow the launcher pod's log until the job succeeds or fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

from tfllm.config import ConfigError

GROUP, VERSION, PLURAL = "kubeflow.org", "v2beta1", "mpijobs"
FLAGS_MOUNT_DIR = "flags"  # relative to the launcher's working directory, as in a checkout
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")
_INCLUDE = re.compile(r"^\s*--flagfile=(\S+)\s*$")


@dataclasses.dataclass(frozen=True)
class JobRequest:
    name: str
    flagfile: str
    image: str
    workers: int = 2
    gpus_per_worker: int = 0
    slots_per_worker: int = 0  # 0: = gpus_per_worker on GPU nodes, 1 on CPU nodes
    namespace: str = "default"
    model_dir: str = ""  # default /data/runs/<name>/model on the shared volume
    data_dir: str = ""
    worker_cpu: str = ""
    worker_memory: str = ""
    extra_args: tuple[str, ...] = ()

    @property
    def slots(self) -> int:
        return self.slots_per_worker or self.gpus_per_worker or 1


def validate(req: JobRequest) -> None:
    """Refuses requests a cluster would reject or run wrongly, before anything is sent."""
    if not _NAME.match(req.name):
        raise ConfigError(f"--name={req.name!r}: use lower-case letters, digits and '-' (at most 52 characters)")
    if req.workers < 1:
        raise ConfigError(f"--workers={req.workers}: an MPIJob needs at least one worker")
    if req.gpus_per_worker < 0 or req.slots_per_worker < 0:
        raise ConfigError("--gpus_per_worker and --slots_per_worker must be >= 0")
    if req.gpus_per_worker and req.slots_per_worker and req.slots_per_worker != req.gpus_per_worker:
        raise ConfigError(f"--slots_per_worker={req.slots_per_worker} does not match --gpus_per_worker="
                          f"{req.gpus_per_worker}: Horovod runs one rank per GPU, so slots must equal GPUs")
    if not req.image:
        raise ConfigError("--image is required (e.g. ghcr.io/you/tfllm-gpu:0.1.0)")
    if not os.path.isfile(req.flagfile):
        raise ConfigError(f"flagfile {req.flagfile}: no such file")
    for path in (req.model_dir, req.data_dir):
        if path and not path.startswith("/"):
            raise ConfigError(f"{path!r}: model and data dirs must be absolute paths on the shared volume (/data/...)")


def flagfile_bundle(flagfile: str) -> dict[str, str]:
    """The flagfile and every flagfile it includes, keyed by file name (the ConfigMap's data).

    Includes are resolved relative to the working directory, as absl does; in the pod the
    working directory holds the ConfigMap at `flags/`, so only `flags/<name>` includes work there.
    """
    bundle: dict[str, str] = {}

    def add(path: str, included_from: str = "") -> None:
        name = os.path.basename(path)
        if included_from and os.path.normpath(path) != os.path.join(FLAGS_MOUNT_DIR, name):
            raise ConfigError(f"{included_from} includes --flagfile={path}: in the pod only flags/<name> includes "
                              f"resolve; use --flagfile=flags/{name}")
        if not os.path.isfile(path):
            raise ConfigError(f"flagfile {path}" + (f" (included from {included_from})" if included_from else "")
                              + ": no such file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"flagfile {path}: cannot read it ({e})") from None
        if name in bundle:
            if bundle[name] != text:
                raise ConfigError(f"two different flagfiles are named {name}")
            return
        bundle[name] = text
        for line in text.splitlines():
            m = _INCLUDE.match(line)
            if m:
                add(m.group(1), path)

    add(flagfile)
    return bundle


def render(template: dict, req: JobRequest) -> list[dict]:
    """[ConfigMap, MPIJob] for the request, from the kustomize base's MPIJob template."""
    validate(req)
    bundle = flagfile_bundle(req.flagfile)
    job = json.loads(json.dumps(template))  # a deep copy that also unshares YAML anchors
    configmap_name = f"{req.name}-flags"
    labels = {"app.kubernetes.io/name": "tfllm", "app.kubernetes.io/instance": req.name}
    job["metadata"] = {"name": req.name, "namespace": req.namespace, "labels": labels}
    spec = job["spec"]
    spec["slotsPerWorker"] = req.slots
    spec["mpiReplicaSpecs"]["Worker"]["replicas"] = req.workers
    model_dir = req.model_dir or f"/data/runs/{req.name}/model"
    data_dir = req.data_dir or f"/data/runs/{req.name}/data"
    for role in ("Launcher", "Worker"):
        pod = spec["mpiReplicaSpecs"][role]["template"]
        pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        container = pod["spec"]["containers"][0]
        container["image"] = req.image
        for volume in pod["spec"]["volumes"]:
            if "configMap" in volume:
                volume["configMap"]["name"] = configmap_name
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    args = launcher["args"]
    entry = args.index("pipelines.pretrain") + 1
    launcher["args"] = args[:entry] + [f"--flagfile={FLAGS_MOUNT_DIR}/{os.path.basename(req.flagfile)}",
                                       f"--model_dir={model_dir}", f"--data_dir={data_dir}", *req.extra_args]
    worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    if req.worker_cpu:
        resources["requests"]["cpu"] = resources["limits"]["cpu"] = req.worker_cpu
    if req.worker_memory:
        resources["requests"]["memory"] = resources["limits"]["memory"] = req.worker_memory
    if req.gpus_per_worker:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = req.gpus_per_worker
        worker["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        # NCCL moves data through /dev/shm; the container default (64 MiB) is far too small.
        worker["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        worker["containers"][0]["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": configmap_name, "namespace": req.namespace, "labels": labels},
                 "data": bundle}
    return [configmap, job]


def launcher_command(job: dict) -> list[str]:
    container = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    return list(container.get("command", [])) + list(container.get("args", []))


# ---------------------------------------------------------------- submission

def apply(objects: list[dict], api_client) -> None:
    """Creates the ConfigMap (replacing one of the same name) and the MPIJob."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    for obj in objects:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            if obj["kind"] == "ConfigMap":
                try:
                    core.create_namespaced_config_map(ns, obj)
                except ApiException as e:
                    if e.status != 409:
                        raise
                    core.replace_namespaced_config_map(name, ns, obj)
            else:
                custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, obj)
        except ApiException as e:
            detail = (e.body or e.reason or "").strip().replace("\n", " ")[:300]
            raise ConfigError(f"the API server refused {obj['kind']} {ns}/{name}: HTTP {e.status} {detail}") from None


def job_phase(job: dict) -> str:
    """'Succeeded', 'Failed' or 'Running' from the MPIJob's status conditions."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Succeeded", "Failed"):
            return cond["type"]
    return "Running"


def follow(name: str, namespace: str, api_client, out, poll_s: float = 5.0, timeout_s: float = 0) -> str:
    """Streams the launcher's log to `out` and returns the job's final phase."""
    from kubernetes import client

    core, custom = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client)
    selector = f"training.kubeflow.org/job-name={name},training.kubeflow.org/job-role=launcher"
    start, streamed = time.monotonic(), set()
    while True:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            if pod.metadata.name in streamed or pod.status.phase in ("Pending", None):
                continue
            streamed.add(pod.metadata.name)
            print(f"--- {pod.metadata.name}", file=out, flush=True)
            stream = core.read_namespaced_pod_log(pod.metadata.name, namespace, follow=True, _preload_content=False)
            for chunk in stream.stream():
                out.write(chunk.decode("utf-8", "replace"))
                out.flush()
        phase = job_phase(job)
        if phase != "Running":
            return phase
        if timeout_s and time.monotonic() - start > timeout_s:
            raise ConfigError(f"MPIJob {namespace}/{name} still running after {timeout_s:.0f} s (it keeps running)")
        time.sleep(poll_s)
