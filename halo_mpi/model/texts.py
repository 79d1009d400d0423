"""Real English text that ships with Python (pydoc_data.topics), for calibration and evaluation.

The two topic sets are disjoint, so that what a predictor or a static importance learned on one
is judged on text it never saw. `execmodel` is in the evaluation set (DESIGN.md: perplexity 13.0
on its first 1024 tokens).
"""
from __future__ import annotations

import os

from ..errors import HaloError

CALIBRATION_TOPICS = (
    "assignment", "attribute-access", "augassign", "binary", "calls", "class", "comparisons",
    "compound", "context-managers", "customization", "dict", "dynamic-features", "exceptions",
    "for", "formatstrings", "import", "lambda", "naming", "numeric-types", "sequence-types",
    "specialnames", "string-methods", "typesmapping", "typesseq", "with",
)
EVALUATION_TOPICS = (
    "execmodel", "function", "if", "integers", "lists", "objects", "raise", "return", "try",
    "types", "while", "yield", "strings", "slicings", "truth",
)


def topics_text(names) -> str:
    import pydoc_data.topics as topics
    missing = [n for n in names if n not in topics.topics]
    if missing:
        raise HaloError(f"this Python's pydoc_data.topics lacks {', '.join(missing)}")
    return "\n\n".join(topics.topics[n] for n in names)


def calibration_text() -> str:
    return topics_text(CALIBRATION_TOPICS)


def evaluation_text() -> str:
    return topics_text(EVALUATION_TOPICS)


def read_text(path: str) -> str:
    """A text file, or every .txt/.md file of a folder (sorted), concatenated."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith((".txt", ".md")))
        if not files:
            raise HaloError(f"--text folder {path} holds no .txt or .md file")
        return "\n\n".join(read_text(f) for f in files)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise HaloError(f"cannot read --text {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise HaloError(f"--text {path} is not UTF-8 text (byte {e.start}); convert it, e.g. "
                        f"iconv -t UTF-8") from None
    if not text.strip():
        raise HaloError(f"--text {path} holds no text")
    return text
