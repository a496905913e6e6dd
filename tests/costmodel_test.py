"""The ring-allreduce cost model: formula, calibration, predictions."""

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
    result, table = costmodel.report(_record(), scenario, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len(table) == 1 + len(costmodel.GPU_COUNTS) and len(table[0]) == 1 + len(result["curves"])
    assert math.isclose(result["gpu_scenario"]["compute_s"], scenario.compute_s)
