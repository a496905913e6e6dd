"""Text cleaning (--clean=html,ptb,lower): the rules, and preparation of a web-text corpus with it."""

import json

import pytest

from conftest import run
from tfllm.config import ConfigError, DataConfig, canonical_clean
from tfllm.data import cleaning
from tfllm.data.prepare import prepare
from tfllm.tokenizers import load_tokenizer


def test_html_rules():
    raw = ('Great.<br /><br />Really   <i>great</i>&nbsp;&amp; fun: 5 &lt; 6, "&quot;ok&quot;", it&#39;s<BR>'
           'a < b, rated <=8.<br /> &amp;lt;b&amp;gt; <!-- note --> <http://x.org/?a=1> &#233;')
    assert cleaning.clean_texts([raw], "html") == [
        'Great.\n\nReally great & fun: 5 < 6, ""ok"", it\'s\na < b, rated <=8.\n&lt;b&gt; <http://x.org/?a=1> &#233;']
    assert cleaning.clean_texts(["  <p>x</p>  "], "html") == ["x"]
    assert cleaning.clean_texts(["<br /> <b></b>"], "html") == [""]
    assert cleaning.clean_texts([raw], "none") == [raw]
    with pytest.raises(ConfigError, match="--clean='xml'"):
        cleaning.clean_texts(["x"], "xml")


def test_ptb_rules_undo_treebank_tokenization_and_leave_ordinary_text_alone():
    """SST-2's text reads as ordinary text again, which is what a model pretrained on reviews saw;
    a served classifier cleans its users' text the same way, so that text must pass unharmed."""
    sst2 = "it does n't work , and it 's -lrb- sort of -rrb- `` bad '' ; ca n't , wo n't , $ 5 -LSB- sic -RSB- ."
    assert cleaning.clean_texts([sst2], "ptb") == ['it doesn\'t work, and it\'s (sort of) "bad"; can\'t, won\'t, $5 [sic].']
    assert cleaning.clean_texts(["that 's it", "i 'm done !"], "ptb") == ["that's it", "i'm done!"]
    ordinary = ["rock 'n' roll in the '90s", "the letter 's' is", "the 're-release' of 10$ or more", "it's fine."]
    assert cleaning.clean_texts(ordinary, "ptb") == ordinary


def test_steps_run_in_one_order_and_bad_lists_are_refused():
    assert cleaning.clean_texts(["The <b>Film</b> Does N'T Work"], "lower,html,ptb") == ["the film doesn't work"]
    assert cleaning.clean_texts(["Ünïcode ÉTÉ"], "lower") == ["ünïcode été"]
    assert canonical_clean("lower,ptb,html") == "html,ptb,lower" and canonical_clean("none") == "none"
    for bad in ("html,html", "html,", "none,html", "", "HTML"):
        with pytest.raises(ConfigError, match=f"--clean='{bad}': expected none, or one or more of html, ptb, lower"):
            cleaning.clean_texts(["x"], bad)


def _reviews(path, texts):
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def test_prepare_cleans_the_corpus_and_its_tokenizer_sample(tmp_path):
    corpus = _reviews(tmp_path / "reviews.jsonl", [f"Review {i}.<br /><br />A <i>fine</i> film." for i in range(40)])
    cfg = dict(corpus=[str(corpus)], tokenizer="char", vocab_size=0, seq_len=16, val_fraction=0.1, num_shards=1)
    prepare(DataConfig(**cfg), str(tmp_path / "raw"))
    prepare(DataConfig(**cfg, clean="html"), str(tmp_path / "clean"))
    raw, cleaned = (load_tokenizer(str(tmp_path / name / "tokenizer")) for name in ("raw", "clean"))
    assert {"<", ">", "/"} <= set(raw.chars) and not {"<", ">", "/"} & set(cleaned.chars)
    assert "\n" in cleaned.chars  # <br /> became a line break
    manifest = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert manifest["config"]["clean"] == "html"


def test_markup_only_document_is_a_one_line_error(tmp_path):
    corpus = _reviews(tmp_path / "reviews.jsonl", ["A fine film.", "Dull.", "<br /><br /><hr>", "Fine."])
    out = tmp_path / "data"
    proc = run(["-m", "pipelines.prepare_data", f"--corpus={corpus}", f"--data_dir={out}", "--tokenizer=char",
                "--vocab_size=0", "--seq_len=8", "--num_shards=1", "--clean=html"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-1500:]
    assert "reviews.jsonl:3: the text is empty after --clean=html" in errors[0]
    assert not out.exists()
