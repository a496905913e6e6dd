"""A model's forward pass as a chain of segments, and the gradient buckets they define.

The bucketed backward (`TrainStep(allreduce_buckets=B)`) needs the forward pass cut by depth:
each cut is a separate (XLA-compiled) function, so TensorFlow differentiates it as a separate
backward call, and the gradients of the variables that only that segment reads exist as soon
as that call returns, while the backward of the segments below is still to run. A `Chain`
names the pieces of a keras-hub backbone model bottom to top:

    embed(batch) -> hidden                 token (+ position) embeddings
    blocks[i](hidden, batch) -> hidden     one transformer layer each
    top(hidden, batch) -> logits           final norm and the head
    sums(logits, batch) -> (loss_sum, correct, count)

Calling them in order computes exactly what `model(features)` computes (tested). The tied
vocabulary projection reads the token embedding at the top, but the embedding's gradient is
complete only once the lookup at the bottom is differentiated, so shared variables belong to
the lowest unit that reads them: the embeddings are always in the last bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Sequence

import keras
import tensorflow as tf


@dataclasses.dataclass
class Unit:
    """A piece of the forward pass and the layers whose variables it reads."""
    name: str
    call: Callable  # (hidden or None, batch, training) -> hidden, or logits for the top unit
    layers: Sequence[keras.layers.Layer]


@dataclasses.dataclass
class Chain:
    embed: Unit
    blocks: list[Unit]
    top: Unit
    sums: Callable  # (logits, batch) -> (loss_sum, correct, count), the step's loss_fn without the model

    def units_top_down(self) -> list[Unit]:
        return [self.top, *reversed(self.blocks), self.embed]


def backbone_units(backbone: keras.Model, features: Callable) -> tuple[Unit, list[Unit]]:
    """The embedding unit and one unit per transformer layer of a keras-hub GPT-2 or Llama backbone.

    `features(batch)` gives the backbone's inputs dict for a batch of the step's rows.
    """
    mask_dtype = backbone.input["padding_mask"].dtype if isinstance(backbone.input, dict) else "int32"

    def embed(_, batch, training):
        tokens = backbone.token_embedding(features(batch)["token_ids"])
        if hasattr(backbone, "position_embedding"):  # GPT-2: learned positions, then dropout
            x = backbone.embeddings_add((tokens, backbone.position_embedding(tokens)))
            return backbone.embeddings_dropout(x, training=training)
        return tokens

    def block(layer):
        def call(hidden, batch, training):
            mask = tf.cast(features(batch)["padding_mask"], mask_dtype)
            with _gelu_from_its_input(layer):
                return layer(hidden, decoder_padding_mask=mask, training=training)
        return Unit(layer.name, call, [layer])

    embed_layers = [backbone.token_embedding] + ([backbone.position_embedding]
                                                 if hasattr(backbone, "position_embedding") else [])
    return Unit("embeddings", embed, embed_layers), [block(layer) for layer in backbone.transformer_layers]


@tf.custom_gradient
def gelu_tanh(x):
    """GPT-2's tanh GELU whose gradient needs only its input.

    TensorFlow's gradient of the composite GELU keeps seven [tokens, ffn] intermediates. Inside
    one XLA computation XLA recomputes them, but a segment's forward has to return all of
    them to its backward, which then reads 8x the data: on a CPU that made the bucketed
    backward of the baby GPT 17% slower. Same forward; the gradient is the analytic one.
    """
    def grad(dy):
        x2 = x * x
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x2 * x)
        t = tf.tanh(inner)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x2))
    return tf.nn.gelu(x, approximate=True), grad


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@contextlib.contextmanager
def _gelu_from_its_input(layer):
    """Traces `layer` with `gelu_tanh` in place of keras-hub's GPT-2 GELU (Llama's SiLU already
    recomputes its sigmoid in its gradient)."""
    dense = getattr(layer, "_feedforward_intermediate_dense", None)
    if dense is None or getattr(dense.activation, "__name__", "") != "gelu_approximate":
        yield
        return
    original = dense.activation
    dense.activation = gelu_tanh
    try:
        yield
    finally:
        dense.activation = original


@dataclasses.dataclass
class Bucket:
    """Consecutive units (bottom to top in `units`) and the indices of the step's variables they own."""
    units: list[Unit]
    variable_indices: list[int]


def plan_buckets(chain: Chain, variables: Sequence, buckets: int) -> list[Bucket]:
    """Splits the chain into `buckets` contiguous buckets, top first, of similar parameter counts.

    Every variable goes to the lowest unit that reads it; variables no unit reads (none in the
    supported models) join the last bucket, which is reduced after the whole backward pass.
    """
    units = chain.units_top_down()
    if not 1 <= buckets <= len(units):
        raise ValueError(f"{buckets} allreduce buckets: this model has {len(units)} units to split "
                         f"(the top, {len(chain.blocks)} transformer layers, the embeddings); use 1 to {len(units)}")
    owner = _owners(chain, variables)
    cuts = balanced_cuts(_sizes(owner, variables, len(units)), buckets)
    plan = []
    for b, (start, stop) in enumerate(zip(cuts, cuts[1:])):
        owned = sorted(i for i, u in owner.items() if start <= u < stop)
        if b == buckets - 1:
            owned = sorted(owned + [i for i in range(len(variables)) if i not in owner])
        plan.append(Bucket(list(reversed(units[start:stop])), owned))
    return plan


def _owners(chain: Chain, variables: Sequence) -> dict[int, int]:
    """Variable position -> position of the unit (top down) that owns it: the lowest that reads it."""
    index = {id(v): i for i, v in enumerate(variables)}
    owner = {}
    for u, unit in enumerate(chain.units_top_down()):
        for layer in unit.layers:
            for v in layer.trainable_variables:
                if id(v) in index:
                    owner[index[id(v)]] = u
    return owner


def unit_params(chain: Chain, variables: Sequence) -> list[int]:
    """Parameters each unit (top down) owns, the sizes buckets are balanced by."""
    return _sizes(_owners(chain, variables), variables, len(chain.units_top_down()))


def _sizes(owner: dict[int, int], variables: Sequence, units: int) -> list[int]:
    sizes = [0] * units
    for i, u in owner.items():
        sizes[u] += math.prod(int(d) for d in variables[i].shape)
    return sizes


def balanced_cuts(sizes: list[int], buckets: int) -> list[int]:
    """Boundaries [0, c1, ..., len(sizes)] of `buckets` non-empty runs with near-equal sums."""
    total = max(1, sum(sizes))
    cuts, running = [0], 0
    for u, size in enumerate(sizes):
        running += size
        left_units, left_cuts = len(sizes) - (u + 1), buckets - len(cuts)
        if left_cuts == 0:
            break
        # cut after unit u once this bucket holds its share, or when every remaining unit needs a bucket
        if left_units == left_cuts or (running >= total * len(cuts) / buckets and left_units >= left_cuts):
            cuts.append(u + 1)
    return cuts + [len(sizes)]
