"""Kubernetes manifests: kustomize overlays and the submit CLI against the real schemas, the
cpu-smoke launcher command run locally, --apply against a fake API server, the images."""

import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import threading

import pytest
import yaml

from conftest import BIN, REPO, SHARED, run, subprocess_env

CRD = SHARED / "k8s" / "kubeflow.org_mpijobs.yaml"
OVERLAYS = {"cpu-smoke": (2, 1, 0), "gpu-single-node": (1, 8, 8), "gpu-multi-node": (4, 8, 8)}  # workers, slots, GPUs
K8S_VERSION = "1.30"


def _strict(schema):
    """The CRD schema with unknown fields rejected (a real API server prunes them silently)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def mpijob_validator():
    import jsonschema

    if not CRD.exists():
        pytest.skip(f"{CRD} not present")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def validate_objects(docs, mpijob_validator):
    """MPIJobs against the CRD (plus each pod template as a core Pod); the rest against core schemas."""
    import kubernetes_validate

    kinds = []
    for doc in docs:
        kinds.append(doc["kind"])
        if doc["kind"] == "MPIJob":
            errors = [f"{list(e.path)}: {e.message}" for e in mpijob_validator.iter_errors(doc)]
            assert not errors, errors
            for role, replica in doc["spec"]["mpiReplicaSpecs"].items():
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{role.lower()}"},
                       "spec": replica["template"]["spec"]}
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return kinds


def kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is required: `make test` installs it"
    out = subprocess.run([kubectl, "kustomize", str(REPO / "k8s" / overlay)],
                         capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(out.stdout))


def by_kind(docs):
    return {d["kind"]: d for d in docs}


def check_job(job, workers, slots, gpus, configmap):
    spec = job["spec"]
    assert spec["slotsPerWorker"] == slots and spec["mpiReplicaSpecs"]["Worker"]["replicas"] == workers
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running" and spec["runPolicy"]["backoffLimit"] > 0
    for role in ("Launcher", "Worker"):
        pod = spec["mpiReplicaSpecs"][role]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["flags"]["configMap"]["name"] == configmap["metadata"]["name"]
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "tfllm-data"
        assert (":" in container["image"]) or "@" in container["image"]
    worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
    if gpus:
        assert "gpu" in worker["image"]
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["command"] == ["mpirun"] and "-np" not in launcher["args"]  # one rank per hostfile slot
    (flagfile,) = [a.split("=", 1)[1] for a in launcher["args"] if a.startswith("--flagfile=")]
    assert flagfile.startswith("flags/") and pathlib.Path(flagfile).name in configmap["data"]
    assert any(a.startswith(f"--model_dir=/data/runs/{job['metadata']['name']}/") for a in launcher["args"])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlays_validate_and_are_consistent(overlay, mpijob_validator):
    docs = kustomize(f"overlays/{overlay}")
    assert sorted(validate_objects(docs, mpijob_validator)) == sorted(
        ["ConfigMap", "MPIJob", "PersistentVolumeClaim", "Deployment", "Service"])
    objs = by_kind(docs)
    check_job(objs["MPIJob"], *OVERLAYS[overlay], objs["ConfigMap"])
    # The ConfigMap is generated from flags/ itself: the pods get exactly the checked-in flagfiles.
    for name, text in objs["ConfigMap"]["data"].items():
        assert text == (REPO / "flags" / name).read_text()
    tb = objs["Deployment"]["spec"]["template"]["spec"]
    assert tb["volumes"][0]["persistentVolumeClaim"]["claimName"] == "tfllm-data"
    assert "--logdir=/data/runs" in tb["containers"][0]["args"]
    assert objs["Service"]["spec"]["selector"].items() <= objs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def submit(*args, check=True):
    return run(["-m", "pipelines.submit", *args], check=check)


@pytest.mark.parametrize("workers,gpus,flagfile", [(1, 8, "flags/gpt2_124m.cfg"), (64, 8, "flags/llama_small.cfg"),
                                                   (3, 0, "flags/tiny.cfg")])
def test_cli_manifests_validate(workers, gpus, flagfile, mpijob_validator, tmp_path):
    out = tmp_path / "job.yaml"
    submit(f"--name=job-{workers}", f"--workers={workers}", f"--gpus_per_worker={gpus}", f"--job_flagfile={flagfile}",
           "--image=registry.local/tfllm-gpu:1", f"--output={out}", "--extra_args=--corpus=/data/text,--train_steps=10")
    docs = list(yaml.safe_load_all(out.read_text()))
    assert validate_objects(docs, mpijob_validator) == ["ConfigMap", "MPIJob"]
    cm, job = docs
    check_job(job, workers, gpus or 1, gpus, cm)
    assert set(cm["data"]) == {pathlib.Path(flagfile).name, "base.cfg"}  # the include travels with it
    args = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--corpus=/data/text", "--train_steps=10"]


@pytest.mark.parametrize("args,message", [
    (["--workers=0"], "--workers=0: an MPIJob needs at least one worker"),
    (["--gpus_per_worker=8", "--slots_per_worker=4"], "--slots_per_worker=4 does not match --gpus_per_worker=8"),
    (["--job_flagfile=flags/missing.cfg"], "flagfile flags/missing.cfg: no such file"),
    (["--name=Bad_Name"], "--name='Bad_Name'"),
    (["--model_dir=runs/x"], "must be absolute paths"),
])
def test_cli_refuses_bad_requests_before_sending(args, message, tmp_path):
    out = tmp_path / "job.yaml"
    proc = submit("--image=x:1", f"--output={out}", "--apply", "--kubeconfig=/nonexistent", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0] and not out.exists()


def test_cpu_smoke_launcher_command_trains_locally(tmp_path):
    """The launcher's command from the rendered cpu-smoke overlay, run on localhost with 2 ranks.

    The pod's mounts become local directories: the ConfigMap's files under <tmp>/etc/tfllm/flags
    (the launcher's working directory) and the volume at <tmp>/data. mpi-operator's hostfile
    becomes `-np 2 -H localhost:2`.
    """
    objs = by_kind(kustomize("overlays/cpu-smoke"))
    workdir, data = tmp_path / "etc" / "tfllm", tmp_path / "data"
    (workdir / "flags").mkdir(parents=True)
    for name, text in objs["ConfigMap"]["data"].items():
        (workdir / "flags" / name).write_text(text)
    container = objs["MPIJob"]["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert container["workingDir"] == "/etc/tfllm"
    command = [a.replace("/etc/tfllm", str(workdir)).replace("/data/", f"{data}/")
               for a in container["command"] + container["args"]]
    local = ["-np", "2", "-H", "localhost:2", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    command = [shutil.which("mpirun")] + local + command[1:]
    env = subprocess_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                         **{e["name"]: e["value"] for e in container["env"]})
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model_dir = data / "runs" / "tfllm-cpu-smoke" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["train"]["train_steps"] == 200 and config["model"]["hidden_dim"] == 64  # tiny.cfg's values
    index = json.loads((model_dir / "checkpoints" / "index.json").read_text())
    assert index["latest"] == "ckpt-00000200"
    assert re.search(r"val_loss=\d", proc.stdout)


class FakeApiServer(http.server.ThreadingHTTPServer):
    """Just enough of the Kubernetes API for submit --apply --follow; records every request."""

    def __init__(self, configmap_exists=False, refuse_mpijob=False):
        self.requests, self.job_polls = [], 0
        self.configmap_exists, self.refuse_mpijob = configmap_exists, refuse_mpijob
        super().__init__(("127.0.0.1", 0), FakeHandler)


class FakeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(body, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.command, self.path, body))
        return body

    def do_POST(self):
        body = self._record()
        if self.path.endswith("/configmaps") and self.server.configmap_exists:
            return self._reply(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
        if self.path.endswith("/mpijobs") and self.server.refuse_mpijob:
            return self._reply(422, {"kind": "Status", "message": "spec.slotsPerWorker: Invalid value", "code": 422})
        self._reply(201, body)

    def do_PUT(self):
        self._reply(200, self._record())

    def do_GET(self):
        self._record()
        if "/mpijobs/" in self.path:
            self.server.job_polls += 1
            done = self.server.job_polls >= 2
            status = {"conditions": [{"type": "Succeeded", "status": "True"}]} if done else {}
            return self._reply(200, {"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob",
                                     "metadata": {"name": "smoke"}, "status": status})
        if self.path.split("?")[0].endswith("/pods"):
            pod = {"metadata": {"name": "smoke-launcher-abc"}, "status": {"phase": "Running"}}
            return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]})
        if "/log" in self.path:
            return self._reply(200, b"step 200/200 loss=1.5\nval_loss=1.6\n")
        self._reply(404, {"kind": "Status", "code": 404})


def _kubeconfig(tmp_path, server):
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": "ml"}}]}))
    return path


@pytest.fixture
def fake_api():
    servers = []

    def start(**kwargs):
        server = FakeApiServer(**kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server
    yield start
    for s in servers:
        s.shutdown()


COMMON = ["--name=smoke", "--namespace=ml", "--workers=2", "--job_flagfile=flags/tiny.cfg", "--image=reg/tfllm-cpu:1"]


def test_apply_sends_the_rendered_objects_and_follows_the_launcher(fake_api, tmp_path):
    server = fake_api()
    rendered = tmp_path / "job.yaml"
    submit(*COMMON, f"--output={rendered}")
    proc = submit(*COMMON, "--apply", "--follow", f"--kubeconfig={_kubeconfig(tmp_path, server)}")
    cm, job = yaml.safe_load_all(rendered.read_text())
    posts = [(path, body) for method, path, body in server.requests if method == "POST"]
    assert posts == [("/api/v1/namespaces/ml/configmaps", cm),
                     ("/apis/kubeflow.org/v2beta1/namespaces/ml/mpijobs", job)]
    gets = [path for method, path, _ in server.requests if method == "GET"]
    assert "/apis/kubeflow.org/v2beta1/namespaces/ml/mpijobs/smoke" in gets
    assert any("job-name%3Dsmoke" in p or "job-name=smoke" in p for p in gets), gets
    assert "val_loss=1.6" in proc.stdout and "MPIJob ml/smoke: Succeeded" in proc.stdout


def test_apply_replaces_an_existing_configmap_and_reports_refusals(fake_api, tmp_path):
    server = fake_api(configmap_exists=True)
    submit(*COMMON, "--apply", f"--kubeconfig={_kubeconfig(tmp_path, server)}")
    assert [(m, p) for m, p, _ in server.requests][:2] == [
        ("POST", "/api/v1/namespaces/ml/configmaps"), ("PUT", "/api/v1/namespaces/ml/configmaps/smoke-flags")]
    refusing = fake_api(refuse_mpijob=True)
    proc = submit(*COMMON, "--apply", f"--kubeconfig={_kubeconfig(tmp_path, refusing)}", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: the API server refused MPIJob ml/smoke: HTTP 422")


def test_images_lint_and_install_like_the_readme():
    images = REPO / "k8s" / "images"
    for name in ("cpu", "gpu"):
        dockerfile = images / f"{name}.Dockerfile"
        lint = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        text = dockerfile.read_text()
        # One install recipe: the script CI runs, not a copy of its steps.
        expected = "RUN bash .ci/install.sh --gpu" if name == "gpu" else "RUN bash .ci/install.sh \\"
        assert expected in text and "pip install" not in text
        assert "USER 1000:1000" in text
        ignore = (images / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
        for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
            for path in src.split():
                assert f"!{path}" in ignore or f"!{path}/**" in ignore, f"{path} is excluded from the build context"


def test_gpu_image_cuda_matches_tensorflow():
    from importlib.metadata import requires

    cuda_wheels = {m.group(1) for r in requires("tensorflow") if "and-cuda" in r
                   for m in [re.match(r"nvidia-[a-z-]+-cu(\d+)", r)] if m}
    (base,) = re.findall(r"^FROM nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-devel-ubuntu\S+$",
                         (REPO / "k8s" / "images" / "gpu.Dockerfile").read_text(), re.M)
    assert cuda_wheels == {base}, (cuda_wheels, base)


def test_elastic_overlay_runs_horovodrun_on_the_operators_discovery_script(mpijob_validator):
    docs = kustomize("overlays/cpu-elastic")
    assert sorted(validate_objects(docs, mpijob_validator)) == sorted(
        ["ConfigMap", "MPIJob", "PersistentVolumeClaim", "Deployment", "Service"])
    job = by_kind(docs)["MPIJob"]
    workers = job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"]
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    args = launcher["args"]

    def option(name):
        return args[args.index(name) + 1]

    assert launcher["command"] == ["horovodrun"] and "--gloo" in args
    # mpi-operator v2beta1 writes this script; it lists running workers without slot counts.
    assert option("--host-discovery-script") == "/etc/mpi/discover_hosts.sh" and option("--slots-per-host") == "1"
    assert int(option("--min-np")) <= int(option("-np")) == workers <= int(option("--max-np"))
    assert args[args.index("python"):args.index("python") + 3] == ["python", "-m", "pipelines.pretrain"]
    assert "--elastic" in args and any(a.startswith("--model_dir=/data/runs/tfllm-cpu-elastic/") for a in args)


def test_serving_manifest_validates_and_matches_the_other_pods():
    import kubernetes_validate

    docs = kustomize("serving")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    objs = by_kind(docs)
    assert sorted(objs) == ["Deployment", "Service"] and len(docs) == 2
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The same security context as TensorBoard's pod, the other long-running server.
    tensorboard = by_kind(kustomize("overlays/cpu-smoke"))["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"] == tensorboard["securityContext"]
    assert container["securityContext"] == tensorboard["containers"][0]["securityContext"]
    assert re.fullmatch(r"tensorflow/serving:\d+\.\d+\.\d+", container["image"])
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"])
    assert args["model_base_path"].startswith("/data/") and args["xla_cpu_compilation_enabled"] == "true"
    assert container["readinessProbe"]["httpGet"]["path"] == f"/v1/models/{args['model_name']}/metadata"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(args["port"]), "http": int(args["rest_api_port"])}
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"] == {"claimName": "tfllm-data", "readOnly": True}
    assert {m["name"]: m.get("readOnly", False) for m in container["volumeMounts"]}["data"] is True
    service = objs["Service"]["spec"]
    assert service["selector"].items() <= objs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
