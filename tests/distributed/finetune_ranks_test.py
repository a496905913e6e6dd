"""Fine-tuning at 2 ranks, and evaluation that gives the same figures at 1 and 2 ranks."""

import json
import re

import pytest

from conftest import run
from finetune_helpers import finetune_args


def _report(stdout: str) -> dict:
    lines = [re.sub(r"^\[\d+\]<stdout>:", "", line) for line in stdout.splitlines()]  # horovodrun's prefix
    return json.loads([line for line in lines if line.startswith("{")][-1])


def test_two_rank_finetune_then_evaluation_identical_across_rank_counts(trained_model_dir, sst2_slice, tmp_path):
    model_dir = tmp_path / "clf2"
    out = run(finetune_args(trained_model_dir, model_dir, sst2_slice, "--train_steps=16", "--eval_every=8"),
              launcher="gloo")
    assert "2 rank(s) x batch 16" in out.stdout
    trained = _report(out.stdout)
    assert trained["step"] == 16 and trained["validation"]["examples"] == 120
    # Rank 0 alone wrote the checkpoints; metrics logged once per logged step.
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 16]

    evaluate = ["-m", "pipelines.finetune", "--mode=evaluate", f"--model_dir={model_dir}", "--checkpoint=latest"]
    one = _report(run(evaluate).stdout)
    two = _report(run(evaluate, launcher="mpi").stdout)
    assert one["confusion"] == two["confusion"] == trained["validation"]["confusion"]
    assert one["accuracy"] == two["accuracy"] and one["per_class"] == two["per_class"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
