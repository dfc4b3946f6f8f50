"""The embedded default corpus: Python language reference topics shipped with CPython itself.

`pydoc_data.topics` is part of every CPython install, so the demo needs no download. The topic
list is sized so that ingesting it with the default model takes about a minute on 2 CPU cores.
"""
from __future__ import annotations

from pathlib import Path

DEMO_TOPICS = (
    "with", "for", "while", "if", "try", "function", "class", "import", "lambda", "assert", "return", "yield",
    "global", "nonlocal", "del", "pass", "raise", "break", "continue", "exceptions", "assignment", "booleans",
    "comparisons", "context-managers",
)

DEMO_QUESTIONS = (
    "What does the with statement do with the context manager's __exit__ method?",
    "When is the else clause of a for loop executed?",
)


def write_demo_corpus(directory: Path) -> Path:
    """Write one .txt file per topic into `directory` (idempotent: unchanged files are not rewritten)."""
    from pydoc_data.topics import topics

    directory.mkdir(parents=True, exist_ok=True)
    for name in DEMO_TOPICS:
        path = directory / f"{name}.txt"
        text = f"Python language reference: {name}\n\n{topics[name].strip()}\n"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return directory
