"""Text cleaning before tokenization: `--clean`, one or more of html, ptb and lower.

- `html`, for text scraped from web pages. Review sites, forums and crawls store text with markup
  in it (IMDB's reviews hold `<br />` about four times each). Left in, every `<br />` costs a
  pretrained model several tokens of context and teaches it markup instead of language. It turns
  line-break tags into newlines, drops other tags, decodes the common named entities and
  squeezes runs of spaces. `<` followed by a space or a digit is text, not a tag ("a < b", "<=8"),
  so it is kept. Numeric entities (`&#233;`) are kept as written: RE2 cannot turn a number into a
  character, and they are rare (17 in IMDB's 25,000 training reviews).
- `ptb` undoes Penn Treebank tokenization, which GLUE's SST-2 (and every corpus derived from a
  treebank) is written in: "does n't", "it 's", "-lrb-", "`` a ''", a space before each comma.
  A model pretrained on ordinary text never saw "does n't": WordPiece makes it "does n ' t"
  where pretraining had "doesn ' t", and "-lrb-" is five pieces of noise.
- `lower` lowercases (Unicode), for tasks whose text is lowercased, as SST-2's is.

Steps run in that order. One implementation, in TensorFlow ops (RE2), serves every caller: data
preparation, labelled files for fine-tuning, `--mode=predict`, and the exported SavedModels'
signatures, which clean their input text in-graph so that a served model sees text as it was
trained on.
"""

from __future__ import annotations

import tensorflow as tf

from tfllm.config import clean_steps

_HTML_RULES = (
    (r"(?i)<br\s*/?\s*>|</?p(?:\s[^<>]*)?>", "\n"),
    (r"(?s)<!--.*?-->", " "),
    (r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", " "),
    (r"&nbsp;|&#160;", " "),
    (r"&lt;", "<"),
    (r"&gt;", ">"),
    (r"&quot;", '"'),
    (r"&#0?39;|&apos;", "'"),
    # Last, so that "&amp;lt;" (an escaped entity, as text) becomes "&lt;" and not "<".
    (r"&amp;", "&"),
    (r"[ \t\r\f\v]+", " "),
    (r" ?\n ?", "\n"),
    (r"\n{3,}", "\n\n"),
)

# Contractions join only when followed by a space, punctuation or the end, so that ordinary text
# ("the letter 's' is", "the 're-release'") passes through: a served model sees users' text too.
_PTB_RULES = (
    (r"(?i) (n't|'s|'re|'ve|'ll|'d|'m)([\s.,!?;:)\]}\"]|$)", r"\1\2"),
    (r"(?i)-lrb-", "("),
    (r"(?i)-rrb-", ")"),
    (r"(?i)-lsb-", "["),
    (r"(?i)-rsb-", "]"),
    (r"(?i)-lcb-", "{"),
    (r"(?i)-rcb-", "}"),
    (r"`` ?", '"'),
    (r" ?''", '"'),
    (r" ([.,!?;:%)\]}])", r"\1"),
    (r"([(\[{]) ", r"\1"),
    (r"\$ (\d)", r"$\1"),
)

_RULES = {"html": _HTML_RULES, "ptb": _PTB_RULES}


def clean_strings(strings: tf.Tensor, how: str, strip: bool = True) -> tf.Tensor:
    """Cleans a string tensor of any shape; `how` is a Python string, fixed when a graph is traced.
    `strip=False` keeps whitespace at the ends, for pieces of a longer text."""
    steps = clean_steps(how)
    if not steps:
        return strings
    for step in steps:
        if step == "lower":
            strings = tf.strings.lower(strings, encoding="utf-8")
        for pattern, rewrite in _RULES.get(step, ()):
            strings = tf.strings.regex_replace(strings, pattern, rewrite)
    return tf.strings.strip(strings) if strip else strings


def clean_texts(texts: list[str], how: str, strip: bool = True) -> list[str]:
    """Cleans Python strings through the same ops."""
    if not clean_steps(how) or not texts:
        return list(texts)
    return [t.decode("utf-8") for t in clean_strings(tf.constant(texts), how, strip).numpy()]
