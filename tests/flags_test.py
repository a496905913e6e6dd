"""tfllm.flags: the one module that defines and reads absl flags, pipelines' own options included."""

import ast
import dataclasses

import pytest
from absl import flags

from conftest import REPO, run
from tfllm.flags import Options, define_options, option, read_options, shared


@dataclasses.dataclass(frozen=True)
class ToyOptions(Options):
    name: str = option("x", "a string")
    count: int = option(2, "an integer")
    ratio: float = option(0.5, "a float")
    on: bool = option(False, "a boolean")
    kind: str = option("a", "an enum", choices=("a", "b"))
    names: list = option(["p", "q"], "comma-separated")
    prompt: list = option([], "one per use of the flag", repeated=True)
    timeout: float = option(0, "a float declared with an int default")
    model_dir: str = shared()


def _parse(*argv):
    values = flags.FlagValues()
    flags.DEFINE_string("model_dir", "", "defined by a shared group", flag_values=values)
    define_options(ToyOptions, values)
    values(["prog", *argv])
    return read_options(ToyOptions, values)


def test_options_are_flags_of_their_defaults_type_and_say_which_were_given():
    opts = _parse("--count=7", "--ratio=0.25", "--on", "--kind=b", "--names=u,v,w", "--prompt=a b", "--prompt=c",
                  "--model_dir=runs/m", "--timeout=2.5")
    assert (opts.name, opts.count, opts.ratio, opts.on, opts.kind) == ("x", 7, 0.25, True, "b")
    assert (opts.names, opts.prompt, opts.model_dir) == (["u", "v", "w"], ["a b", "c"], "runs/m")
    assert opts.timeout == 2.5
    assert opts.given == {"count", "ratio", "on", "kind", "names", "prompt", "model_dir", "timeout"}
    defaults = _parse()
    assert (defaults.names, defaults.prompt, defaults.given) == (["p", "q"], [], frozenset())


@pytest.mark.parametrize("arg", ["--kind=c", "--count=two", "--ratio=half"])
def test_a_value_of_the_wrong_type_or_outside_the_choices_is_refused(arg):
    with pytest.raises(flags.IllegalFlagValueError):
        _parse(arg)


def test_an_option_of_another_type_is_a_programming_error():
    @dataclasses.dataclass(frozen=True)
    class Bad(Options):
        limit: object = option(None, "no flag type")

    @dataclasses.dataclass(frozen=True)
    class Mismatched(Options):
        steps: int = option("10", "a str default for an int")

    for cls in (Bad, Mismatched):
        with pytest.raises(TypeError, match=f"{cls.__name__}.(limit|steps)"):
            define_options(cls, flags.FlagValues())


def test_a_pipelines_help_lists_its_own_options():
    values = flags.FlagValues()
    define_options(ToyOptions, values)
    assert "--count" in values.module_help(__name__) and "--timeout" in values.module_help(__name__)
    proc = run(["-m", "pipelines.evaluate", "--helpshort"], check=False)  # absl exits 1 after help
    assert "--text_file" in proc.stdout and "--text_field" in proc.stdout
    assert "dev.tsv \\\n        --text_field=" in proc.stdout  # the docstring's continued command, as written


def test_pipeline_docstrings_keep_their_command_continuations():
    """--help prints the module docstring: a non-raw one joins `cmd \\` and its next line into one line."""
    pipelines = sorted((REPO / "pipelines").glob("[!_]*.py"))
    joined = [p.name for p in pipelines
              if "\\\n" in p.read_text().split('"""')[1] and "\\\n" not in ast.get_docstring(ast.parse(p.read_text()))]
    assert len(pipelines) >= 9 and joined == []


def _imports_absl_flags(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("absl.flags") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("absl") and (
                node.module.startswith("absl.flags") or any(a.name == "flags" for a in node.names)):
            return True
    return False


def test_only_tfllm_flags_defines_or_reads_absl_flags():
    sources = [*(REPO / "tfllm").rglob("*.py"), *(REPO / "pipelines").glob("*.py")]
    offenders = [str(p.relative_to(REPO)) for p in sources
                 if p != REPO / "tfllm" / "flags.py" and _imports_absl_flags(ast.parse(p.read_text()))]
    assert len(sources) > 20 and offenders == []


def test_submit_starts_without_tensorflow():
    """pipelines.submit renders manifests on a laptop: its options must not pull in the training stack."""
    proc = run(["-c", "import sys, pipelines.submit; print(sorted(m for m in sys.modules "
                      "if m.split('.')[0] in ('tensorflow', 'keras', 'keras_hub')))"])
    assert proc.stdout.strip() == "[]"
