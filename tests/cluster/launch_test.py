"""The real multi-node launch paths across emulated hosts: horovodrun over ssh, mpi-operator's
mpirun with a hostfile (the cpu-smoke manifest's own launcher command), and an odd world of three."""

import json

import numpy as np
import pytest

from cluster_fixtures import SMALL, TINY, cluster3, cpu_smoke_launcher, horovodrun, launch, mpirun  # noqa: F401
from conftest import run
from pretrain_helpers import logged_losses

pytestmark = pytest.mark.slow
STEPS = ["--train_steps=10", "--eval_every=5", "--checkpoint_every=5"]


def test_two_hosts_horovodrun_and_cpu_smoke_mpirun_match_localhost(cluster3, tmp_path):
    data = tmp_path / "data"
    run(TINY + [f"--model_dir={tmp_path / 'local'}", f"--data_dir={data}", *STEPS], launcher="gloo")
    local = logged_losses(tmp_path / "local")

    proc = launch(cluster3, horovodrun(cluster3, ["h1", "h2"]) + TINY + [f"--model_dir={tmp_path / 'hvd'}",
                                                                          f"--data_dir={data}", *STEPS])
    assert "world 2 (gloo: h1 (rank 0), h2 (rank 1))" in proc.stdout
    hvd = logged_losses(tmp_path / "hvd")
    np.testing.assert_allclose([hvd[s] for s in range(1, 11)], [local[s] for s in range(1, 11)], rtol=1e-5)

    # mpi-operator's launcher: its hostfile lists each worker with its slots and mpirun reads it
    # from OMPI_MCA_orte_default_hostfile; the command is the rendered manifest's, in the pod's cwd.
    pod = tmp_path / "pod"
    cluster3.hostfile(1, ["h1", "h2"])
    argv = cpu_smoke_launcher(pod) + SMALL + STEPS
    proc = launch(cluster3, argv, cwd=pod / "etc" / "tfllm")
    assert "world 2 (mpi: h1 (rank 0), h2 (rank 1))" in proc.stdout
    smoke = logged_losses(pod / "data" / "runs" / "tfllm-cpu-smoke" / "model")
    np.testing.assert_allclose([smoke[s] for s in range(1, 11)], [local[s] for s in range(1, 11)], rtol=1e-5)


def test_three_hosts_odd_world_with_fewer_shards_than_ranks(cluster3, tmp_path):
    hosts = ["h1", "h2", "h3"]
    model = tmp_path / "model"
    proc = launch(cluster3, horovodrun(cluster3, hosts) + TINY + [
        f"--model_dir={model}", f"--data_dir={tmp_path / 'data'}", "--num_shards=2", "--train_steps=6",
        "--eval_every=3", "--checkpoint_every=3"])
    assert "world 3 (gloo: h1 (rank 0), h2 (rank 1), h3 (rank 2))" in proc.stdout
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 2
    assert sorted(logged_losses(model)) == list(range(1, 7))

    # Exact cross-rank evaluation: three ranks count every token once, as one rank does.
    one = tmp_path / "one.json"
    run(["-m", "pipelines.evaluate", f"--model_dir={model}", f"--output_json={one}", "--eval_batch_size=5"])
    three = tmp_path / "three.json"
    launch(cluster3, horovodrun(cluster3, hosts) + ["-m", "pipelines.evaluate", f"--model_dir={model}",
                                                    f"--output_json={three}", "--eval_batch_size=5"])
    one, three = json.loads(one.read_text()), json.loads(three.read_text())
    assert three["world_size"] == 3 and one["tokens"] == three["tokens"] > 0
    assert abs(one["loss"] - three["loss"]) <= 1e-9 * abs(one["loss"])

    # Training: 3 ranks x 2 windows equal 1 rank x 6 over the same windows (tests/distributed/step_test).
    worker = ["tests/distributed/step_worker.py", "--optimizer=sgd", "--clip=0.05", "--steps=4", "--global_batch=6"]
    run(worker + ["--out", str(tmp_path / "single")])
    launch(cluster3, horovodrun(cluster3, hosts) + worker + ["--out", str(tmp_path / "three")])
    single = json.loads((tmp_path / "single.json").read_text())
    spread = json.loads((tmp_path / "three.json").read_text())
    assert spread["world_size"] == 3
    np.testing.assert_allclose([r["loss"] for r in spread["records"]], [r["loss"] for r in single["records"]],
                               rtol=1e-5)
    with np.load(tmp_path / "single.rank0.npz") as a, np.load(tmp_path / "three.rank2.npz") as b:
        for i in range(len(a.files) - 1):
            np.testing.assert_allclose(b[f"arr_{i}"], a[f"arr_{i}"], rtol=1e-5, atol=1e-6)


def test_an_interface_a_host_lacks_is_one_error_line_naming_it(cluster3, tmp_path):
    argv = mpirun(cluster3, ["h1", "h2"], extra=("--mca", "btl_tcp_if_include", "eth9"))
    proc = launch(cluster3, argv + TINY + [f"--model_dir={tmp_path / 'm'}"], check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    assert "OMPI_MCA_btl_tcp_if_include=eth9: no network interface eth9 on host h" in errors[0]
    assert "it has: eth0, lo" in errors[0]
    assert not (tmp_path / "m").exists()
