import pytest

from conftest import run
from tfllm.config import ConfigError
from tfllm.generate import SamplingConfig, generate_ids, generate_text
from tfllm.restore import load_trained_model
from tfllm.tokenizers import EOD_ID

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(trained_model_dir):
    return load_trained_model(str(trained_model_dir))


def test_greedy_is_deterministic_and_batched_prompts_match_single(trained):
    cfg = SamplingConfig(max_new_tokens=12, stop_at_eod=False)
    one = generate_text(trained.model, trained.tokenizer, ["def f"], cfg)
    batch = generate_text(trained.model, trained.tokenizer, ["def f", "import os\n", "x"], cfg)
    assert batch[0] == one[0] and len(batch) == 3
    assert generate_text(trained.model, trained.tokenizer, ["def f"], cfg) == one
    assert all(len(trained.tokenizer.encode(t)) <= 12 for t in batch)


def test_prompts_are_cleaned_as_the_training_text_was(trained, monkeypatch):
    import tfllm.generate

    seen = []
    monkeypatch.setattr(tfllm.generate, "generate_ids", lambda model, ids, cfg: seen.append(ids) or [[] for _ in ids])
    tok = trained.tokenizer
    assert generate_text(trained.model, tok, ["DEF F", "Import OS "], SamplingConfig(), clean="lower") == ["", ""]
    assert seen == [[tok.encode("def f"), tok.encode("import os ")]]  # lowercased, the trailing space kept


@pytest.mark.parametrize("strategy", ["top_k", "top_p", "random"])
def test_sampling_is_reproducible_with_a_seed(trained, strategy):
    cfg = SamplingConfig(strategy=strategy, max_new_tokens=16, temperature=1.5, top_k=20, top_p=0.95, seed=3,
                         stop_at_eod=False)
    a = generate_ids(trained.model, [trained.tokenizer.encode("def ")] * 4, cfg)
    b = generate_ids(trained.model, [trained.tokenizer.encode("def ")] * 4, cfg)
    assert a == b and all(len(r) == 16 for r in a)
    assert len({tuple(r) for r in a}) > 1  # rows of a batch sample independently


def test_stops_at_end_of_document(trained):
    cfg = SamplingConfig(strategy="random", max_new_tokens=40, temperature=50.0, seed=1, stop_at_eod=True)
    rows = generate_ids(trained.model, [trained.tokenizer.encode("a")] * 16, cfg)
    assert all(EOD_ID not in r for r in rows)
    assert any(len(r) < 40 for r in rows)  # at temperature 50 some row draws <eod> early


def test_bad_requests(trained):
    with pytest.raises(ConfigError, match="exceeds the model's context of 64"):
        generate_ids(trained.model, [[5] * 60], SamplingConfig(max_new_tokens=10))
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate_text(trained.model, trained.tokenizer, [""], SamplingConfig())
    with pytest.raises(ConfigError, match="--max_new_tokens=0"):
        SamplingConfig(max_new_tokens=0).validate()
    with pytest.raises(ConfigError, match="--top_p=1.5"):
        SamplingConfig(strategy="top_p", top_p=1.5).validate()


def test_generate_pipeline_prompts_file_and_errors(trained_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f\n\nclass C\n")
    proc = run(["-m", "pipelines.generate", f"--model_dir={trained_model_dir}", f"--prompts_file={prompts}",
                "--max_new_tokens=8"])
    outputs = proc.stdout.strip().split("\n" + "-" * 40 + "\n")
    assert len(outputs) == 2 and outputs[0].startswith("def f") and outputs[1].startswith("class C")
    proc = run(["-m", "pipelines.generate", f"--model_dir={trained_model_dir}", "--prompt=" + "x" * 80], check=False)
    assert proc.returncode == 1 and "exceeds the model's context" in proc.stderr.strip().splitlines()[-1]
