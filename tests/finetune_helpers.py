"""The fine-tuning command line shared by the fine-tuning tests (data: conftest's sst2_slice)."""


def finetune_args(pretrained, model_dir, data, *extra):
    return ["-m", "pipelines.finetune", "--flagfile=flags/sst2.cfg", f"--pretrained_dir={pretrained}",
            f"--model_dir={model_dir}", f"--train_file={data / 'train.tsv'}", f"--validation_file={data / 'dev.tsv'}",
            "--max_length=48", "--batch_size=16", "--train_steps=20", "--eval_every=10", "--log_every=5",
            "--warmup_steps=2", *extra]
