import json
import textwrap

import pytest

from conftest import run

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
    run(["-m", "pipelines.export", f"--model_dir={trained_model_dir}", f"--output_dir={out}"])
    return out


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
