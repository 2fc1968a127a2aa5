"""Model-independent probes shipped with tether.

`knowledge.jsonl`: general-knowledge questions written for tether (capitals, chemical symbols, planets,
units, anatomy, arithmetic, animals, colours, geography, ...), each four-way multiple choice:
    {"id": str, "category": str, "question": str, "options": [4 distinct strings], "answer": 0..3}

Scoring is "cloze" style, the lm-eval-harness convention for small models: the question alone is the user
message, and each option text is scored as the assistant's reply by its summed log-likelihood under the
chat template (`tether.evaluate.multiple_choice_correct`); the most likely option is the model's answer.
The options are not listed in the prompt: asking a 100M-parameter model to pick a letter measures whether
it can map letters to options (near chance at this size), not what it knows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from importlib import resources

from tether.config import TetherError

KNOWLEDGE_FILE = "knowledge.jsonl"
N_OPTIONS = 4


def validate_knowledge_probe(rows: list[dict], min_questions: int = 300, min_per_category: int = 10) -> None:
    """Raise a TetherError naming the first bad record: wrong fields, not 4 distinct non-empty options, an
    answer out of range, a duplicate id or question, too few questions overall or in a category."""
    seen_ids, seen_questions, per_category = set(), set(), defaultdict(int)
    for line, row in enumerate(rows, start=1):
        where = f"{KNOWLEDGE_FILE} line {line} ({row.get('id', '?') if isinstance(row, dict) else '?'})"
        if not isinstance(row, dict) or set(row) != {"id", "category", "question", "options", "answer"}:
            raise TetherError(f"{where}: expected exactly the fields id, category, question, options, answer")
        if not all(isinstance(row[k], str) and row[k].strip() for k in ("id", "category", "question")):
            raise TetherError(f"{where}: id, category and question must be non-empty strings")
        options = row["options"]
        if not (
            isinstance(options, list)
            and len(options) == N_OPTIONS
            and all(isinstance(o, str) and o.strip() for o in options)
        ):
            raise TetherError(f"{where}: options must be {N_OPTIONS} non-empty strings")
        if len({o.strip().lower() for o in options}) != N_OPTIONS:
            raise TetherError(f"{where}: options must be distinct, got {options}")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < N_OPTIONS:
            raise TetherError(f"{where}: answer must be an index in 0..{N_OPTIONS - 1}, got {answer!r}")
        question = " ".join(row["question"].lower().split())
        if row["id"] in seen_ids:
            raise TetherError(f"{where}: duplicate id")
        if question in seen_questions:
            raise TetherError(f"{where}: duplicate question {row['question']!r}")
        seen_ids.add(row["id"])
        seen_questions.add(question)
        per_category[row["category"]] += 1
    if len(rows) < min_questions:
        raise TetherError(f"{KNOWLEDGE_FILE}: {len(rows)} questions, expected at least {min_questions}")
    small = {c: n for c, n in per_category.items() if n < min_per_category}
    if small:
        raise TetherError(f"{KNOWLEDGE_FILE}: categories with fewer than {min_per_category} questions: {small}")


def load_knowledge_probe() -> list[dict]:
    """The shipped knowledge probe, validated: a list of {"id", "category", "question", "options", "answer"}."""
    text = resources.files(__name__).joinpath(KNOWLEDGE_FILE).read_text(encoding="utf-8")
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError as e:
                raise TetherError(f"{KNOWLEDGE_FILE} line {line}: not valid JSON ({e.msg})") from None
    validate_knowledge_probe(rows)
    return rows


def knowledge_questions(rows: list[dict] | None = None) -> list[dict]:
    """The probe as `evaluate.multiple_choice_correct` questions: the question alone as the user message."""
    return [
        {"prompt": [{"role": "user", "content": r["question"]}], "options": r["options"], "answer": r["answer"]}
        for r in (rows if rows is not None else load_knowledge_probe())
    ]


def knowledge_accuracy(model, tokenizer, batch_size: int = 32) -> dict:
    """Cloze multiple-choice accuracy on the knowledge probe (see the module docstring).

    Returns {"mean", "ci95_low", "ci95_high", "n"} (95% percentile bootstrap over questions) plus
    "per_category": {category: the same four keys}. Chance is 0.25.
    """
    from tether.evaluate import multiple_choice_correct
    from tether.stats import summarize

    rows = load_knowledge_probe()
    correct = multiple_choice_correct(model, tokenizer, knowledge_questions(rows), batch_size)
    by_category: dict[str, list[float]] = defaultdict(list)
    for row, c in zip(rows, correct, strict=True):
        by_category[row["category"]].append(c)
    result = summarize(correct)
    result["per_category"] = {cat: summarize(values) for cat, values in sorted(by_category.items())}
    return result
