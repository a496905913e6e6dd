"""Bad input on the command line: one `error:` line, exit status 1, earlier outputs untouched."""

import pytest

from conftest import run


def prepare(*args):
    return run(["-m", "pipelines.prepare_data", *args], check=False)


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "text.txt").write_text("hello world, this is a small corpus. " * 200)
    proc = prepare(f"--corpus={tmp / 'text.txt'}", f"--data_dir={tmp / 'data'}", "--split=tail", "--seq_len=16",
                   "--num_shards=2")
    assert proc.returncode == 0, proc.stderr
    return tmp


@pytest.mark.parametrize("args,message", [
    (["--corpus={tmp}/missing.txt"], "missing.txt: no such file or directory"),
    (["--corpus={tmp}/empty.txt"], "the corpus is empty"),
    (["--corpus={tmp}/bad.txt"], "bad.txt: invalid UTF-8 at byte offset 3"),
    (["--corpus={tmp}/text.txt", "--num_shards=4000"], "--num_shards=4000: more shards than the"),
    (["--corpus={tmp}/text.txt", "--tokenizer=sentencepiece_bpe", "--vocab_size=3000"], "--vocab_size=3000"),
    (["--corpus={tmp}/text.txt", "--seq_len=1"], "--seq_len=1: must be at least 2"),
    (["--corpus={tmp}/text.txt", "--val_fraction=1.5"], "--val_fraction=1.5"),
])
def test_bad_input_is_one_line_and_exit_1(good_data, args, message):
    tmp = good_data
    (tmp / "empty.txt").write_text("")
    (tmp / "bad.txt").write_bytes(b"abc\xffdef")
    proc = prepare(f"--data_dir={tmp / 'new'}", "--split=tail", "--seq_len=16", *[a.format(tmp=tmp) for a in args])
    assert proc.returncode == 1
    assert last_line(proc).startswith("error: ") and message in last_line(proc)
    assert "Traceback" not in proc.stderr
    assert not (tmp / "new").exists()


def test_existing_output_is_refused_and_kept(good_data):
    before = (good_data / "data" / "manifest.json").read_bytes()
    proc = prepare(f"--corpus={good_data / 'text.txt'}", f"--data_dir={good_data / 'data'}", "--split=tail")
    assert proc.returncode == 1 and "--overwrite" in last_line(proc)
    assert (good_data / "data" / "manifest.json").read_bytes() == before


def test_unknown_enum_value_and_stray_arguments_exit_nonzero(good_data):
    proc = prepare("--tokenizer=bogus", f"--data_dir={good_data / 'x'}")
    assert proc.returncode != 0 and "tokenizer" in proc.stderr
    proc = prepare("stray", f"--data_dir={good_data / 'x'}")
    assert proc.returncode != 0 and "unexpected arguments: stray" in proc.stderr


def test_generate_bad_inputs(tmp_path):
    proc = run(["-m", "pipelines.generate", f"--model_dir={tmp_path / 'none'}", "--prompt=x"], check=False)
    assert proc.returncode == 1 and "no such directory" in last_line(proc)
    proc = run(["-m", "pipelines.generate", f"--model_dir={tmp_path}", "--prompt=x", "--max_new_tokens=0"], check=False)
    assert proc.returncode == 1 and "--max_new_tokens=0" in last_line(proc)
    proc = run(["-m", "pipelines.generate", f"--model_dir={tmp_path}", "--prompt=x"], check=False)
    assert proc.returncode == 1 and "no config.json" in last_line(proc)
