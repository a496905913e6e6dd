"""A small SST-2 slice and the fine-tuning command line, shared by the fine-tuning tests."""

import pytest

from conftest import SHARED

SST2 = SHARED / "data" / "sst2"


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory):
    if not SST2.exists():
        pytest.skip(f"{SST2} not present")
    out = tmp_path_factory.mktemp("sst2")
    train = (SST2 / "train.tsv").read_text().splitlines()
    dev = (SST2 / "dev.tsv").read_text().splitlines()
    (out / "train.tsv").write_text("\n".join(train[:1201]) + "\n")
    (out / "dev.tsv").write_text("\n".join(dev[:121]) + "\n")
    return out


def finetune_args(pretrained, model_dir, data, *extra):
    return ["-m", "pipelines.finetune", "--flagfile=flags/sst2.cfg", f"--pretrained_dir={pretrained}",
            f"--model_dir={model_dir}", f"--train_file={data / 'train.tsv'}", f"--validation_file={data / 'dev.tsv'}",
            "--max_length=48", "--batch_size=16", "--train_steps=20", "--eval_every=10", "--log_every=5",
            "--warmup_steps=2", *extra]
