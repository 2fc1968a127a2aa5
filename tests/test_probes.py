"""The shipped knowledge probe is well formed (no model needed)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from tether.config import TetherError
from tether_lab.probes import N_OPTIONS, load_knowledge_probe, validate_knowledge_probe


@pytest.fixture(scope="module")
def probe():
    return load_knowledge_probe()


def test_probe_size_and_categories(probe):
    assert len(probe) >= 300
    per_category = Counter(r["category"] for r in probe)
    assert len(per_category) >= 8
    assert min(per_category.values()) >= 10, per_category


def test_every_question_is_four_way_with_one_answer(probe):
    for r in probe:
        assert len(r["options"]) == N_OPTIONS, r["id"]
        assert len({o.strip().lower() for o in r["options"]}) == N_OPTIONS, r["id"]
        assert isinstance(r["answer"], int) and 0 <= r["answer"] < N_OPTIONS, r["id"]


def test_no_duplicate_ids_or_questions(probe):
    ids = [r["id"] for r in probe]
    questions = [" ".join(r["question"].lower().split()) for r in probe]
    assert len(set(ids)) == len(ids)
    assert len(set(questions)) == len(questions)


def test_answer_positions_are_balanced(probe):
    counts = Counter(r["answer"] for r in probe)
    assert set(counts) == set(range(N_OPTIONS))
    assert max(counts.values()) - min(counts.values()) <= 0.05 * len(probe), counts


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda rows: rows[0].update(options=rows[0]["options"][:3]), "4 non-empty strings"),
        (lambda rows: rows[0].update(options=[rows[0]["options"][0]] * 4), "distinct"),
        (lambda rows: rows[0].update(answer=4), "answer must be an index"),
        (lambda rows: rows[1].update(id=rows[0]["id"]), "duplicate id"),
        (lambda rows: rows[1].update(question=rows[0]["question"].upper()), "duplicate question"),
        (lambda rows: rows[0].pop("category"), "exactly the fields"),
        (lambda rows: rows.__delitem__(slice(10, None)), "at least 300"),
    ],
)
def test_validator_rejects_bad_records(probe, break_it, message):
    rows = copy.deepcopy(probe)
    break_it(rows)
    with pytest.raises(TetherError, match=message):
        validate_knowledge_probe(rows)
