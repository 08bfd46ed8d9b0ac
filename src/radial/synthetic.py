"""The synthetic in-domain task: multi-step addition with graded difficulty.

Level k adds 2k+1 single-digit operands and asks for the exact sum: level 1 is e.g. "7+4+9=" with
answer "20", level 2 "7+4+9+2+5=" with answer "27". Every level adds two more additions to carry
out (and widens the answer range), so harder levels need more computation for the answer. Answers
are zero-padded to the width of the level's largest sum ("3+5+0=08"), so every answer of a level
has the same shape.

Why these steps: with one operand more per level (k+2) the embedded model summed 4 to 6 operands
equally well (about 90 %, 600 fresh questions each) and 3 operands worse (83 %), so its accuracy
did not fall with the level. With two more per level, the embedded default (1500 steps) answered
levels 1-5 at 96.5 / 98.5 / 97.5 / 92.5 / 94.5 % with seed 0, 98.5 / 94 / 84.5 / 72 / 49 % with
seed 1 and 98.5 / 100 / 95 / 95.5 / 80.5 % with seed 2 (200 questions a level): the two hardest
levels come last, by a margin that depends on the seed. Unpadded answers put the rare one-digit
sums in a format of their own, learned last.

An earlier version asked for +/- chains mod 10; small models trained from scratch on CPU stayed at
chance on it (mod-10 chains are parity-like), while exact sums are learned within minutes.

Test questions are drawn first and excluded from train, so the splits never share a question.
Level 1 has 10^3 = 1000 distinct questions; where train asks for more than the remaining ones, it
cycles through all of them, so duplicates appear in train only where a level's question space is
exhausted. Everything is seeded and offline.
"""

from __future__ import annotations

import random

from radial import settings
from radial.utils import RadialError

TASK = "synthetic"
SPLITS = ("train", "test")
DEFAULT_TRAIN_ROWS = settings.default("data.synthetic.train")
DEFAULT_TEST_ROWS = settings.default("data.synthetic.test")  # 200 per level: +-3.5 % per level (one s.e.)
DEFAULT_LEVELS = settings.default("data.synthetic.levels")
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


def operand_count(level: int) -> int:
    return 2 * level + 1


def space_size(level: int) -> int:
    """Number of distinct questions at `level`: one digit 0-9 per operand."""
    return 10 ** operand_count(level)


def question_text(level: int, index: int) -> str:
    """The question numbered `index` in [0, space_size(level)): its digits are the operands."""
    digits = [(index // 10**position) % 10 for position in range(operand_count(level))]
    return "+".join(str(digit) for digit in digits) + "="


def answer_for(question: str) -> str:
    """The exact sum of "d+d+...+d=" in decimal, zero-padded to the width of the largest possible sum."""
    operands = question.removesuffix("=").split("+")
    if not question.endswith("=") or not all(len(operand) == 1 and operand.isdigit() for operand in operands):
        raise RadialError(f"synthetic question must be single digits joined by '+' and end with '=': {question!r}")
    width = len(str(9 * len(operands)))
    return str(sum(int(operand) for operand in operands)).zfill(width)


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
