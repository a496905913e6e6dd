"""Export a trained model dir as a TensorFlow SavedModel (string in, string out) and a .keras file.

Single process (export needs no collectives; under a launcher rank 0 exports, the others exit):
    python -m pipelines.export --model_dir=runs/tiny --output_dir=exports/tiny
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.export --model_dir=runs/tiny --output_dir=exports/tiny
    mpirun -np 2 python -m pipelines.export --model_dir=runs/tiny --output_dir=exports/tiny
Serving needs only TensorFlow and tensorflow-text:
    import tensorflow as tf, tensorflow_text
    m = tf.saved_model.load("exports/tiny/saved_model")
    m.signatures["generate"](prompts=tf.constant(["def "]), max_new_tokens=tf.constant(64))["text"]
    m.signatures["score"](texts=tf.constant(["def f(x):"]))  # log_prob, tokens
`<output_dir>/preset` is a keras-hub preset (GPT-2 ones load with keras_hub.models.CausalLM.from_preset)
that a new pretraining run can start from: python -m pipelines.pretrain ... --init_preset=exports/tiny/preset
"""

from absl import flags

from tfllm import cli, distributed
from tfllm.config import ConfigError
from tfllm.export import export
from tfllm.restore import load_trained_model

flags.DEFINE_string("model_dir", "", "Model dir written by pipelines.pretrain.")
flags.DEFINE_string("checkpoint", "latest", "latest, best, a step number or a checkpoint directory.")
flags.DEFINE_string("output_dir", "", "Where to write saved_model/, model.keras, tokenizer/ and preset/.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output_dir.")
FLAGS = flags.FLAGS


def main(argv):
    if not distributed.init().is_chief:
        return
    if not FLAGS.output_dir:
        raise ConfigError("--output_dir is required")
    trained = load_trained_model(FLAGS.model_dir, FLAGS.checkpoint)
    context = trained.config.model.max_sequence_length
    out = export(trained.model, trained.tokenizer, context, FLAGS.output_dir, FLAGS.overwrite)
    print(f"exported step {trained.step} ({trained.checkpoint}) to {out}", flush=True)


if __name__ == "__main__":
    cli.run(main)
