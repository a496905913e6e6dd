import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, subprocess_env
from pretrain_helpers import TINY, event_tags, logged_losses, pretrain
from tfllm.cli import EXIT_SIGNALLED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Data prepared once by a first real run; later runs with the same flags reuse it."""
    tmp = tmp_path_factory.mktemp("pretrain")
    proc = pretrain(tmp / "first", "--train_steps=12", "--eval_every=6", "--checkpoint_every=6",
                    data_dir=tmp / "data")
    pytest.first_run = (tmp / "first", proc)
    return tmp / "data"


def test_end_to_end_writes_checkpoints_events_config_and_summary_lines(data_dir):
    model_dir, proc = pytest.first_run
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("val_loss=") and float(lines[-2].split("=")[1]) > 0
    assert lines[-1].startswith("tokens_per_sec=")
    # The run's throughput leaves out the first 10 (compiling) steps: here steps 11 and 12 of 12.
    rates = {json.loads(line)["step"]: json.loads(line)["tokens_per_sec"]
             for line in (model_dir / "metrics.jsonl").read_text().splitlines()}
    assert float(lines[-1].split("=")[1]) == pytest.approx(2 / (1 / rates[11] + 1 / rates[12]), rel=1e-3)
    assert "sample at step 12, top_k (k=10, temperature 0.8, seed 0):" in proc.stdout
    summary = proc.stdout[proc.stdout.index("run summary"):]
    assert "steps          12 (12 in this run)" in summary and "best val loss  " in summary
    assert f"tensorboard --logdir {model_dir / 'tb'}" in summary
    # a clean console: tfllm's lines, none of TensorFlow's C++ start-up notices
    assert not re.search(r"^[IWEF]0000 |absl::InitializeLog|cuda|CUDA", proc.stdout + proc.stderr, re.M), proc.stderr
    assert "malloc tcmalloc" in proc.stdout  # the install provides it; pipelines re-exec onto it
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["ckpt-00000006", "ckpt-00000012", "index.json"]
    index = json.loads((model_dir / "checkpoints" / "index.json").read_text())
    assert index["latest"] == "ckpt-00000012" and index["best"]["name"] in ("ckpt-00000006", "ckpt-00000012")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"]["vocab_size"] > 3 and config["train"]["train_steps"] == 12
    assert config["train"]["sample_prompt"] == "def "  # quoted in flags/tiny.cfg, whose lines absl strips
    assert (model_dir / "tokenizer" / "tokenizer.json").exists()
    tags = event_tags(model_dir / "tb")
    assert {"loss", "metrics/perplexity", "metrics/accuracy", "optimizer/learning_rate", "optimizer/grad_norm",
            "progress/tokens_seen", "perf/tokens_per_sec", "perf/step_time_ms", "perf/model_flops_per_sec",
            "sample"} <= tags["train"]
    assert {"loss", "metrics/perplexity"} <= tags["validation"]
    assert len(logged_losses(model_dir)) == 12


def test_malloc_opt_out(tmp_path, data_dir):
    proc = pretrain(tmp_path / "m", "--train_steps=2", "--eval_every=0", "--sample_prompt=", data_dir=data_dir,
                    TFLLM_MALLOC="system")
    assert "malloc system" in proc.stdout


def test_stop_and_resume_reproduces_the_uninterrupted_losses(tmp_path, data_dir):
    straight = logged_losses(pytest.first_run[0])
    model_dir = tmp_path / "resumed"
    flags = ["--train_steps=12", "--eval_every=6", "--checkpoint_every=6"]
    first = pretrain(model_dir, *flags, "--stop_after=5", data_dir=data_dir)
    assert "stopped after 5 steps at step 5" in first.stdout
    second = pretrain(model_dir, *flags, data_dir=data_dir)
    assert "resumed from step 5" in second.stdout
    resumed = logged_losses(model_dir)
    assert sorted(resumed) == list(range(1, 13))
    np.testing.assert_allclose([resumed[s] for s in range(1, 13)], [straight[s] for s in range(1, 13)], rtol=1e-6)


def test_sigterm_saves_and_exits_143_then_resumes(tmp_path, data_dir):
    model_dir = tmp_path / "term"
    cmd = [sys.executable] + TINY + [f"--model_dir={model_dir}", f"--data_dir={data_dir}", "--train_steps=100000",
                                     "--checkpoint_every=0", "--eval_every=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = model_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SIGNALLED, err[-2000:]
    assert "stopped by signal at step" in err
    step = int(err.split("stopped by signal at step ")[1].split(";")[0])
    assert (model_dir / "checkpoints" / f"ckpt-{step:08d}" / "state.json").exists()
    again = pretrain(model_dir, f"--train_steps={step + 2}", "--checkpoint_every=0", "--eval_every=0",
                     data_dir=data_dir)
    assert f"resumed from step {step}" in again.stdout


def test_other_model_in_the_same_model_dir_is_refused(tmp_path, data_dir):
    model_dir, _ = pytest.first_run
    before = sorted(os.listdir(model_dir / "checkpoints"))
    proc = pretrain(model_dir, "--train_steps=12", "--num_layers=3", check=False, data_dir=data_dir)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "num_layers: 2 -> 3" in err[-1]
    assert sorted(os.listdir(model_dir / "checkpoints")) == before


def test_non_finite_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path, data_dir):
    model_dir = tmp_path / "nan"
    proc = pretrain(model_dir, "--train_steps=200", "--learning_rate=1e4", "--min_learning_rate=1e4",
                    "--warmup_steps=0", "--clip_norm=0", "--checkpoint_every=1", "--eval_every=0",
                    check=False, data_dir=data_dir)
    assert proc.returncode == 1, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite") and "step" in last
    from tfllm.checkpoint import CheckpointManager
    latest = CheckpointManager(str(model_dir)).latest()
    if latest:  # whatever was saved before the blow-up is finite
        with np.load(os.path.join(latest, "variables.npz")) as z:
            assert all(np.all(np.isfinite(z[k])) for k in z.files if z[k].dtype.kind == "f")


def test_batch_that_does_not_split_into_parallel_slices_is_refused_before_any_work(tmp_path, data_dir):
    proc = pretrain(tmp_path / "slices", "--parallel_slices=3", check=False, data_dir=data_dir)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: --batch_size=8 does not split into --parallel_slices=3 equal slices"
    assert not (tmp_path / "slices").exists()


def test_data_dir_with_other_tokenizer_vocab_is_refused(tmp_path, data_dir):
    model_dir, _ = pytest.first_run
    proc = pretrain(model_dir, "--train_steps=12", "--tokenizer=byte", check=False, data_dir=tmp_path / "bytes")
    assert proc.returncode == 1
    assert "vocab_size" in proc.stderr.strip().splitlines()[-1]
