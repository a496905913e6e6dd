"""Benchmark figures: the FLOPs formula by hand, the JSON and TensorBoard output of each mode."""

import json

import pytest

from conftest import run, run_many
from tfllm import benchmark
from tfllm.config import ModelConfig
from tfllm.models import build_causal_lm, count_params, flops_per_token

TINY_BENCH = ["-m", "pipelines.benchmark", "--num_layers=2", "--num_heads=2", "--hidden_dim=32", "--seq_len=16",
              "--max_sequence_length=16", "--batch_size=4", "--bench_vocab=50", "--bench_steps=4", "--bench_warmup=2"]


def test_flops_per_token_against_a_hand_count():
    V, P, L, d, f, T = 50, 16, 2, 32, 128, 16
    cfg = ModelConfig(family="gpt2", num_layers=L, num_heads=2, hidden_dim=d, intermediate_dim=f,
                      max_sequence_length=P, vocab_size=V)
    per_layer = (2 * d  # attention layer norm (gamma, beta)
                 + 3 * (d * d + d)  # query, key, value projections with biases
                 + d * d + d  # attention output projection
                 + 2 * d  # feed-forward layer norm
                 + d * f + f + f * d + d)  # feed-forward in and out
    n_params = V * d + P * d + L * per_layer + 2 * d  # token + position embeddings, layers, final norm; head tied
    model = build_causal_lm(cfg)
    assert count_params(model) == n_params == 27_584
    # 6 N for the matmuls over the weights (fwd 2N + bwd 4N) + 12 L d T for QK^T and AV.
    assert flops_per_token(cfg, T, n_params) == 6 * 27_584 + 12 * 2 * 32 * 16 == 177_792


def _scalars(log_dir):
    from tensorboard.backend.event_processing import event_multiplexer

    mux = event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    return {run: set(tags["tensors"]) for run, tags in mux.Runs().items()}


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_step_json_at_one_and_two_ranks_then_the_cost_model(tmp_path):
    one, two, cm, png = (tmp_path / n for n in ("step1.json", "step2.json", "cm.json", "scaling.png"))
    out = run(TINY_BENCH + ["--mode=step", f"--output_json={one}", f"--tb_dir={tmp_path / 'tb'}"])
    rec1 = json.loads(one.read_text())
    assert list(rec1) == list(benchmark.STEP_FIELDS) and _last_json(out.stdout) == rec1
    assert rec1["world_size"] == 1 and rec1["allreduce_share"] == 0 and rec1["params"] == 27_584
    assert rec1["tokens_per_sec_global"] == pytest.approx(4 * 16 / (rec1["step_ms_median"] / 1000))
    assert rec1["model_flops_per_sec_per_rank"] == pytest.approx(rec1["tokens_per_sec_per_rank"] * rec1["flops_per_token"])
    assert rec1["mfu"] is None and rec1["device"] == "CPU" and rec1["peak_memory_bytes"] > 0
    assert "| ranks | precision | XLA |" in out.stdout

    # Medians of 12: the 4-byte and the gradient allreduce differ by ~2 ms here, and the fit needs
    # the gradient's to be the longer.
    run(TINY_BENCH + ["--mode=step", f"--baseline_json={one}", f"--output_json={two}", "--bench_steps=12"],
        launcher="gloo")
    rec2 = json.loads(two.read_text())
    assert set(benchmark.STEP_FIELDS) < set(rec2) and rec2["world_size"] == 2
    assert rec2["scaling_efficiency"] == pytest.approx(rec2["tokens_per_sec_global"] / (2 * rec1["tokens_per_sec_global"]))
    assert 0 < rec2["allreduce_share"] < 1 and rec2["latency_allreduce_ms"] > 0
    assert rec2["grad_bytes"] == 4 * 27_584

    # A --mode=buckets record of this model whose steps the overlap model made with overlap 0.25,
    # over a link that the 2-rank step fits: the cost model finds 0.25 again.
    from tfllm import costmodel, segments
    from tfllm.models import lm_chain
    model = build_causal_lm(ModelConfig(**rec2["model"]))
    sizes = segments.unit_params(lm_chain(model), model.trainable_variables)
    pieces = costmodel.lm_pieces(sizes, 50, 32, 16)
    fitted = costmodel.local_calibration(rec2)
    link = costmodel.Link(fitted["bandwidth_bytes_per_s"], fitted["latency_s"])
    steps = {b: costmodel.bucketed_step(pieces, segments.balanced_cuts(sizes, b), 1e-3, 2, link, 4, 0.25) for b in (1, 2, 4)}
    buckets = tmp_path / "buckets.json"
    buckets.write_text(json.dumps({"mode": "buckets", "world_size": 2, "model": rec2["model"], "seq_len": 16,
                                   "fp16_allreduce": False, "runs": [
        {"allreduce_buckets": b, "step_ms": 1000 * r["step_s"], "compute_ms": 1.0, "hidden_share": r["hidden_share"]}
        for b, r in steps.items()]}))
    out = run(TINY_BENCH + ["--mode=costmodel", f"--calibration_json={two}", f"--plot={png}", f"--output_json={cm}",
                            "--bench_buckets=1,2,4", f"--buckets_json={buckets}"])
    result = json.loads(cm.read_text())
    cal = result["calibration"]
    assert cal["predicted_allreduce_s"] == pytest.approx(rec2["allreduce_ms"] / 1000)
    assert cal["predicted_efficiency"] == pytest.approx(1 - rec2["allreduce_share"])
    assert png.read_bytes()[:4] == b"\x89PNG" and len(result["curves"]) == 5
    assert list(result["curves"])[2:4] == ["16-bit gradients, 2 buckets", "16-bit gradients, 4 buckets"]
    assert result["local_overlap"]["overlap"] == pytest.approx(0.25, abs=1e-3)
    assert f"overlap fitted to {buckets} (2 ranks): 0.250" in out.stdout
    # Given an overlap instead, the model predicts the record's steps with it rather than fitting one.
    given = run(TINY_BENCH + ["--mode=costmodel", f"--calibration_json={two}", "--bench_buckets=1,2,4",
                              f"--buckets_json={buckets}", "--local_overlap=0.9", f"--output_json={cm}"])
    assert f"overlap given for {buckets} (2 ranks): 0.900" in given.stdout
    at = {b: costmodel.bucketed_step(pieces, segments.balanced_cuts(sizes, b), 1e-3, 2, link, 4, 0.9) for b in (1, 2, 4)}
    predicted = {r["allreduce_buckets"]: r["predicted_step_ms"] for r in json.loads(cm.read_text())["local_overlap"]["runs"]}
    assert predicted == pytest.approx({b: 1000 * r["step_s"] for b, r in at.items()}, rel=1e-9)
    assert predicted[4] < 1000 * steps[4]["step_s"]  # more overlap than the record was made with
    assert "tokens_per_sec_global" in _scalars(tmp_path / "tb")["benchmark/step"]


def test_overhead_and_variants_modes(tmp_path):
    out = run(TINY_BENCH + ["--mode=overhead", f"--output_json={tmp_path / 'o.json'}"])
    rec = json.loads((tmp_path / "o.json").read_text())
    assert rec["overhead_ratio"] == pytest.approx(rec["step_ms_median"] / rec["keras_fit_step_ms"])
    assert "keras model.fit" in out.stdout
    run(TINY_BENCH + ["--mode=variants", f"--output_json={tmp_path / 'v.json'}"])
    runs = json.loads((tmp_path / "v.json").read_text())["runs"]
    assert [(r["precision"], r["jit_compile"]) for r in runs] == [
        ("float32", True), ("float32", False), ("mixed_bfloat16", True), ("mixed_bfloat16", False)]
    assert all(list(r) == list(benchmark.STEP_FIELDS) for r in runs)


def test_bad_requests_are_one_line_errors(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"world_size": 1, "tokens_per_sec_global": 1.0}))
    one = f"--calibration_json={tmp_path / 'one.json'}"
    missing, wrong, too_many, alone, overlap = run_many([
        TINY_BENCH + ["--mode=costmodel", f"--calibration_json={tmp_path / 'nope.json'}"],
        TINY_BENCH + ["--mode=costmodel", one],
        TINY_BENCH + ["--mode=costmodel", one, "--bench_buckets=1,8"],
        TINY_BENCH + ["--mode=costmodel", one, "--local_overlap=0.5"],
        TINY_BENCH + ["--mode=costmodel", one, "--gpu_overlap=1.5"]], check=False)
    assert missing.returncode == 1 and "error: --calibration_json=" in missing.stderr
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines() == [
        f"error: --calibration_json={tmp_path / 'one.json'}: not a usable N-rank step record (no field "
        "'latency_allreduce_ms')"], wrong.stderr
    assert too_many.stderr.strip().splitlines() == [
        "error: --bench_buckets=1,8: include 1 (no overlap) and stay within 1..4 for a 2-layer model"], too_many.stderr
    assert alone.stderr.strip().splitlines() == [
        "error: --local_overlap applies to the steps of --buckets_json, which is not given"], alone.stderr
    assert overlap.stderr.strip().splitlines() == ["error: --gpu_overlap=1.5 --gpu_micro_batches=1: expected an "
                                                   "overlap within [0, 1] and at least one micro-batch"], overlap.stderr


def test_step_is_measured_as_the_flags_configure_it(tmp_path):
    out = run(TINY_BENCH + ["--mode=step", "--parallel_slices=2", "--grad_accum_steps=2", "--clip_norm=0.5",
                            f"--output_json={tmp_path / 's.json'}"])
    rec = json.loads((tmp_path / "s.json").read_text())
    assert (rec["parallel_slices"], rec["grad_accum_steps"], rec["clip_norm"]) == (2, 2, 0.5)
    # An optimizer step of 2 micro-batches of 4 windows of 16 tokens.
    assert rec["tokens_per_sec_global"] == pytest.approx(2 * 4 * 16 / (rec["step_ms_median"] / 1000))
    assert _last_json(out.stdout) == rec

    fit = run(TINY_BENCH + ["--mode=overhead", "--grad_accum_steps=2", "--clip_norm=0.5",
                            f"--output_json={tmp_path / 'o.json'}"])
    assert json.loads((tmp_path / "o.json").read_text())["grad_accum_steps"] == 2 and "keras model.fit" in fit.stdout

    uneven = run(TINY_BENCH + ["--parallel_slices=3"], check=False)
    assert uneven.returncode == 1
    assert uneven.stderr.strip().splitlines()[-1] == (
        "error: --batch_size=4 does not split into --parallel_slices=3 equal slices")


def test_init_preset_gives_the_architecture_and_refuses_conflicting_flags(tmp_path):
    import keras

    from tfllm import preset
    from tfllm.tokenizers import train_tokenizer

    cfg = ModelConfig(family="gpt2", num_layers=1, num_heads=2, hidden_dim=48, max_sequence_length=16, vocab_size=40)
    keras.utils.set_random_seed(0)
    model = build_causal_lm(cfg)
    preset.save(model, train_tokenizer("char", iter(["abcdefg hij"]), 0), str(tmp_path / "p"))
    args = ["-m", "pipelines.benchmark", f"--init_preset={tmp_path / 'p'}", "--seq_len=16", "--batch_size=4",
            "--bench_steps=3", "--bench_warmup=1", f"--output_json={tmp_path / 's.json'}"]
    run(args)
    rec = json.loads((tmp_path / "s.json").read_text())
    assert (rec["model"]["num_layers"], rec["model"]["hidden_dim"], rec["model"]["vocab_size"]) == (1, 48, 40)
    assert rec["params"] == count_params(model)

    conflict = run(args + ["--hidden_dim=32"], check=False)
    assert conflict.returncode == 1 and "disagrees with --hidden_dim=32 (preset: 48)" in conflict.stderr
