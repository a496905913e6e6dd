"""Real Horovod collectives with 2 ranks, through both launchers."""

import json

import pytest

from conftest import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_collectives_exact_results(tmp_path, launcher):
    out = tmp_path / "result"
    run(["tests/distributed/collectives_worker.py", str(out)], launcher=launcher, np=2)
    results = [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["size"] == 2
        assert res["backend"] == launcher
        # mean of [1,2,4]*1 and [1,2,4]*2; mean of 0 and 10
        assert res["grouped"] == [[1.5, 3.0, 6.0], [[5.0, 5.0], [5.0, 5.0]]]
        assert res["summed"] == [3.0, 100.0]
        assert res["gathered"] == [0, 1, 1]
        assert res["broadcast"] == [7.0, 7.0, 7.0]  # rank 0's value everywhere
        assert res["object"] == {"from": 1}
