"""Shared helpers: paths, and launching 2-rank jobs through horovodrun or mpirun."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
SST2 = SHARED / "data" / "sst2"
BIN = pathlib.Path(sys.executable).parent


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launcher_command(launcher: str, np: int) -> list[str]:
    if launcher == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    # Horovod elastic on this machine: the discovery script names localhost. Without an interface
    # named, horovodrun 0.28.1 waits forever to find one common to two hosts.
    if launcher == "elastic":
        script = pathlib.Path(tempfile.mkdtemp(prefix="tfllm-discover-")) / "discover_hosts.sh"
        script.write_text(f"#!/bin/sh\necho localhost:{np}\n")
        script.chmod(0o755)
        return [str(BIN / "horovodrun"), "-np", str(np), "--min-np", "1", "--max-np", str(np),
                "--host-discovery-script", str(script), "--network-interface", "lo", "--gloo"]
    if launcher == "mpi":
        cmd = ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.insert(1, "--allow-run-as-root")
        return cmd
    if launcher == "none":
        return []
    raise ValueError(launcher)


def run(args: list[str], launcher: str = "none", np: int = 2, timeout: int = 600, check: bool = True,
        cwd=REPO, input_text: str | None = None, **env) -> subprocess.CompletedProcess:
    """Runs `python args...` (under a launcher); on failure the output is in the assertion."""
    cmd = launcher_command(launcher, np) + [sys.executable] + list(args)
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout,
                          input=input_text)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_many(arg_lists: list[list[str]], **kwargs) -> list[subprocess.CompletedProcess]:
    """`run` for independent commands, two at a time (this machine's cores), results in order. Error
    cases spend most of their seconds importing TensorFlow, which keeps one core busy."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: run(args, **kwargs), arg_lists))


@pytest.fixture
def shakespeare():
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A tiny model trained for 30 steps (shared by the generate, evaluate and export tests)."""
    from pretrain_helpers import pretrain

    tmp = tmp_path_factory.mktemp("trained")
    pretrain(tmp / "model", "--train_steps=30", "--eval_every=0", "--checkpoint_every=15", "--sample_prompt=",
             data_dir=tmp / "data")
    return tmp / "model"


@pytest.fixture(scope="session")
def sst2_slice(tmp_path_factory):
    """The first 1,200 SST-2 training phrases and 120 dev sentences."""
    if not SST2.exists():
        pytest.skip(f"{SST2} not present")
    out = tmp_path_factory.mktemp("sst2")
    train = (SST2 / "train.tsv").read_text().splitlines()
    dev = (SST2 / "dev.tsv").read_text().splitlines()
    (out / "train.tsv").write_text("\n".join(train[:1201]) + "\n")
    (out / "dev.tsv").write_text("\n".join(dev[:121]) + "\n")
    return out
