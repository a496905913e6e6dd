import json

import pytest

from conftest import run

pytestmark = pytest.mark.slow


def evaluate(model_dir, out, launcher="none", *extra):
    run(["-m", "pipelines.evaluate", f"--model_dir={model_dir}", f"--output_json={out}", "--eval_batch_size=5",
         *extra], launcher=launcher)
    return json.loads(out.read_text())


@pytest.mark.parametrize("extra", [[], ["--split=train", "--max_batches=0"]])
def test_one_and_two_ranks_give_identical_numbers(trained_model_dir, tmp_path, extra):
    one = evaluate(trained_model_dir, tmp_path / "one.json", "none", *extra)
    two = evaluate(trained_model_dir, tmp_path / "two.json", "gloo", *extra)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert one["tokens"] == two["tokens"] > 0
    assert abs(one["loss"] - two["loss"]) <= 1e-9 * abs(one["loss"])
    assert (trained_model_dir / "tb" / "eval").exists()


def test_raw_text_file_with_the_models_tokenizer(trained_model_dir, tmp_path):
    code = "def unseen_function(argument): return argument * 2; " * 20
    text, table = tmp_path / "unseen.txt", tmp_path / "unseen.tsv"
    text.write_text(code)
    table.write_text(f"id\tcode\n7\t{code}\n")  # the same document as a .tsv row, read by --text_field
    one = evaluate(trained_model_dir, tmp_path / "t1.json", "none", f"--text_file={text}")
    two = evaluate(trained_model_dir, tmp_path / "t2.json", "mpi", f"--text_file={text}")
    row = evaluate(trained_model_dir, tmp_path / "t3.json", "none", f"--text_file={table}",
                   "--text_field=sentence,code")  # the first name the file has
    # every character and the closing <eod> are targets; the first character is context only
    assert one["tokens"] == two["tokens"] == row["tokens"] == len(code)
    assert abs(one["loss"] - two["loss"]) <= 1e-9 * abs(one["loss"])
    assert abs(row["loss"] - one["loss"]) <= 1e-9 * abs(one["loss"])
    assert one["split"] == "text"
    # the model's data was a .txt corpus: its .tsv column is the default, `text`, which this file lacks
    proc = run(["-m", "pipelines.evaluate", f"--model_dir={trained_model_dir}", f"--output_json={tmp_path / 't4'}",
                f"--text_file={table}"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {table}: no column 'text' (columns: id, code; "
                                                    "see --text_field)")


def test_existing_output_json_is_refused(trained_model_dir, tmp_path):
    out = tmp_path / "x.json"
    out.write_text("{}")
    proc = run(["-m", "pipelines.evaluate", f"--model_dir={trained_model_dir}", f"--output_json={out}"], check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr.strip().splitlines()[-1]
    assert out.read_text() == "{}"
    proc = run(["-m", "pipelines.evaluate", f"--model_dir={trained_model_dir}", f"--output_json={out}",
                "--text_field=sentence"], check=False)
    assert proc.returncode == 1 and "pass --text_file too" in proc.stderr.strip().splitlines()[-1]
    proc = run(["-m", "pipelines.evaluate", f"--model_dir={trained_model_dir}", f"--output_json={out}",
                f"--text_file={out}", "--text_field=sentence,"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: --text_field='sentence,': a field or column name (no tab), or several joined by commas")
    assert out.read_text() == "{}"
