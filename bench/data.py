"""The benchmark's questions: MuSiQue-format JSON Lines, one question with its passages a line.

    {"id": "...", "question": "...", "answers": ["..."], "passages": [{"title": "...", "text": "..."}, ...]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "bench" / "data" / "musique_dev.jsonl"  # CC BY 4.0, see bench/data/README.md


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]  # the gold answer and its aliases
    documents: tuple[str, ...]  # each passage as f"{title}\n{text}", in the given order


def load_questions(path: Path, limit: int | None = None) -> list[Question]:
    """The first `limit` questions of `path` (all without a limit); malformed lines raise ValueError."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no question file at {path}; pass --data FILE (JSON Lines with id, question, answers, "
                         "passages)")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        questions.append(_parse(json.loads(line), path, number))
        if limit is not None and len(questions) == limit:
            break
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def _parse(record: dict, path: Path, number: int) -> Question:
    where = f"{path} line {number}"
    if not isinstance(record.get("question"), str) or not record["question"].strip():
        raise ValueError(f"{where}: no 'question' text")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
    passages = record.get("passages")
    if not isinstance(passages, list) or not passages:
        raise ValueError(f"{where}: 'passages' must be a non-empty list of {{title, text}} objects")
    documents = []
    for i, p in enumerate(passages):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str) or not p["text"].strip():
            raise ValueError(f"{where}: passage {i} has no 'text'")
        documents.append(f"{p.get('title') or ''}\n{p['text']}")
    return Question(str(record.get("id", f"line-{number}")), record["question"], tuple(answers), tuple(documents))


def passage_documents(questions: list[Question], label: str) -> list[tuple[str, str]]:
    """(source label, text) of every passage of `questions`, in order."""
    return [(f"{label}:{q.id}#{i}", text) for q in questions for i, text in enumerate(q.documents)]
