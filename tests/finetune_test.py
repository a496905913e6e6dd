"""Fine-tuning: labelled data, pooling, metrics, and the pretrain -> fine-tune -> predict -> export round trip."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import run, run_many
from finetune_helpers import finetune_args
from tfllm import labelled
from tfllm.classifier import SequencePooling, balanced_class_weights, classification_report

# ---------------------------------------------------------------- labelled data

def test_reads_tsv_csv_jsonl_and_headerless(tmp_path):
    (tmp_path / "a.tsv").write_text('label\tsentence\n1\tit \'s "great"\n0\tbad\n')
    (tmp_path / "a.csv").write_text('text,stars\n"good, really",pos\nmeh,neg\n')
    (tmp_path / "a.jsonl").write_text('{"y": 2, "x": "two"}\n\n{"y": 10, "x": "ten"}\n')
    (tmp_path / "b.tsv").write_text("pos\tfine\nneg\tawful\n")
    tsv = labelled.read_examples(str(tmp_path / "a.tsv"), labelled.Columns())
    assert tsv.texts == ['it \'s "great"', "bad"] and tsv.labels == ["1", "0"]
    csv_ = labelled.read_examples(str(tmp_path / "a.csv"), labelled.Columns("stars", "text"))
    assert csv_.texts == ["good, really", "meh"] and labelled.label_vocabulary(csv_) == ["neg", "pos"]
    js = labelled.read_examples(str(tmp_path / "a.jsonl"), labelled.Columns("y", "x"))
    assert labelled.label_vocabulary(js) == ["2", "10"]  # integers sort numerically
    assert labelled.label_ids(js, ["2", "10"]).tolist() == [0, 1]
    nohead = labelled.read_examples(str(tmp_path / "b.tsv"), labelled.Columns("0", "1", header=False))
    assert nohead.labels == ["pos", "neg"] and nohead.texts == ["fine", "awful"]
    assert labelled.label_vocabulary(tsv, num_classes=3) == ["0", "1", "2"]


@pytest.mark.parametrize("content,cols,message", [
    ("label\tsentence\n1\tok\n0\t  \n", {}, "a.tsv:3: empty text"),
    ("label\ttext\n1\tok\n", {}, "no column 'sentence' in the header"),
    ("label\tsentence\n1\tok\n1\tfine\n", {}, "every example has label '1'"),
    ("", {}, "empty file"),
    ("label\tsentence\n1\tok\n0\tbad\n", {"num_classes": 1}, None),
])
def test_bad_labelled_data(tmp_path, content, cols, message):
    path = tmp_path / "a.tsv"
    path.write_text(content)
    if message is None:  # num_classes=1 with labels outside it
        with pytest.raises(labelled.LabelledDataError, match="outside 0..0"):
            labelled.label_vocabulary(labelled.read_examples(str(path), labelled.Columns()), 1)
        return
    with pytest.raises(labelled.LabelledDataError, match=message.replace("(", r"\(")):
        labelled.label_vocabulary(labelled.read_examples(str(path), labelled.Columns(**cols)))


def test_unknown_validation_label(tmp_path):
    (tmp_path / "v.tsv").write_text("label\tsentence\n0\tok\n2\tnew\n")
    ex = labelled.read_examples(str(tmp_path / "v.tsv"), labelled.Columns())
    with pytest.raises(labelled.LabelledDataError, match=r"label '2' \(example 2\) is not among"):
        labelled.label_ids(ex, ["0", "1"])


def test_batches_are_disjoint_across_ranks_and_deterministic():
    data = np.arange(100, dtype=np.int32)[:, None].repeat(3, 1)
    ranks = [labelled.Batches(data, 5, r, 2, seed=3) for r in range(2)]
    assert ranks[0].steps_per_epoch == 10
    epoch = np.concatenate([b(s)[:, 0] for s in range(10) for b in ranks])
    assert sorted(epoch.tolist()) == list(range(100))  # one epoch sees every example once
    fresh = labelled.Batches(data, 5, 1, 2, seed=3)
    assert np.array_equal(fresh(13), ranks[1](13))  # resuming at step 13 gives the same batch
    with pytest.raises(labelled.LabelledDataError, match="cannot fill one global batch"):
        labelled.Batches(data[:7], 4, 0, 2, seed=0)


# ---------------------------------------------------------------- model pieces and metrics

def test_sequence_pooling_last_mean_and_concat():
    hidden = tf.constant(np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2))
    mask = tf.constant([[True, True, True, False], [True, False, False, False]])
    last = SequencePooling("last")(hidden, mask).numpy()
    assert last.tolist() == [[4.0, 5.0], [8.0, 9.0]]
    mean = SequencePooling("mean")(hidden, mask).numpy()
    assert np.allclose(mean, [[2.0, 3.0], [8.0, 9.0]])
    # The max leaves out padding, here the larger values after each row's last real token.
    falling = tf.constant([[[1.0, -4.0], [3.0, -2.0], [2.0, -3.0], [9.0, 9.0]]] * 2)
    concat = SequencePooling("concat")(falling, mask).numpy()
    assert np.allclose(concat, [[2.0, -3.0, 2.0, -3.0, 3.0, -2.0], [1.0, -4.0, 1.0, -4.0, 1.0, -4.0]])
    clone = SequencePooling.from_config(SequencePooling("mean", name="p").get_config())
    assert clone.mode == "mean" and clone.name == "p"


def test_classification_report_by_hand():
    confusion = np.array([[5, 1], [2, 2]])  # rows: true 0, 1; columns: predicted
    r = classification_report(confusion, loss_sum=6.0, classes=["neg", "pos"])
    assert r["accuracy"] == 0.7 and r["loss"] == 0.6 and r["examples"] == 10
    assert r["per_class"]["neg"]["precision"] == pytest.approx(5 / 7)
    assert r["per_class"]["neg"]["recall"] == pytest.approx(5 / 6)
    assert r["per_class"]["pos"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert balanced_class_weights(np.array([0, 0, 0, 1]), 2).tolist() == pytest.approx([4 / 6, 2.0])


# ---------------------------------------------------------------- end to end (1 rank)

def _npz(model_dir, ckpt=None):
    index = json.loads((model_dir / "checkpoints" / "index.json").read_text())
    name = ckpt or index["latest"]
    with np.load(model_dir / "checkpoints" / name / "variables.npz") as z:
        return {k.split(":", 1)[1]: z[k] for k in z.files}


def test_round_trip_pretrain_finetune_predict_export(trained_model_dir, sst2_slice, tmp_path):
    model_dir = tmp_path / "clf"
    out = run(finetune_args(trained_model_dir, model_dir, sst2_slice, "--freeze_backbone_steps=20",
                            f"--output_json={tmp_path / 'r.json'}"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["step"] == 20 and result["validation"]["examples"] == 120
    assert "confusion (rows: true, columns: predicted)" in out.stdout and "accuracy=" in out.stdout
    record = json.loads((model_dir / "finetune.json").read_text())
    assert record["classes"] == ["0", "1"] and (model_dir / "tokenizer").is_dir()

    # The backbone, frozen for every step, still holds exactly the pretrained weights.
    pretrained = _npz(trained_model_dir)
    tuned = _npz(model_dir)
    backbone = [k for k in pretrained if not k.startswith(("adam_w/", "seed_generator"))]
    assert len(backbone) > 20 and "token_embedding/embeddings" in backbone
    for key in backbone:
        assert np.array_equal(pretrained[key], tuned[key]), key
    assert "classifier_head/kernel" in tuned

    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(model_dir / "tb" / "validation"), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"metrics/accuracy", "loss", "confusion_matrix"} <= set(acc.Tags()["tensors"])

    texts = "a gorgeous , witty , seductive movie .\nthe acting is terrible and the plot is worse\n"
    pred = run(["-m", "pipelines.finetune", "--mode=predict", f"--model_dir={model_dir}"], input_text=texts)
    lines = [line.split("\t") for line in pred.stdout.strip().splitlines()]
    assert len(lines) == 2 and all(label in ("0", "1") and 0.5 <= float(p) <= 1 for label, p in lines)

    export_dir = tmp_path / "export"
    run(["-m", "pipelines.finetune", "--mode=export", f"--model_dir={model_dir}", f"--export_dir={export_dir}"])
    script = (f"import json, sys, tensorflow as tf, tensorflow_text\n"
              f"m = tf.saved_model.load({str(export_dir / 'saved_model')!r})\n"
              f"out = m.signatures['classify'](texts=tf.constant({texts.splitlines()!r}))\n"
              f"assert not any(k.startswith('tfllm') for k in sys.modules)\n"
              f"print(json.dumps([[x.decode() for x in out['label'].numpy()], out['probability'].numpy().tolist(),"
              f" out['probabilities'].numpy().sum(1).round(4).tolist()]))\n")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    labels, probs, sums = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert labels == [label for label, _ in lines] and sums == [1.0, 1.0]
    assert probs == pytest.approx([float(p) for _, p in lines], abs=2e-4)

    # Quantized, and both exports evaluated on the validation data: the float export scores what
    # training's best checkpoint scored; int8 stays within one example and 2% of the loss.
    int8_dir = tmp_path / "export-int8"
    quantized = run(["-m", "pipelines.finetune", "--mode=export", f"--model_dir={model_dir}",
                     f"--export_dir={int8_dir}", "--quantize=int8"])
    assert "quantized to int8: weights" in quantized.stdout
    assert json.loads((int8_dir / "export.json").read_text())["quantization"] == "int8"
    reports = {}
    for name, exported in (("float", export_dir), ("int8", int8_dir)):
        run(["-m", "pipelines.finetune", "--mode=evaluate", f"--model_dir={exported}",
             f"--output_json={tmp_path / name}.json"])
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["float"]["accuracy"] == pytest.approx(result["best_accuracy"], abs=1e-9)
    assert abs(reports["int8"]["accuracy"] - reports["float"]["accuracy"]) <= 1 / 120 + 1e-9
    assert reports["int8"]["loss"] == pytest.approx(reports["float"]["loss"], rel=0.02)
    again = run(["-m", "pipelines.finetune", "--mode=export", f"--model_dir={int8_dir}",
                 f"--export_dir={tmp_path / 'twice'}", "--quantize=int8"], check=False)
    assert again.returncode == 1 and "is already quantized (int8)" in again.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "twice").exists()


def test_sorted_web_reviews_hold_out_test_file_and_cleaning(trained_model_dir, tmp_path):
    """IMDB's shape: gzip JSONL sorted by label, markup in the text, no dev set, a test file."""
    import gzip

    def write(name, n):
        words = ["def", "class", "return", "import", "print", "self", "None", "True"]
        with gzip.open(tmp_path / name, "wt") as f:
            for i in range(n):  # sorted: every neg, then every pos
                label = "neg" if i < n // 2 else "pos"
                text = " ".join(words[(i * 7 + j) % 8] for j in range(30)) + f"<br /><br /><i>{label}</i> x{i}"
                f.write(json.dumps({"label": label, "rating": 1, "text": text}) + "\n")
        return tmp_path / name

    train, test = write("train.jsonl.gz", 160), write("test.jsonl.gz", 40)
    model_dir = tmp_path / "clf"
    args = ["-m", "pipelines.finetune", f"--pretrained_dir={trained_model_dir}", f"--model_dir={model_dir}",
            f"--train_file={train}", "--validation_fraction=0.25", f"--test_file={test}", "--text_column=text",
            "--clean=html", "--truncation=head_tail", "--max_length=48", "--batch_size=8", "--train_steps=10",
            "--eval_every=5", "--warmup_steps=2", "--learning_rate=1e-3", f"--output_json={tmp_path / 'r.json'}"]
    out = run(args)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["validation"]["examples"] == 40 and result["test"]["examples"] == 40
    assert result["test"]["checkpoint_step"] in (5, 10) and "test (" in out.stdout
    assert "note:" not in out.stdout  # html adds to what pretraining did (nothing), leaves nothing out
    saved = json.loads((model_dir / "finetune.json").read_text())["config"]
    assert saved["clean"] == "html" and saved["truncation"] == "head_tail"
    # Without --validation_file, evaluation defaults to the same held-out examples.
    run(["-m", "pipelines.finetune", "--mode=evaluate", f"--model_dir={model_dir}", "--checkpoint=latest",
         f"--output_json={tmp_path / 'e.json'}"])
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["examples"] == 40 and again["accuracy"] == pytest.approx(result["validation"]["accuracy"])
    # Served text is cleaned as training text was: markup changes nothing.
    pred = run(["-m", "pipelines.finetune", "--mode=predict", f"--model_dir={model_dir}"],
               input_text="return self <i>None</i>\nreturn self None\n")
    first, second = pred.stdout.strip().splitlines()[-2:]
    assert first == second


def test_scratch_init_and_resume(trained_model_dir, sst2_slice, tmp_path):
    # Scratch needs the architecture and the tokenizer, not the weights: a dir without checkpoints serves.
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((trained_model_dir / "config.json").read_text())
    config["data"]["clean"] = "html,lower"  # as if pretrained on cleaned, lowercased text
    (bare / "config.json").write_text(json.dumps(config))
    shutil.copytree(trained_model_dir / "tokenizer", bare / "tokenizer")
    model_dir = tmp_path / "scratch"
    out = run(finetune_args(bare, model_dir, sst2_slice, "--init=scratch", "--train_steps=10", "--clean=html"))
    assert "note: the pretraining text was cleaned with --clean=html,lower; --clean=html leaves out lower" in out.stdout
    pretrained, scratch = _npz(trained_model_dir), _npz(model_dir)
    key = next(k for k in pretrained if "token_embedding" in k)
    scratch_key = next(k for k in scratch if "token_embedding" in k)
    assert not np.allclose(pretrained[key], scratch[scratch_key])
    # Rerunning with more steps resumes at step 10.
    out = run(finetune_args(bare, model_dir, sst2_slice, "--init=scratch", "--train_steps=20", "--clean=html"))
    assert "resumed from" in out.stdout and "(step 10)" in out.stdout
    steps = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_starts_from_the_named_pretrained_checkpoint(trained_model_dir, sst2_slice, tmp_path):
    # The backbone stays frozen for the whole run, so the weights it saves are the ones it started from.
    model_dir = tmp_path / "from15"
    run(finetune_args(trained_model_dir, model_dir, sst2_slice, "--pretrained_checkpoint=15", "--train_steps=4",
                      "--freeze_backbone_steps=4", "--eval_every=4", "--log_every=2"))

    def embedding(variables):
        return next(v for k, v in variables.items() if "token_embedding" in k)

    tuned = embedding(_npz(model_dir))
    assert np.array_equal(tuned, embedding(_npz(trained_model_dir, "ckpt-00000015")))
    assert not np.array_equal(tuned, embedding(_npz(trained_model_dir)))
    recorded = json.loads((model_dir / "finetune.json").read_text())["config"]["pretrained_checkpoint"]
    assert recorded == "ckpt-00000015"
    # Resumed with the default (latest), the run keeps its own weights and the record of where they began.
    out = run(finetune_args(trained_model_dir, model_dir, sst2_slice, "--train_steps=6", "--freeze_backbone_steps=6",
                            "--eval_every=6", "--log_every=2"))
    assert "(step 4)" in out.stdout
    assert json.loads((model_dir / "finetune.json").read_text())["config"]["pretrained_checkpoint"] == recorded
    assert np.array_equal(embedding(_npz(model_dir)), tuned)


def test_concat_pooling_trains_bucketed_resumes_and_predicts(trained_model_dir, sst2_slice, tmp_path):
    model_dir = tmp_path / "concat"
    run(finetune_args(trained_model_dir, model_dir, sst2_slice, "--pooling=concat", "--allreduce_buckets=3",
                      "--train_steps=10"))
    assert _npz(model_dir)["classifier_head/kernel"].shape == (3 * 32, 2)  # last, mean and max of width 32
    out = run(finetune_args(trained_model_dir, model_dir, sst2_slice, "--pooling=concat", "--train_steps=20"))
    assert "(step 10)" in out.stdout
    pred = run(["-m", "pipelines.finetune", "--mode=predict", f"--model_dir={model_dir}"],
               input_text="a gorgeous , witty film\nthe plot is worse\n")
    assert [line.split("\t")[0] in ("0", "1") for line in pred.stdout.strip().splitlines()] == [True, True]


def test_auxiliary_lm_loss_is_logged_apart_from_the_classification_loss(trained_model_dir, sst2_slice, tmp_path):
    logged = {}
    for weight in (0.0, 0.5):
        model_dir = tmp_path / f"aux{weight}"
        out = run(finetune_args(trained_model_dir, model_dir, sst2_slice, "--train_steps=10",
                                f"--lm_loss_weight={weight}", "--freeze_backbone_steps=5"))
        logged[weight] = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged[weight]] == [5, 10] and ("lm_loss=" in out.stdout) == bool(weight)
    without, (head_only, full) = logged[0.0], logged[0.5]
    # The head-only steps leave the LM loss out; the classification loss they log is the same.
    assert "aux_lm/lm_loss" not in head_only and head_only["loss"] == pytest.approx(without[0]["loss"], rel=1e-6)
    # Then the LM loss trains the backbone too: the pretrained head predicts the phrases' characters
    # far better than uniform (log 512 = 6.2), and the classification loss moves away from the run without it.
    assert 0 < full["aux_lm/lm_loss"] < 5.0 and full["loss"] != pytest.approx(without[1]["loss"], rel=1e-4)
    assert full["aux_lm/objective"] == pytest.approx(full["loss"] + 0.5 * full["aux_lm/lm_loss"], rel=1e-5)


def test_bad_inputs_are_one_line_errors(trained_model_dir, sst2_slice, tmp_path):
    bad_dev = tmp_path / "dev.tsv"
    bad_dev.write_text("label\tsentence\n0\tfine\n7\tunknown label\n")
    empty = tmp_path / "empty.tsv"
    empty.write_text("label\tsentence\n0\tfine\n1\t\n")
    single = tmp_path / "single.tsv"
    single.write_text("label\tsentence\n1\tgood\n1\tgreat\n")
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text('{"stars": 1, "label": "neg", "text": "bad"}\n{"stars": 5, "text": "good"}\n'
                       '{"stars": 3, "text": "<br /><br />"}\n')
    other_tok = tmp_path / "other_tokenizer"
    shutil.copytree(trained_model_dir, other_tok)
    from tfllm.tokenizers import ByteTokenizer
    shutil.rmtree(other_tok / "tokenizer")
    ByteTokenizer().save(str(other_tok / "tokenizer"))
    cases = [
        ([f"--validation_file={bad_dev}"], "label '7' (example 2) is not among the training labels"),
        ([f"--train_file={empty}"], "empty.tsv:3: empty text"),
        (["--label_column=stars"], "no column 'stars' in the header"),
        ([f"--train_file={single}"], "every example has label '1'"),
        ([f"--pretrained_dir={other_tok}"], "tokenizer has 259 tokens, the model"),
        (["--max_length=65"], "--max_length=65 exceeds the pretrained model's context (64 positions)"),
        ([f"--init_preset={trained_model_dir}"], "--init_preset starts pretraining runs"),
        ([f"--train_file={reviews}", "--text_column=text"], "reviews.jsonl:2: no field 'label' (--label_column)"),
        ([f"--train_file={reviews}", "--text_column=text", "--label_column=stars", "--clean=html"],
         "reviews.jsonl:3: the text is empty after --clean=html"),
        ([f"--test_file={bad_dev}"], "dev.tsv:3: label '7' (example 2) is not among the training labels"),
        (["--validation_fraction=0.1"], "give either --validation_file or --validation_fraction"),
        (["--lm_loss_weight=-0.5"], "--lm_loss_weight=-0.5: must be 0 (off) or positive"),
        (["--pretrained_checkpoint=7"],  # last: nothing of its model dir may be written
         f"--pretrained_checkpoint=7: {trained_model_dir} has no such checkpoint (it has: ckpt-00000015, ckpt-00000030)"),
    ]
    procs = run_many([finetune_args(trained_model_dir, tmp_path / f"m{i}", sst2_slice, *extra)
                      for i, (extra, _) in enumerate(cases)], check=False)
    for i, ((extra, message), proc) in enumerate(zip(cases, procs)):
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], (extra, proc.stderr[-1500:])
        assert not (tmp_path / f"m{i}" / "checkpoints").exists()
    assert not (tmp_path / f"m{len(cases) - 1}").exists()


def test_class_weights_scale_each_examples_loss():
    from tfllm.classifier import make_loss_fn

    logits = tf.constant([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    model = lambda features, training: logits  # noqa: E731  (a fixed "model" for the loss alone)
    rows = tf.constant([[0, 1, 5], [1, 1, 6], [labelled.NO_LABEL, 1, 0]], tf.int32)
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[0, 1], logits=logits[:2]).numpy()
    plain = [float(x) for x in make_loss_fn()(model, rows, False)]
    assert plain == pytest.approx([nll.sum(), 2.0, 2.0])  # the NO_LABEL row counts for nothing
    weighted = [float(x) for x in make_loss_fn(np.array([0.5, 3.0], np.float32))(model, rows, False)]
    assert weighted == pytest.approx([0.5 * nll[0] + 3.0 * nll[1], 2.0, 2.0])


def test_early_stopping_after_validations_without_gain(trained_model_dir, sst2_slice, tmp_path):
    # A learning rate of ~0 leaves the accuracy unchanged, so the second validation brings no gain.
    out = run(finetune_args(trained_model_dir, tmp_path / "es", sst2_slice, "--train_steps=40", "--eval_every=5",
                            "--early_stopping_patience=1", "--learning_rate=1e-12", "--min_learning_rate=0",
                            f"--output_json={tmp_path / 'r.json'}"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["stopped_early"] and result["step"] == 10 and "early stop" in out.stdout
    index = json.loads((tmp_path / "es" / "checkpoints" / "index.json").read_text())
    assert index["best"]["name"] == "ckpt-00000005"  # the first of equal accuracies stays the best
