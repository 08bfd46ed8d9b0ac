"""The synthetic addition task: seeded, balanced, correct, and train/test disjoint."""

from __future__ import annotations

import collections
import functools
import json
import re

import pytest

from radial import synthetic
from radial.stages import data
from radial.utils import RadialError


@functools.lru_cache(maxsize=None)
def _default_splits(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The default sizes (20000 train, 1000 test, 5 levels), generated once per seed."""
    return synthetic.generate(20000, 5, seed, "train"), synthetic.generate(1000, 5, seed, "test")


def _recompute(question: str) -> str:
    """Independent check: Python evaluates "7+4+9+2" the same as the task (levels 1-5 sum to at most 99)."""
    assert re.fullmatch(r"\d(\+\d)+=", question), question
    return f"{eval(question[:-1]):02d}"


def test_rows_follow_the_schema():
    row = synthetic.generate(10, 5, 0, "test")[3]
    assert set(row) == {"id", "task", "split", "question", "choices", "labels", "answer", "level"}
    assert row["id"] == "synthetic/test/3" and row["task"] == "synthetic" and row["split"] == "test"
    assert row["choices"] == [] and row["labels"] == []
    assert re.fullmatch(r"\d{2}", row["answer"])
    assert synthetic.training_text(row) == f"{row['question']}{row['answer']}\n"
    json.dumps(row)


def test_deterministic_for_a_seed():
    assert synthetic.generate(300, 5, 7, "train") == synthetic.generate(300, 5, 7, "train")
    assert synthetic.generate(300, 5, 7, "train") != synthetic.generate(300, 5, 8, "train")
    assert synthetic.generate(100, 5, 7, "test") == synthetic.generate(100, 5, 7, "test")


def test_answers_are_correct_and_levels_set_the_operand_count():
    train, test = _default_splits()
    for row in train + test:
        assert row["answer"] == _recompute(row["question"])
        assert len(re.findall(r"\d", row["question"])) == 2 * row["level"] + 1


def test_known_questions():
    assert synthetic.answer_for("7+4+9+2=") == "22"
    assert synthetic.answer_for("0+0+0=") == "00"
    assert synthetic.answer_for("3+5+0=") == "08"
    assert synthetic.answer_for("9+9+9+9+9+9+9+9+9+9+9+9=") == "108"
    assert synthetic.answer_for("1+2+3+4+5+6+7+8+9+0+0+0=") == "045"
    assert synthetic.question_text(1, 0) == "0+0+0="
    assert {synthetic.question_text(1, i) for i in range(synthetic.space_size(1))} == {
        f"{a}+{b}+{c}=" for a in range(10) for b in range(10) for c in range(10)
    }
    with pytest.raises(RadialError, match="single digits"):
        synthetic.answer_for("12+3=")


def test_levels_are_balanced():
    train, test = _default_splits()
    assert collections.Counter(row["level"] for row in train) == {level: 4000 for level in range(1, 6)}
    assert collections.Counter(row["level"] for row in test) == {level: 200 for level in range(1, 6)}
    uneven = collections.Counter(row["level"] for row in synthetic.generate(13, 5, 0, "train", test_rows=5))
    assert sorted(uneven.values()) == [2, 2, 3, 3, 3]


def test_train_and_test_are_disjoint_and_duplicates_only_where_the_space_runs_out():
    train, test = _default_splits()
    test_questions = [row["question"] for row in test]
    assert len(set(test_questions)) == len(test_questions)
    assert not set(test_questions) & {row["question"] for row in train}
    distinct_train = {
        level: len({row["question"] for row in train if row["level"] == level}) for level in range(1, 6)
    }
    # level 1: 1000 questions, 200 in test, so train cycles through the other 800; higher levels never repeat.
    assert distinct_train == {1: 800, 2: 4000, 3: 4000, 4: 4000, 5: 4000}


def test_disjoint_for_other_sizes_and_levels():
    train = synthetic.generate(3000, 3, 5, "train", test_rows=2700)
    test = synthetic.generate(2700, 3, 5, "test")
    assert not {row["question"] for row in test} & {row["question"] for row in train}
    assert max(row["level"] for row in train) == 3
    level_1_train = {row["question"] for row in train if row["level"] == 1}
    assert len(level_1_train) == 1000 - 900  # every remaining level-1 question is used


def test_impossible_sizes_are_refused():
    with pytest.raises(RadialError, match="level 1 has only 1000 distinct questions"):
        synthetic.generate(1001 * 5, 5, 0, "test")
    with pytest.raises(RadialError, match="none left for train"):
        synthetic.generate(10, 1, 0, "train", test_rows=1000)
    with pytest.raises(RadialError, match="split"):
        synthetic.generate(10, 5, 0, "validation")


def test_load_task_builds_both_synthetic_splits():
    splits = data.load_task("synthetic", synthetic_train=50, synthetic_test=20, levels=2, seed=3)
    assert {split: len(rows) for split, rows in splits.items()} == {"train": 50, "test": 20}
    assert splits["test"] == synthetic.generate(20, 2, 3, "test")
    assert not {r["question"] for r in splits["test"]} & {r["question"] for r in splits["train"]}
