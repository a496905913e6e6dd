"""Training windows by global position, in an order that no world size shapes (elastic mode).

Epoch e's order is a seeded permutation of all the split's windows. The data position is one
number, the count of windows all ranks together have consumed (`LoopState.samples`). A step at
world size N with batch b and K micro-batches takes the next G = N * b * K positions: micro-batch
k of rank r takes positions p + (k * N + r) * b up to b more. Positions run on across epoch ends:
position s is window perm_{s // W}[s % W] of a split of W windows, so a step that crosses an
epoch's end finishes it and starts the next. Nothing here depends on N, so after a resize the
new ranks share the rest of the epoch: every window of every epoch is taken once, with no
repeats and no gaps, whatever the world sizes along the way.

Windows are read in place from the TFRecord shards. Every record of a split holds one window of
the same size W_b, so record i of a shard starts at byte i * (W_b + 16): an 8-byte length and
its 4-byte CRC come before the payload, the payload's CRC after it.
"""

from __future__ import annotations

import numpy as np

from tfllm.data.pipeline import DataError, WindowDataset, _seed

_HEADER, _FOOTER = 12, 4


class GlobalOrder:
    def __init__(self, dataset: WindowDataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.dtype = np.dtype("<u2") if dataset.manifest["dtype"] == "uint16" else np.dtype("<i4")
        self.window_bytes = (dataset.seq_len + 1) * self.dtype.itemsize
        self.record_bytes = self.window_bytes + _HEADER + _FOOTER
        self.num_windows = dataset.num_windows
        counts = [s["windows"] for s in dataset.shards]
        self._first = np.cumsum([0] + counts)  # global index of each shard's first window
        self._shards = []
        for path, count in zip(dataset.paths, counts):
            data = np.memmap(path, np.uint8, mode="r")
            if len(data) != count * self.record_bytes or \
                    int(np.frombuffer(data[:8].tobytes(), "<u8")[0]) != self.window_bytes:
                raise DataError(f"{path}: not {count} records of {self.window_bytes} bytes each")
            self._shards.append(data.reshape(count, self.record_bytes))
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng(_seed(self.seed, epoch, "global-order"))
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return self._order

    def window_ids(self, start: int, count: int) -> np.ndarray:
        """The windows at global positions start .. start + count - 1."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs = positions // self.num_windows
        ids = np.empty(count, np.int64)
        for epoch in np.unique(epochs):
            mine = epochs == epoch
            ids[mine] = self.order(int(epoch))[positions[mine] % self.num_windows]
        return ids

    def read(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), seq_len + 1] int32 windows."""
        shard = np.searchsorted(self._first, ids, side="right") - 1
        out = np.empty((len(ids), self.window_bytes), np.uint8)
        for n, (s, i) in enumerate(zip(shard, ids - self._first[shard])):
            out[n] = self._shards[s][i, _HEADER:_HEADER + self.window_bytes]
        return out.view(self.dtype).astype(np.int32)

    def step_ids(self, position: int, rank: int, size: int, batch_size: int, micro_batches: int) -> np.ndarray:
        """[micro_batches, batch_size] window ids of one rank's share of the step at `position`."""
        ids = self.window_ids(position, size * batch_size * micro_batches)
        return ids.reshape(micro_batches, size, batch_size)[:, rank]
