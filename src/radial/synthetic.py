"""The synthetic in-domain task: multi-step arithmetic mod 10 with graded difficulty.

Level k joins k+1 single-digit operands with + and -, left to right, and asks for the result
mod 10 as one digit: level 3 is e.g. "7+4-9+2=" with answer "4". Every level adds one more
operation to carry out, so harder levels need more computation (depth) for the same answer length.

Test questions are drawn first and excluded from train, so the splits never share a question.
Low levels have few distinct questions (level 1: 10 * 10 * 2 = 200, level 2: 4000); where train
asks for more than the remaining ones, it cycles through all of them, so duplicates appear in train
only where a level's question space is exhausted. Everything is seeded and offline.
"""

from __future__ import annotations

import random

from radial.utils import RadialError

TASK = "synthetic"
SPLITS = ("train", "test")
DEFAULT_TRAIN_ROWS = 20000
DEFAULT_TEST_ROWS = 500
DEFAULT_LEVELS = 5
OPERATORS = "+-"
# Spaces up to this size are listed in full and shuffled; larger ones are sampled by rejection.
_ENUMERATE_UP_TO = 100_000


def generate(n: int, levels: int, seed: int, split: str, *, test_rows: int = DEFAULT_TEST_ROWS) -> list[dict]:
    """`n` rows of `split` ("train" or "test"), balanced across levels 1..`levels`, in seeded random order.

    Train excludes every question of the test split that `generate(test_rows, levels, seed, "test")`
    returns, so pass the same `test_rows` you generate the test split with.
    """
    if split not in SPLITS:
        raise RadialError(f"synthetic split must be one of {', '.join(SPLITS)}, not {split!r}")
    if n < 0 or test_rows < 0:
        raise RadialError(f"synthetic row counts must be >= 0 (got n={n}, test_rows={test_rows})")
    if levels < 1:
        raise RadialError(f"synthetic levels must be >= 1, not {levels}")

    test_counts = _per_level(n if split == "test" else test_rows, levels)
    train_counts = _per_level(n, levels)
    picked: list[tuple[int, int]] = []  # (level, question index)
    for level in range(1, levels + 1):
        test_questions = _sample_test_questions(level, test_counts[level - 1], seed)
        if split == "test":
            chosen = test_questions
        else:
            rng = random.Random(f"radial-synthetic/{seed}/train/{level}")
            chosen = _sample_questions(rng, level, train_counts[level - 1], excluded=set(test_questions))
        picked.extend((level, index) for index in chosen)
    random.Random(f"radial-synthetic/{seed}/{split}/order").shuffle(picked)

    rows = []
    for i, (level, index) in enumerate(picked):
        question = question_text(level, index)
        rows.append(
            {
                "id": f"{TASK}/{split}/{i}",
                "task": TASK,
                "split": split,
                "question": question,
                "choices": [],
                "labels": [],
                "answer": answer_for(question),
                "level": level,
            }
        )
    return rows


def training_text(row: dict) -> str:
    """The exact line a model is pre-trained on: prompt, answer, newline (generation stops at "\\n")."""
    return f"{row['question']}{row['answer']}\n"


def space_size(level: int) -> int:
    """Number of distinct questions at `level`: 10^(level+1) operand choices times 2^level operators."""
    return 10 ** (level + 1) * len(OPERATORS) ** level


def question_text(level: int, index: int) -> str:
    """The question numbered `index` in [0, space_size(level)): operand digits, then operator bits."""
    digits_index, operators_index = divmod(index, len(OPERATORS) ** level)
    digits = [(digits_index // 10**position) % 10 for position in range(level + 1)]
    operators = [OPERATORS[(operators_index >> position) & 1] for position in range(level)]
    text = str(digits[0])
    for operator, digit in zip(operators, digits[1:]):
        text += f"{operator}{digit}"
    return text + "="


def answer_for(question: str) -> str:
    """Evaluate "d(+|-)d...=" left to right; the answer is the result mod 10 as one digit."""
    body = question.removesuffix("=")
    total = int(body[0])
    for operator, digit in zip(body[1::2], body[2::2]):
        total = total + int(digit) if operator == "+" else total - int(digit)
    return str(total % 10)


def _per_level(n: int, levels: int) -> list[int]:
    """Split n as evenly as possible; the first `n % levels` levels get one extra row."""
    base, extra = divmod(n, levels)
    return [base + (1 if i < extra else 0) for i in range(levels)]


def _sample_test_questions(level: int, count: int, seed: int) -> list[int]:
    if count > space_size(level):
        raise RadialError(
            f"synthetic level {level} has only {space_size(level)} distinct questions; "
            f"cannot draw {count} distinct test questions (lower the test size or raise the levels)"
        )
    rng = random.Random(f"radial-synthetic/{seed}/test/{level}")
    return _sample_questions(rng, level, count, excluded=set())


def _sample_questions(rng: random.Random, level: int, count: int, excluded: set[int]) -> list[int]:
    """`count` question indices not in `excluded`: distinct while the space lasts, then cycling."""
    space = space_size(level)
    available = space - len(excluded)
    if count == 0:
        return []
    if available <= 0:
        raise RadialError(
            f"synthetic level {level}: all {space} questions are in the test split, none left for train "
            f"(lower the test size)"
        )
    if space <= _ENUMERATE_UP_TO or 2 * count > available:
        pool = [index for index in range(space) if index not in excluded]
        rng.shuffle(pool)
        return [pool[i % len(pool)] for i in range(count)]
    chosen: dict[int, None] = {}  # insertion-ordered set
    while len(chosen) < count:
        index = rng.randrange(space)
        if index not in excluded:
            chosen[index] = None
    return list(chosen)
