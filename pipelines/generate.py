"""Generate text from a trained model dir with its own tokenizer (key/value-cached sampling).

Single process (generation needs no collectives):
    python -m pipelines.generate --model_dir=runs/tiny --prompt="def " --max_new_tokens=200
    python -m pipelines.generate --model_dir=runs/tiny --prompts_file=prompts.txt --strategy=top_p --top_p=0.9 \
        --temperature=0.8 --sampling_seed=1 --checkpoint=best
Under a launcher only rank 0 generates and prints (the others exit at once):
    horovodrun -np 2 -H localhost:2 --gloo python -m pipelines.generate --model_dir=runs/tiny --prompt="def "
    mpirun -np 2 python -m pipelines.generate --model_dir=runs/tiny --prompt="def "
Prompts come from --prompt (repeatable) or --prompts_file (one per line); each continuation is
printed after its prompt, separated by a line of dashes.
"""

from absl import flags

from tfllm import cli, distributed
from tfllm.config import ConfigError
from tfllm.flags import define_sampling_flags, sampling_config_from_flags, unquote
from tfllm.generate import generate_text
from tfllm.restore import load_trained_model

define_sampling_flags()
flags.DEFINE_string("model_dir", "", "Model dir written by pipelines.pretrain, or an export of one.")
flags.DEFINE_string("checkpoint", "latest", "latest, best, a step number or a checkpoint directory.")
flags.DEFINE_multi_string("prompt", [], 'A prompt (repeat the flag for a batch); in a flagfile, "quoted" keeps edge spaces.')
flags.DEFINE_string("prompts_file", "", "A file with one prompt per line.")
FLAGS = flags.FLAGS


def read_prompts() -> list[str]:
    prompts = [unquote(p) for p in FLAGS.prompt]
    if FLAGS.prompts_file:
        try:
            with open(FLAGS.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"--prompts_file={FLAGS.prompts_file}: no such file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts_file={FLAGS.prompts_file}: invalid UTF-8 at byte {e.start}") from None
    if not prompts:
        raise ConfigError("no prompt: pass --prompt=TEXT or --prompts_file=FILE")
    for i, p in enumerate(prompts, 1):
        if not p:
            raise ConfigError(f"prompt {i} is empty")
    return prompts


def main(argv):
    if not distributed.init(pin_gpu=True).is_chief:
        return
    sampling = sampling_config_from_flags()
    sampling.validate()
    prompts = read_prompts()
    trained = load_trained_model(FLAGS.model_dir, FLAGS.checkpoint)
    outputs = generate_text(trained.model, trained.tokenizer, prompts, sampling, trained.config.data.clean)
    for i, (prompt, text) in enumerate(zip(prompts, outputs)):
        if i:
            print("-" * 40)
        print(prompt + text, flush=True)


if __name__ == "__main__":
    cli.run(main)
