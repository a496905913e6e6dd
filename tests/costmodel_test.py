"""The ring-allreduce cost model: formula, calibration, predictions."""

import dataclasses
import math

import pytest

from tfllm import costmodel

LINK = costmodel.Link(bandwidth_bytes_per_s=10e9, latency_s=5e-6)


def test_ring_formula_by_hand():
    assert costmodel.ring_allreduce_seconds(1e9, 1, LINK) == 0.0
    # 2 workers: 2 steps of latency, each worker sends half the buffer twice = B bytes.
    assert costmodel.ring_allreduce_seconds(1e6, 2, LINK) == pytest.approx(2 * 5e-6 + 1e6 / 10e9)
    # 8 workers, 3 fusion buffers of 64 MiB: latency paid per buffer.
    nbytes = 150 * 2**20
    expected = 3 * 2 * 7 * 5e-6 + 2 * 7 / 8 * nbytes / 10e9
    assert costmodel.ring_allreduce_seconds(nbytes, 8, LINK) == pytest.approx(expected)
    with pytest.raises(ValueError):
        costmodel.ring_allreduce_seconds(1, 0, LINK)


def test_calibration_reproduces_the_measured_point():
    for n, nbytes, measured, latency in [(2, 3_240_960, 0.0107, 0.00093), (4, 5e8, 0.4, 1e-4), (2, 100, 1e-3, 0)]:
        link = costmodel.calibrate_link(nbytes, n, measured, latency)
        assert link.latency_s == latency
        assert costmodel.ring_allreduce_seconds(nbytes, n, link) == pytest.approx(measured, rel=1e-12)
    with pytest.raises(ValueError, match="latency term"):
        costmodel.calibrate_link(1e6, 2, measured_s=1e-3, latency_s=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        costmodel.calibrate_link(1e6, 1, 1e-3, 0)


def _record(step_ms=129.19, allreduce_ms=10.66, latency_ms=1.857, n=2):
    return {"world_size": n, "grad_bytes": 3_240_960, "step_ms_median": step_ms, "allreduce_ms": allreduce_ms,
            "latency_allreduce_ms": latency_ms, "allreduce_share": allreduce_ms / step_ms}


def test_local_calibration_reduces_to_the_measurement():
    cal = costmodel.local_calibration(_record())
    assert cal["predicted_allreduce_s"] == pytest.approx(cal["measured_allreduce_s"], rel=1e-12)
    assert cal["predicted_efficiency"] == pytest.approx(cal["measured_efficiency"], rel=1e-12)
    assert cal["measured_efficiency"] == pytest.approx(1 - 10.66 / 129.19)
    assert cal["latency_s"] == pytest.approx(1.857e-3 / 2)  # 2 (N-1) steps of latency at N=2
    # The calibrated curve at the calibration point gives the measured efficiency again.
    link = costmodel.Link(cal["bandwidth_bytes_per_s"], cal["latency_s"])
    (row,) = costmodel.predict(costmodel.Cluster(link, link, 64), cal["grad_bytes"], cal["compute_s"], [2])
    assert row["efficiency"] == pytest.approx(cal["measured_efficiency"], rel=1e-12)


def test_predictions_fall_with_scale_and_cross_nodes_at_the_slow_link():
    cluster = costmodel.Cluster(costmodel.Link(300e9, 5e-6), costmodel.Link(40e9, 10e-6), gpus_per_node=8)
    assert cluster.link(8) == cluster.intra_node
    assert cluster.link(16) == costmodel.Link(40e9, 10e-6)
    rows = costmodel.predict(cluster, 124e6 * 4, 0.035)
    assert [r["gpus"] for r in rows] == list(costmodel.GPU_COUNTS)
    effs = [r["efficiency"] for r in rows]
    assert all(a > b for a, b in zip(effs, effs[1:])) and all(0 < e < 1 for e in effs)
    # Halving the bytes on the wire can only help.
    half = costmodel.predict(cluster, 124e6 * 2, 0.035)
    assert all(h["efficiency"] > r["efficiency"] for h, r in zip(half, rows))
    # The 512-GPU point by hand: 8 fusion buffers, 2*511 latency steps each, then the transfer.
    ar = 8 * 2 * 511 * 10e-6 + 2 * 511 / 512 * 124e6 * 4 / 40e9
    assert rows[-1]["efficiency"] == pytest.approx(0.035 / (0.035 + ar))


def test_gpu_scenario_compute_time_from_flops():
    s = costmodel.GpuScenario(params=100, flops_per_token=1e9, tokens_per_gpu_step=1000, peak_flops=1e15,
                              assumed_mfu=0.5, wire_bytes_per_param=2, cluster=None)
    assert s.compute_s == pytest.approx(1000 * 1e9 / 5e14)
    assert s.grad_bytes == 200


def test_report_writes_a_png_and_a_table(tmp_path):
    cluster = costmodel.Cluster(costmodel.Link(300e9, 5e-6), costmodel.Link(40e9, 10e-6))
    scenario = costmodel.GpuScenario(124_000_000, 8.6e8, 16384, 989e12, 0.4, 4, cluster)
    png = tmp_path / "scaling.png"
    pieces = costmodel.lm_pieces([1536] + [7_087_872] * 12 + [39_383_040], 50304, 768, 1024)
    result, table = costmodel.report(_record(), scenario, str(png), pieces, {1: [0, 14], 4: [0, 5, 9, 13, 14]})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len(table) == 1 + len(costmodel.GPU_COUNTS) and len(table[0]) == 1 + len(result["curves"])
    assert math.isclose(result["gpu_scenario"]["compute_s"], scenario.compute_s)
    assert table[0][3:] == ["16-bit gradients, 4 buckets", "this machine's calibrated link and compute"]
    unbucketed, bucketed = (result["curves"][k] for k in list(result["curves"])[1:3])
    assert all(b["efficiency"] > u["efficiency"] for u, b in zip(unbucketed, bucketed) if u["gpus"] <= 64)
    # Accumulating 4 micro-batches of the same tokens leaves a quarter of the backward to hide behind.
    accumulated = dataclasses.replace(scenario, micro_batches=4)
    later, _ = costmodel.report(_record(), accumulated, "", pieces, {4: [0, 5, 9, 13, 14]})
    assert all(a["step_s"] > b["step_s"] for a, b in zip(later["curves"]["16-bit gradients, 4 buckets"], bucketed)
               if b["gpus"] >= 16)


# top (no parameters of its own, as with a tied head), two layers, the embeddings; 1 byte/s links
# without latency at 2 workers make an allreduce take exactly its byte count in seconds.
PIECES = [costmodel.Piece(0, 1.0), costmodel.Piece(0.5, 1.0), costmodel.Piece(0.2, 1.0), costmodel.Piece(0.3, 0.0)]
SLOW = costmodel.Link(1.0, 0.0)


def test_bucketed_timeline_by_hand():
    # Forward 1 s, backward 2 s (2/3 s per piece with FLOPs). Bucket [top, layer 1] is ready at
    # 1 + 4/3 s and its 0.5 s allreduce ends inside the backward; [layer 2] and the embeddings are
    # ready only when the backward ends at 3 s: 0.2 s, then 0.3 s, exposed.
    r = costmodel.bucketed_step(PIECES, [0, 2, 3, 4], compute_s=3.0, n=2, link=SLOW, bytes_per_param=1)
    assert r["step_s"] == pytest.approx(3.5) and r["allreduce_s"] == pytest.approx(1.0)
    assert r["exposed_s"] == pytest.approx(0.5) and r["hidden_share"] == pytest.approx(0.5)
    # At half speed during the backward, 1/3 s of the first allreduce fits before 3 s, 1/6 s follows.
    half = costmodel.bucketed_step(PIECES, [0, 2, 3, 4], 3.0, 2, SLOW, 1, overlap=0.5)
    assert half["step_s"] == pytest.approx(3.0 + 1 / 6 + 0.2 + 0.3)
    # Two accumulated micro-batches: only the second one's backward (4 s to 6 s) hides anything.
    two = costmodel.bucketed_step(PIECES, [0, 2, 3, 4], 6.0, 2, SLOW, 1, micro_batches=2)
    assert two["step_s"] == pytest.approx(6.5) and two["hidden_share"] == pytest.approx(0.5)
    # Six: the backward is 2/3 s, and only 2/9 s of the first allreduce fits after its bucket is ready.
    short = costmodel.bucketed_step(PIECES, [0, 2, 3, 4], 6.0, 2, SLOW, 1, micro_batches=6)
    assert short["step_s"] == pytest.approx(6.0 + 1.0 - 2 / 9)


def test_one_bucket_or_no_overlap_is_the_unbucketed_step():
    link = costmodel.Link(40e9, 10e-6)
    pieces = costmodel.lm_pieces([1536] + [7_087_872] * 12 + [39_383_040], 50304, 768, 1024)
    nbytes = 2 * sum(p.params for p in pieces)
    for n in (2, 16, 64):
        one = costmodel.bucketed_step(pieces, [0, len(pieces)], 0.036, n, link, 2)
        assert one["step_s"] == pytest.approx(0.036 + costmodel.ring_allreduce_seconds(nbytes, n, link), rel=1e-12)
        assert one["hidden_share"] == pytest.approx(0.0, abs=1e-12)
        # With no overlap every bucket is exposed, each paying its own latency.
        cuts = [0, 5, 9, 13, 14]
        none = costmodel.bucketed_step(pieces, cuts, 0.036, n, link, 2, overlap=0.0)
        per_bucket = sum(costmodel.ring_allreduce_seconds(2 * sum(p.params for p in pieces[a:b]), n, link)
                         for a, b in zip(cuts, cuts[1:]))
        assert none["step_s"] == pytest.approx(0.036 + per_bucket, rel=1e-12)
        # Overlapping can only help, and the embeddings' allreduce, ready last, always stays exposed.
        full = costmodel.bucketed_step(pieces, cuts, 0.036, n, link, 2)
        assert none["step_s"] >= full["step_s"] >= 0.036 + costmodel.ring_allreduce_seconds(2 * 39_383_040, n, link)
    with pytest.raises(ValueError, match="do not split 14 pieces"):
        costmodel.bucketed_step(pieces, [0, 5, 5, 14], 0.036, 2, link, 2)
    with pytest.raises(ValueError, match="overlap must be within"):
        costmodel.bucketed_step(pieces, [0, 14], 0.036, 2, link, 2, overlap=1.5)


def test_lm_pieces_count_the_flops_the_step_counts():
    d, V, T, L = 768, 50304, 1024, 12
    layer = 12 * d * d + 13 * d
    units = [2 * d] + [layer] * L + [V * d + T * d]  # final norm; layers; token + position embeddings (head tied)
    pieces = costmodel.lm_pieces(units, V, d, T)
    assert [p.params for p in pieces] == units and pieces[-1].forward_flops_per_token == 0
    assert pieces[0].forward_flops_per_token == 2 * V * d  # the tied head's projection
    # Forward + backward (3x) against models.flops_per_token's 6 N + 12 L d T: only the position
    # embeddings and norms (no matmul) make the difference.
    total = 6 * sum(units) + 12 * L * d * T
    assert 3 * sum(p.forward_flops_per_token for p in pieces) == pytest.approx(total, rel=0.01)
    with pytest.raises(ValueError, match="at least one layer"):
        costmodel.lm_pieces([1, 2], V, d, T)


def test_overlap_fit_recovers_the_overlap_that_made_the_steps():
    link, cuts = costmodel.Link(2e6, 1e-4), {2: [0, 2, 4], 3: [0, 2, 3, 4]}
    pieces = [costmodel.Piece(p * 1000, f) for p, f in ((0, 1.0), (500, 1.0), (200, 1.0), (300, 0.0))]
    runs = [{"allreduce_buckets": b, "compute_ms": 30.0,
             "step_ms": 1000 * costmodel.bucketed_step(pieces, cuts[b], 0.03, 2, link, 4, overlap=0.25)["step_s"]}
            for b in cuts]
    assert costmodel.fit_overlap(runs, pieces, cuts, 2, link, 4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no run with more than one bucket"):
        costmodel.fit_overlap(runs[:0], pieces, cuts, 2, link, 4)
    # The top piece holds the whole backward, so every bucket is ready as it ends, whatever the overlap.
    flat = [costmodel.Piece(p.params, 1.0 if i == 0 else 0.0) for i, p in enumerate(pieces)]
    with pytest.raises(ValueError, match="cannot measure it"):
        costmodel.fit_overlap(runs, flat, cuts, 2, link, 4)
