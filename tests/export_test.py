import json
import re
import textwrap

import pytest

from conftest import BIN, REPO, run

pytestmark = pytest.mark.slow

FRESH = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    import tensorflow_text  # noqa: F401
    m = tf.saved_model.load(sys.argv[1])
    g = m.signatures["generate"](prompts=tf.constant(["def ", "import "]), max_new_tokens=tf.constant(20))
    s = m.signatures["score"](texts=tf.constant(["def f(x):", "def f(x):\\n    return x"]))
    print(json.dumps({"text": [t.decode() for t in g["text"].numpy()],
                      "log_prob": s["log_prob"].numpy().tolist(), "tokens": s["tokens"].numpy().tolist(),
                      "imported": sorted({m.split(".")[0] for m in sys.modules} & {"tfllm", "keras_hub", "keras_nlp"})}))
""")


@pytest.fixture(scope="module")
def exported(trained_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    run(["-m", "pipelines.export", f"--model_dir={trained_model_dir}", f"--output_dir={out}",
         f"--serving_dir={out.parent / 'serving' / 'tfllm'}"])
    return out


def test_serving_dir_holds_a_version_that_answers_the_readmes_requests(exported, trained_model_dir):
    """The README's TensorFlow Serving request bodies, fed as the server feeds them (columnar
    inputs, each converted to its signature's dtype), to the version that --serving_dir wrote."""
    import subprocess

    import tensorflow as tf

    serving = exported.parent / "serving" / "tfllm"
    (version,) = list(serving.iterdir())
    assert version.name == "30" and (version / "saved_model.pb").exists()  # the fixture's 30 training steps
    loaded = tf.saved_model.load(str(version))
    requests = [json.loads(line) for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith('{"signature_name": ')]
    answered = {}
    for request in requests:
        if request["signature_name"] not in loaded.signatures:  # classify: a classifier's export
            continue
        signature = loaded.signatures[request["signature_name"]]
        specs = signature.structured_input_signature[1]
        assert set(request["inputs"]) == set(specs)
        outputs = signature(**{k: tf.constant(v, specs[k].dtype) for k, v in request["inputs"].items()})
        answered[request["signature_name"]] = {k: v.shape.as_list() for k, v in outputs.items()}
    assert answered == {"generate": {"text": [2]}, "score": {"log_prob": [2], "tokens": [2]}}
    shown = subprocess.run([str(BIN / "saved_model_cli"), "show", "--dir", str(version), "--tag_set", "serve",
                            "--signature_def", "generate"], capture_output=True, text=True, check=True).stdout
    assert re.search(r"inputs\['prompts'\] tensor_info:\s+dtype: DT_STRING", shown)
    assert re.search(r"inputs\['max_new_tokens'\] tensor_info:\s+dtype: DT_INT32\s+shape: \(\)", shown)
    # A version that exists is not replaced without --overwrite, and nothing else is written.
    proc = run(["-m", "pipelines.export", f"--model_dir={trained_model_dir}", f"--output_dir={exported}-again",
                f"--serving_dir={serving}"], check=False)
    assert proc.returncode == 1 and f"{version}: output path exists" in proc.stderr.strip().splitlines()[-1]
    assert not (exported.parent / "tiny-again").exists() and list(serving.iterdir()) == [version]


def test_saved_model_serves_in_a_fresh_process_like_the_generate_pipeline(exported, trained_model_dir, tmp_path):
    assert (exported / "saved_model" / "saved_model.pb").exists() and (exported / "model.keras").exists()
    script = tmp_path / "serve.py"
    script.write_text(FRESH)
    served = json.loads(run([str(script), str(exported / "saved_model")]).stdout.strip().splitlines()[-1])
    assert served["imported"] == []
    for prompt, text in zip(["def ", "import "], served["text"]):
        proc = run(["-m", "pipelines.generate", f"--model_dir={trained_model_dir}", f"--prompt={prompt}",
                    "--max_new_tokens=20"])
        assert proc.stdout.rstrip("\n") == prompt + text
    assert served["tokens"][0] == len("def f(x):")  # character tokenizer
    assert served["log_prob"][1] < served["log_prob"][0] < 0  # longer text, lower total log-probability


def test_a_cleaned_models_prompts_are_cleaned_alike_by_the_export_and_the_generate_pipeline(trained_model_dir,
                                                                                           tmp_path):
    """A model trained on html-cleaned text (its config.json says so) is prompted with cleaned text,
    in the exported signature and in pipelines.generate (which prints the prompt as given): four
    `<br />` become four newlines, which is what keeps 20 + 40 new tokens within the 64 of context."""
    import shutil

    cleaned_dir = tmp_path / "cleaned"
    shutil.copytree(trained_model_dir, cleaned_dir)
    config = json.loads((cleaned_dir / "config.json").read_text())
    config["data"]["clean"] = "html"
    (cleaned_dir / "config.json").write_text(json.dumps(config))
    run(["-m", "pipelines.export", f"--model_dir={cleaned_dir}", f"--output_dir={tmp_path / 'export'}"])
    prompt = "x = 1<br />" * 4
    script = tmp_path / "serve.py"
    script.write_text(FRESH.replace('["def ", "import "]', f'[{prompt!r}]').replace("tf.constant(20)", "tf.constant(40)"))
    served = json.loads(run([str(script), str(tmp_path / "export" / "saved_model")]).stdout.strip().splitlines()[-1])
    as_trained = run(["-m", "pipelines.generate", f"--model_dir={trained_model_dir}",
                      f"--prompt={prompt.replace('<br />', chr(10))}", "--max_new_tokens=40"]).stdout
    cleaned = run(["-m", "pipelines.generate", f"--model_dir={cleaned_dir}", f"--prompt={prompt}",
                   "--max_new_tokens=40"]).stdout
    assert as_trained == "x = 1\n" * 4 + served["text"][0] + "\n" and cleaned == prompt + served["text"][0] + "\n"


def test_score_matches_the_training_loss(exported, trained_model_dir):
    """score() of a text equals minus the summed next-token loss computed by tfllm itself."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from tfllm.models import lm_loss_sums
    from tfllm.restore import load_trained_model
    from tfllm.tokenizers import EOD_ID

    trained = load_trained_model(str(trained_model_dir))
    text = "def add(a, b):\n    return a + b\n"
    ids = [EOD_ID] + trained.tokenizer.encode(text)
    loss_sum, _, tokens = lm_loss_sums(trained.model, tf.constant([ids]), training=False)
    served = tf.saved_model.load(str(exported / "saved_model")).signatures["score"](texts=tf.constant([text]))
    assert int(served["tokens"][0]) == int(tokens) == len(ids) - 1
    assert abs(float(served["log_prob"][0]) + float(loss_sum)) < 1e-3


def test_existing_output_is_refused(exported, trained_model_dir):
    before = sorted(p.name for p in exported.iterdir())
    proc = run(["-m", "pipelines.export", f"--model_dir={trained_model_dir}", f"--output_dir={exported}"], check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in exported.iterdir()) == before


def test_pretraining_starts_from_the_exported_preset_and_refuses_conflicting_flags(exported, trained_model_dir, tmp_path):
    """A new run takes the preset's architecture, weights and tokenizer; resuming needs the preset no more."""
    import shutil

    from pretrain_helpers import logged_losses, pretrain

    assert sorted(p.name for p in (exported / "preset").iterdir()) == [
        "config.json", "metadata.json", "model.weights.h5", "task.json", "tokenizer"]
    preset_dir = tmp_path / "preset"
    shutil.copytree(exported / "preset", preset_dir)
    scratch = logged_losses(trained_model_dir)
    warm_dir = tmp_path / "warm"
    # --num_layers=2 on the command line agrees with the preset; --hidden_dim=32 comes from the test flags.
    proc = pretrain(warm_dir, f"--init_preset={preset_dir}", "--num_layers=2", "--train_steps=3",
                    "--eval_every=0", "--sample_prompt=", data_dir=tmp_path / "data")
    assert f"initialised from keras-hub preset {preset_dir}" in proc.stdout + proc.stderr
    warm = logged_losses(warm_dir)
    assert warm[1] < scratch[1] - 0.5  # starts where the exported model ended, not from scratch
    assert abs(warm[1] - scratch[max(scratch)]) < 0.5
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["config"]["tokenizer_dir"] == f"{preset_dir}/tokenizer"
    assert json.loads((warm_dir / "config.json").read_text())["train"]["init_preset"] == str(preset_dir)

    conflict = pretrain(tmp_path / "conflict", f"--init_preset={preset_dir}", "--num_layers=3",
                        check=False, data_dir=tmp_path / "data")
    assert conflict.returncode == 1
    assert conflict.stderr.strip().splitlines()[-1] == (
        f"error: --init_preset={preset_dir} disagrees with --num_layers=3 (preset: 2); drop those flags")
    assert not (tmp_path / "conflict").exists()

    shutil.rmtree(preset_dir)  # e.g. a rescheduled pod whose preset volume is gone: the checkpoint suffices
    resumed = pretrain(warm_dir, f"--init_preset={preset_dir}", "--train_steps=5", "--eval_every=0",
                       "--sample_prompt=", data_dir=tmp_path / "data")
    assert "resumed from step 3" in resumed.stdout + resumed.stderr
    assert "initialised from" not in resumed.stdout + resumed.stderr
    assert sorted(logged_losses(warm_dir)) == [1, 2, 3, 4, 5]
    fresh = pretrain(tmp_path / "fresh", f"--init_preset={preset_dir}", check=False, data_dir=tmp_path / "data")
    assert fresh.returncode == 1
    assert fresh.stderr.strip().splitlines()[-1] == f"error: --init_preset={preset_dir}: no such directory"


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model of width 64 with a 512-token BPE vocabulary, and its float export (at width 32
    and 99 characters, the float position embeddings, norms and biases are a third of the
    weights; in any real model they are a few percent)."""
    from pretrain_helpers import pretrain

    tmp = tmp_path_factory.mktemp("wide")
    pretrain(tmp / "model", "--hidden_dim=64", "--tokenizer=sentencepiece_bpe", "--vocab_size=512", "--train_steps=20", "--eval_every=0", "--checkpoint_every=20",
             "--sample_prompt=", data_dir=tmp / "data")
    run(["-m", "pipelines.export", f"--model_dir={tmp / 'model'}", f"--output_dir={tmp / 'float'}"])
    return tmp / "model", tmp / "float"


@pytest.fixture(scope="module")
def quantized(wide, tmp_path_factory):
    """The float export, quantized to int8 (an export dir is a valid --model_dir)."""
    out = tmp_path_factory.mktemp("export-int8") / "tiny-int8"
    proc = run(["-m", "pipelines.export", f"--model_dir={wide[1]}", f"--output_dir={out}", "--quantize=int8"])
    assert "quantized to int8: weights " in proc.stdout
    return out


def _weights_bytes(saved_model) -> int:
    return sum(f.stat().st_size for f in (saved_model / "variables").iterdir())


def test_int8_export_serves_in_a_fresh_process_like_the_float_one_and_is_3x_smaller(wide, quantized, tmp_path):
    exported = wide[1]
    script = tmp_path / "serve.py"
    script.write_text(FRESH)
    served = {name: json.loads(run([str(script), str(d / "saved_model")]).stdout.strip().splitlines()[-1])
              for name, d in (("float", exported), ("int8", quantized))}
    assert served["int8"]["imported"] == []
    # greedy continuations of short prompts are the same text
    assert [t[:12] for t in served["int8"]["text"]] == [t[:12] for t in served["float"]["text"]], served
    assert served["int8"]["tokens"] == served["float"]["tokens"]
    assert served["int8"]["log_prob"] == pytest.approx(served["float"]["log_prob"], rel=0.01)
    ratio = _weights_bytes(exported / "saved_model") / _weights_bytes(quantized / "saved_model")
    assert ratio >= 3.0, ratio
    record = json.loads((quantized / "export.json").read_text())
    assert record["quantization"] == "int8" and json.loads((exported / "export.json").read_text())["quantization"] is None
    assert record["step"] == 20


def test_int8_perplexity_is_within_one_percent_of_the_float_model(wide, quantized, tmp_path):
    results = {}
    for name, model_dir in (("float", wide[0]), ("int8", quantized)):
        run(["-m", "pipelines.evaluate", f"--model_dir={model_dir}", "--max_batches=4",
             f"--output_json={tmp_path / name}.json"])
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["int8"]["tokens"] == results["float"]["tokens"] > 0
    assert abs(results["int8"]["perplexity"] / results["float"]["perplexity"] - 1) < 0.01, results


def test_a_quantized_export_is_not_quantized_again(quantized, tmp_path):
    proc = run(["-m", "pipelines.export", f"--model_dir={quantized}", f"--output_dir={tmp_path / 'again'}",
                "--quantize=int8"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {quantized} is already quantized (int8); export from the float model dir it came from")
    assert not (tmp_path / "again").exists()
    from pretrain_helpers import pretrain
    proc = pretrain(tmp_path / "m", f"--init_preset={quantized / 'preset'}", check=False, data_dir=tmp_path / "d")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --init_preset={quantized / 'preset'}: a quantized preset (pipelines.export --quantize) serves; "
        f"training starts from a float one")


def test_bad_quantize_modes_and_checkpoints_of_an_export_are_one_error_line(exported, trained_model_dir, tmp_path):
    proc = run(["-m", "pipelines.export", f"--model_dir={trained_model_dir}", f"--output_dir={tmp_path / 'q'}",
                "--quantize=fp8"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: --quantize=fp8: expected one of int8, int4"
    assert not (tmp_path / "q").exists()
    proc = run(["-m", "pipelines.evaluate", f"--model_dir={exported}", "--checkpoint=best",
                f"--output_json={tmp_path / 'e.json'}"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {exported} is an export, which holds one set of weights: --checkpoint=best does not apply")
    proc = run(["-m", "pipelines.evaluate", f"--model_dir={exported}"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: {exported} is an export: pass --output_json=FILE for the results"]
    assert not (exported / "eval").exists() and not (exported / "tb").exists()
