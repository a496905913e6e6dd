"""Run under 2 ranks: allreduce, grouped allreduce, allgather and broadcast of known values."""

import json
import sys

import numpy as np
import tensorflow as tf
import keras

import tfllm  # noqa: F401  (quiet TF logging)
from tfllm import distributed


def main(out_path: str) -> None:
    world = distributed.init()
    r, n = world.rank, world.size
    grouped = distributed.grouped_allreduce_mean(
        [tf.constant([1.0, 2.0, 4.0]) * (r + 1), tf.fill([2, 2], float(10 * r))])
    summed = distributed.allreduce_sum([r + 1, 100 * r])
    gathered = distributed.allgather(np.full([r + 1], r, np.int32))
    var = keras.Variable(np.full([3], r + 7.0, np.float32))
    distributed.broadcast_variables([var], root=0)
    obj = distributed.broadcast_object({"from": r}, root=1)
    result = {
        "rank": r, "size": n, "backend": world.backend,
        "grouped": [g.numpy().tolist() for g in grouped],
        "summed": summed.tolist(), "gathered": gathered.tolist(),
        "broadcast": var.numpy().tolist(), "object": obj,
    }
    with open(f"{out_path}.{r}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
