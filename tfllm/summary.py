"""TensorBoard logging (rank 0 only), throughput and model FLOPs utilisation.

Event files go to `<model_dir>/tb/{train,validation,eval}`. On every other rank the writer is
a no-op, so callers never branch on rank.

MFU = achieved model FLOP/s / peak FLOP/s of the accelerator, where achieved model FLOP/s is
tokens/s x `models.flops_per_token` (6 N + 12 L d T). Peaks below are dense (no sparsity)
bf16/fp16 tensor-core figures from the vendors' data sheets. On CPU there is no meaningful
peak, so tfllm reports the achieved FLOP/s alone (`perf/model_flops_per_sec`).
"""

from __future__ import annotations

import os

import tensorflow as tf

from tfllm import distributed

# Dense bf16/fp16 tensor-core peak FLOP/s per device.
PEAK_FLOPS = {
    "B200": 2.25e15,
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def device_peak_flops() -> tuple[str, float | None]:
    """(device name, peak FLOP/s or None) for the first visible GPU; ('CPU', None) without one."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU", None
    try:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    except (ValueError, RuntimeError):
        name = "GPU"
    for key, peak in PEAK_FLOPS.items():  # ordered so "H100 PCIe" wins over "H100"
        if key.lower() in name.lower():
            return name, peak
    return name, None


# TensorBoard groups a dashboard's cards by the first component of the tag and sorts the groups
# by name; a bare tag is a group of its own. These names put the loss first, then the quality
# metrics, the optimizer, throughput and progress, each group holding related charts.
TAGS = {
    "perplexity": "metrics/perplexity", "accuracy": "metrics/accuracy", "macro_f1": "metrics/macro_f1",
    "learning_rate": "optimizer/learning_rate", "grad_norm": "optimizer/grad_norm",
    "tokens_seen": "progress/tokens_seen",
}


def tag(name: str) -> str:
    """The TensorBoard tag of a logged value (its key in metrics.jsonl is `name`)."""
    return TAGS.get(name, name)


def _fenced(text: str) -> str:
    """A Markdown code block, so that indentation and newlines of samples survive rendering."""
    return "```\n" + text.replace("```", "'''") + "\n```"


class SummaryWriter:
    """TensorBoard events, written by rank 0 (read at each write: elastic mode may move rank 0)."""

    def __init__(self, log_dir: str, enabled: bool | None = None):
        self._enabled = enabled
        self.log_dir = log_dir
        self._writers: dict[str, tf.summary.SummaryWriter] = {}

    @property
    def enabled(self) -> bool:
        return distributed.world().is_chief if self._enabled is None else self._enabled

    def _writer(self, split: str):
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(os.path.join(self.log_dir, split))
        return self._writers[split]

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self._writer(split).as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(tag(name), float(value))

    def text(self, split: str, step: int, name: str, text: str) -> None:
        if not self.enabled:
            return
        with self._writer(split).as_default(step=step):
            tf.summary.text(name, _fenced(text))

    def sample(self, split: str, step: int, name: str, prompt: str, continuation: str, how: str) -> None:
        """A generated sample: the prompt and the model's continuation as separate, labelled blocks."""
        if not self.enabled:
            return
        with self._writer(split).as_default(step=step):
            tf.summary.text(name, f"**prompt**\n\n{_fenced(prompt)}\n\n**continuation**, {how}\n\n{_fenced(continuation)}")

    def image(self, split: str, step: int, name: str, png: bytes) -> None:
        if not self.enabled:
            return
        with self._writer(split).as_default(step=step):
            tf.summary.image(name, tf.image.decode_png(png, channels=4)[tf.newaxis])

    def hparams(self, hparams: dict, metrics=(("validation", "loss"), ("train", "loss"))) -> None:
        """Records the run's hyperparameters at the log root (the run TensorBoard lists as "."),
        with the metrics to show from the split runs.

        The experiment config is needed: TensorBoard infers metrics only from runs below a
        session's run, and the root "." is never found as a parent. Its hyperparameters carry no
        domain, so that TensorBoard over many runs' logs, which uses one run's config for all,
        does not filter out the values of the others."""
        if not self.enabled:
            return
        from tensorboard.plugins.hparams import api as hp

        clean = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in hparams.items()}
        with self._writer("").as_default(step=0):
            hp.hparams_config(hparams=[hp.HParam(k) for k in clean],
                              metrics=[hp.Metric(tag(name), group=split) for split, name in metrics])
            hp.hparams(clean)

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}
