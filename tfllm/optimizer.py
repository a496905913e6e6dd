"""The optimizer: AdamW, its learning-rate schedule, and per-variable learning-rate scales.

Pretraining and fine-tuning build theirs here. Fine-tuning may give each variable its own
share of the schedule's learning rate (`--layer_lr_decay`, layer-wise decay as in ULMFiT's
discriminative fine-tuning and ELECTRA): the head learns at the full rate and each layer below
at a constant factor less, so the pretrained lower layers move least.
"""

from __future__ import annotations

from typing import Mapping

import keras
import tensorflow as tf

from tfllm.config import OptimizerConfig


class WorldScaled(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule times the current world size, held in a variable so that elastic mode can
    change it on a resize without retracing the optimizer's update."""

    def __init__(self, schedule, world_size: int):
        self.schedule = schedule
        self.world_size = tf.Variable(float(world_size), trainable=False, name="lr_world_size")

    def __call__(self, step):
        return self.schedule(step) * tf.cast(self.world_size, tf.float32)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "world_size": float(self.world_size.numpy())}


class ScaledAdamW(keras.optimizers.AdamW):
    """AdamW whose step and decoupled weight decay for a variable are the schedule's learning
    rate times that variable's scale (1 where `lr_scales`, keyed by variable path, is silent).

    Scaling gradients instead would do nothing: Adam's update does not depend on their size.
    The scales are Python constants, so the compiled update is AdamW's with a multiply.
    """

    def __init__(self, lr_scales: Mapping[str, float], **kwargs):
        # AdamW's name, hence its variables' paths: a run can resume with another --layer_lr_decay.
        kwargs.setdefault("name", "adam_w")
        super().__init__(**kwargs)
        self.lr_scales = dict(lr_scales)
        self._scale_by_index: list[float] = []

    def build(self, var_list):
        super().build(var_list)
        self._scale_by_index = [float(self.lr_scales.get(v.path, 1.0)) for v in var_list]

    def scale_of(self, variable) -> float:
        return self._scale_by_index[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient, variable, learning_rate * self.scale_of(variable))

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                rate = tf.cast(self.learning_rate * self.scale_of(variable) * self.weight_decay, variable.dtype)
                variable.assign(variable - variable * rate)

    def get_config(self):
        return {**super().get_config(), "lr_scales": self.lr_scales}


def make_optimizer(cfg: OptimizerConfig, train_steps: int, world_size: int, model, precision: str,
                   elastic: bool = False, lr_scales: Mapping[str, float] | None = None):
    """AdamW with linear warmup then cosine decay to min_learning_rate.

    --scale_lr_with_world_size multiplies both learning rates by the number of ranks (the
    linear scaling rule of Goyal et al. 2017): the global batch grows with the world, so the
    step size grows with it; warmup keeps the early large steps stable.
    Elastic mode scales by the world size of each step instead (`WorldScaled`): the learning
    rate follows the global batch through resizes.
    `lr_scales` (variable path -> factor) gives variables a share of the rate (`ScaledAdamW`).
    """
    factor = world_size if cfg.scale_lr_with_world_size and not elastic else 1
    peak, floor = cfg.learning_rate * factor, cfg.min_learning_rate * factor
    warmup = min(cfg.warmup_steps, max(train_steps - 1, 0))
    decay = max(1, (cfg.decay_steps or train_steps) - warmup)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak, decay_steps=decay, alpha=floor / peak,
        warmup_target=peak if warmup else None, warmup_steps=warmup)
    if elastic and cfg.scale_lr_with_world_size:
        schedule = WorldScaled(schedule, world_size)
    settings = dict(learning_rate=schedule, weight_decay=cfg.weight_decay, beta_1=cfg.beta1, beta_2=cfg.beta2,
                    epsilon=cfg.epsilon)
    optimizer = ScaledAdamW(lr_scales, **settings) if lr_scales else keras.optimizers.AdamW(**settings)
    excluded = []
    for v in model.trainable_variables:
        is_bias = v.path.rsplit("/", 1)[-1] == "bias"  # attention biases are 2-D ([heads, head_dim])
        is_norm_or_embedding = len(v.shape) < 2 or "embedding" in v.path
        if is_bias or (is_norm_or_embedding and not cfg.decay_embeddings_and_norms):
            excluded.append(v)
    optimizer.exclude_from_weight_decay(var_list=excluded)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
