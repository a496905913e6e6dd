"""Fine-tunes a pretrained tfllm model dir into a text classifier; evaluates, predicts, exports.

Train (rerun to resume; --init=scratch trains the same architecture from random weights):
    python -m pipelines.finetune --flagfile=flags/sst2.cfg --pretrained_dir=runs/demo/model --model_dir=runs/sst2
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.finetune --flagfile=flags/sst2.cfg \
        --pretrained_dir=runs/demo/model --model_dir=runs/sst2
    mpirun -np 2 python -m pipelines.finetune --flagfile=flags/sst2.cfg --pretrained_dir=... --model_dir=...
Evaluate (accuracy, per-class precision/recall/F1, confusion matrix; same figures at any rank count):
    python -m pipelines.finetune --mode=evaluate --model_dir=runs/sst2 --eval_file=../shared/data/sst2/dev.tsv
Predict (one text per line from a file or stdin; prints label<TAB>probability per line):
    echo "a gorgeous , witty film" | python -m pipelines.finetune --mode=predict --model_dir=runs/sst2
Export (SavedModel, signature `classify`: strings in, probabilities and labels out; --quantize=int8 or
int4 for quantized weights, as pipelines.export). An export evaluates and predicts like the model dir:
    python -m pipelines.finetune --mode=export --model_dir=runs/sst2 --export_dir=runs/sst2-int8 --quantize=int8
    python -m pipelines.finetune --mode=evaluate --model_dir=runs/sst2-int8 --eval_file=../shared/data/sst2/dev.tsv
"""

import json
import os
import sys

from absl import flags

from tfllm import cli, distributed
from tfllm.config import ConfigError
from tfllm.flags import define_finetune_flags, define_train_flags, finetune_config_from_flags
from tfllm.quantize import check_mode, weight_bytes

define_train_flags()
define_finetune_flags()
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "export"], "What to do.")
flags.DEFINE_string("checkpoint", "best", "evaluate/predict/export: best, latest, a step or a path.")
flags.DEFINE_string("eval_file", "", "evaluate: labelled file (default: the run's validation examples).")
flags.DEFINE_string("input", "-", "predict: text file, one example per line ('-': stdin).")
flags.DEFINE_string("export_dir", "", "export: output directory.")
flags.DEFINE_string("quantize", "", "export: int8 or int4, quantized weights (as pipelines.export --quantize).")
flags.DEFINE_string("output_json", "", "train/evaluate: also write the final report here.")
FLAGS = flags.FLAGS


def _read_texts(path: str) -> list[str]:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--input={path}: cannot read it ({e})") from None
    texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"--input={path}: no texts")
    return texts


def main(argv):
    from tfllm import finetune

    if FLAGS.init_preset:  # a pretraining flag that fine-tuning would otherwise silently ignore
        raise ConfigError("--init_preset starts pretraining runs; fine-tuning starts from --pretrained_dir")
    if FLAGS.quantize and FLAGS.mode != "export":
        raise ConfigError("--quantize applies to --mode=export")
    if FLAGS.mode == "train":
        result = finetune.finetune(finetune_config_from_flags())
    else:
        if not FLAGS.model_dir:
            raise ConfigError("--model_dir is required")
        distributed.init()
        if FLAGS.mode == "export":
            if not FLAGS.export_dir:
                raise ConfigError("--export_dir is required")
            if os.path.abspath(FLAGS.export_dir) == os.path.abspath(FLAGS.model_dir):
                raise ConfigError(f"--export_dir={FLAGS.export_dir} is the --model_dir it exports from; choose another")
            if FLAGS.quantize:
                check_mode(FLAGS.quantize)
        clf = finetune.load_classifier(FLAGS.model_dir, FLAGS.checkpoint)
        if FLAGS.mode == "predict":
            for label, prob in finetune.predict(clf, _read_texts(FLAGS.input)):
                print(f"{label}\t{prob:.4f}")
            return
        if FLAGS.mode == "export":
            size = weight_bytes(clf.model)
            out = finetune.export_classifier(clf, FLAGS.export_dir, FLAGS.overwrite, FLAGS.quantize, FLAGS.model_dir)
            if FLAGS.quantize:
                print(f"quantized to {FLAGS.quantize}: weights {size / 1e6:.2f} MB -> "
                      f"{weight_bytes(clf.model) / 1e6:.2f} MB")
            print(f"exported {out}")
            return
        result = finetune.evaluate_file(clf, FLAGS.eval_file)
        if distributed.world().is_chief:
            from tfllm.classifier import format_report
            print(format_report(result, clf.classes))
    if distributed.world().is_chief:
        report = result.get("validation", result)
        print(f"accuracy={report['accuracy']:.4f}")
        print(json.dumps(result), flush=True)
        if FLAGS.output_json:
            from tfllm.atomic import write_json
            write_json(FLAGS.output_json, result, sort_keys=False)


if __name__ == "__main__":
    cli.run(main)
