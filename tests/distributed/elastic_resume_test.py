"""Elastic mode on this machine (two ranks under horovodrun's elastic launcher): checkpoints move
between elastic and non-elastic runs in both directions, and --elastic_global_batch picks the
accumulation."""

import json

import pytest

from conftest import run
from pretrain_helpers import TINY, logged_losses

pytestmark = pytest.mark.slow
STEPS = ["--train_steps=30", "--stop_after=10", "--eval_every=0", "--checkpoint_every=0", "--sample_prompt="]


def test_checkpoints_resume_across_elastic_and_static_runs(tmp_path):
    common = TINY + [f"--model_dir={tmp_path / 'model'}", f"--data_dir={tmp_path / 'data'}", *STEPS]
    run(common, launcher="gloo")
    first = logged_losses(tmp_path / "model")
    assert max(first) == 10

    # 2 ranks x batch 8 keep 32 windows per step with 2 micro-batches.
    proc = run(common + ["--elastic", "--elastic_commit_every=3", "--elastic_global_batch=32"], launcher="elastic")
    assert "resumed from step 10" in proc.stdout and "elastic: generation 0: 2 rank(s) at step 10" in proc.stdout
    assert "elastic: final weights identical on 2 rank(s)" in proc.stdout
    elastic = logged_losses(tmp_path / "model")
    assert max(elastic) == 20
    records = map(json.loads, (tmp_path / "model" / "metrics.jsonl").read_text().splitlines())
    seen = {r["step"]: r["tokens_seen"] for r in records}
    assert seen[12] - seen[11] == 32 * 64 and seen[10] - seen[9] == 16 * 64
    # Continued training, not a fresh model: nearer the loss it stopped at than the first one.
    assert elastic[11] < (first[1] + first[10]) / 2, (first[1], first[10], elastic[11])

    proc = run(common, launcher="gloo")
    assert "resumed from step 20" in proc.stdout
    static = logged_losses(tmp_path / "model")
    assert max(static) == 30 and static[21] < (first[1] + elastic[20]) / 2
