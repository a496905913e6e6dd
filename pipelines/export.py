r"""Export a trained model dir as a TensorFlow SavedModel (string in, string out) and a .keras file.

Single process (export needs no collectives; under a launcher rank 0 exports, the others exit):
    python -m pipelines.export --model_dir=runs/tiny --output_dir=exports/tiny
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.export --model_dir=runs/tiny --output_dir=exports/tiny
    mpirun -np 2 python -m pipelines.export --model_dir=runs/tiny --output_dir=exports/tiny
Serving needs only TensorFlow and tensorflow-text:
    import tensorflow as tf, tensorflow_text
    m = tf.saved_model.load("exports/tiny/saved_model")
    m.signatures["generate"](prompts=tf.constant(["def "]), max_new_tokens=tf.constant(64))["text"]
    m.signatures["score"](texts=tf.constant(["def f(x):"]))  # log_prob, tokens
Quantized (int8 weights with per-channel scales, or int4 with per-128-input scales; see
tfllm/quantize.py), from a model dir or from a float export:
    python -m pipelines.export --model_dir=runs/tiny --output_dir=exports/tiny-int8 --quantize=int8
    python -m pipelines.export --model_dir=exports/tiny --output_dir=exports/tiny-int8 --quantize=int8
TensorFlow Serving (k8s/serving) serves <serving_dir>/<version>/; --serving_dir also places the SavedModel
there as version <step>, and the server moves to the highest version it finds:
    python -m pipelines.export --model_dir=/data/runs/tiny --output_dir=/data/exports/tiny \
        --serving_dir=/data/serving/tfllm
`<output_dir>/preset` is a keras-hub preset (GPT-2 ones load with keras_hub.models.CausalLM.from_preset)
that a new pretraining run can start from: python -m pipelines.pretrain ... --init_preset=exports/tiny/preset
"""

import dataclasses
import os

from tfllm import atomic, cli, distributed
from tfllm.config import ConfigError
from tfllm.export import export, output_dir
from tfllm.flags import Options, define_options, option, read_options
from tfllm.models import build_causal_lm
from tfllm.quantize import check_mode, quantization_mode, quantize, refuse_quantized, weight_bytes
from tfllm.restore import load_trained_model


@dataclasses.dataclass(frozen=True)
class ExportOptions(Options):
    model_dir: str = option("", "Model dir written by pipelines.pretrain, or an export of one.")
    checkpoint: str = option("latest", "latest, best, a step number or a checkpoint directory.")
    output_dir: str = option("", "Where to write saved_model/, model.keras, tokenizer/ and preset/.")
    overwrite: bool = option(False, "Replace an existing --output_dir.")
    quantize: str = option("", "int8 or int4: quantize the weights (Keras post-training quantization).")
    serving_dir: str = option("", "Also copy the SavedModel to <serving_dir>/<step>, a version of a TensorFlow "
                              "Serving model base path (--overwrite replaces an existing version).")


define_options(ExportOptions)


def main(argv):
    if not distributed.init().is_chief:
        return
    opts = read_options(ExportOptions)
    if not opts.output_dir:
        raise ConfigError("--output_dir is required")
    if opts.quantize:
        check_mode(opts.quantize)
    if os.path.abspath(opts.output_dir) == os.path.abspath(opts.model_dir):
        raise ConfigError(f"--output_dir={opts.output_dir} is the --model_dir it exports from; choose another")
    output_dir(opts.output_dir, opts.overwrite)  # before the model loads: an existing export is kept
    trained = load_trained_model(opts.model_dir, opts.checkpoint)
    version_dir = output_dir(os.path.join(opts.serving_dir, str(trained.step)), opts.overwrite) \
        if opts.serving_dir else None
    model, size = trained.model, weight_bytes(trained.model)
    refuse_quantized(trained.quantization or quantization_mode(model), opts.model_dir)
    if opts.quantize:
        model = quantize(model, opts.quantize, source=opts.model_dir)
        print(f"quantized to {opts.quantize}: weights {size / 1e6:.2f} MB -> {weight_bytes(model) / 1e6:.2f} MB",
              flush=True)
    record = {"config": trained.config.to_dict(), "step": trained.step, "checkpoint": trained.checkpoint,
              "source": os.path.abspath(opts.model_dir)}
    # int8 serves through a float twin of the architecture (see tfllm/quantize.py: FloatTwin).
    twin = build_causal_lm(trained.config.model) if opts.quantize == "int8" else None
    out = export(model, trained.tokenizer, trained.config.model.max_sequence_length, opts.output_dir,
                 opts.overwrite, record, twin, trained.config.data.clean)
    print(f"exported step {trained.step} ({trained.checkpoint}) to {out}", flush=True)
    if version_dir:  # complete or absent: the server never sees a half-copied version
        atomic.copy_dir(os.path.join(out, "saved_model"), version_dir)
        print(f"TensorFlow Serving version {trained.step}: {version_dir}", flush=True)


if __name__ == "__main__":
    cli.run(main)
