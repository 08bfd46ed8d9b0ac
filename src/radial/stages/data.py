"""The data stage: normalize the benchmarks (ARC, GSM8K, MMLU) and build the synthetic task.

Sources, in order: a local folder of the original files (`--local-dir`, config key
`data.local_dir`), else the Hugging Face Hub (failing fast when it is unreachable); the synthetic
task is generated offline. Every task is written as `<out>/<split>.jsonl` in the shared schema

    {"id", "task", "split", "question", "choices", "labels", "answer", ...extras}

where `answer` is an index into `choices` for multiple choice, the final number as a string for
GSM8K (extra "solution": the full worked answer), the exact answer string for synthetic (extra
"level"); MMLU rows carry "subject". Row counts are checked against the official sizes.

Local layout (as in the shared benchmark folder):
    arc/ARC-{Easy,Challenge}-{Train,Dev,Test}.csv   AI2 CSV release, choices inline "(A) ... (B) ..."
    gsm8k/{train,test}.jsonl                         {"question", "answer": "... #### 72"}
    mmlu/{dev,test}/<subject>_<split>.csv            header question,choice0..choice3,answer (0-3)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from radial import hub, settings, synthetic
from radial.utils import RadialError, atomic_path, seed_everything, write_json, write_jsonl

TASKS = ("arc_easy", "arc_challenge", "gsm8k", "mmlu", "synthetic")
SPLITS = {
    "arc_easy": ("train", "validation", "test"),
    "arc_challenge": ("train", "validation", "test"),
    "gsm8k": ("train", "test"),
    "mmlu": ("dev", "test"),
    "synthetic": synthetic.SPLITS,
}
# Official sizes; the synthetic task has no fixed size (it has what was asked for).
EXPECTED_ROWS = {
    "arc_easy": {"train": 2251, "validation": 570, "test": 2376},
    "arc_challenge": {"train": 1119, "validation": 299, "test": 1172},
    "gsm8k": {"train": 7473, "test": 1319},
    "mmlu": {"dev": 285, "test": 14042},
}
MMLU_SUBJECT_COUNT = 57
MMLU_COLUMNS = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
MMLU_LABELS = ["A", "B", "C", "D"]
HUB_DATASETS = {  # task -> (dataset id, config name)
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "gsm8k": ("openai/gsm8k", "main"),
    "mmlu": ("cais/mmlu", "all"),
}
DEFAULT_HUB_TIMEOUT_S = settings.default("data.hub_timeout")

_ARC_FILE_PREFIX = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
_ARC_FILE_SPLIT = {"train": "Train", "validation": "Dev", "test": "Test"}
_ARC_COLUMNS = ("questionID", "AnswerKey", "question")
# Inline choices are labelled "(A) (B) ..." or "(1) (2) ..."; a few questions have 3 or 5 options.
_ARC_LABEL_SEQUENCES = ("ABCDEFGH", "12345678")
_GSM8K_FINAL_NUMBER = re.compile(r"-?\d+(\.\d+)?")


# ---------------------------------------------------------------------------------------------
# Loading a task


def load_task(
    task: str,
    local_dir: str | os.PathLike | None = None,
    *,
    hub_timeout: float = DEFAULT_HUB_TIMEOUT_S,
    synthetic_train: int = synthetic.DEFAULT_TRAIN_ROWS,
    synthetic_test: int = synthetic.DEFAULT_TEST_ROWS,
    levels: int = synthetic.DEFAULT_LEVELS,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """All splits of `task` as normalized rows: {split: [row, ...]}.

    Benchmarks come from `local_dir` when given, else from the Hub; `synthetic` is generated.
    """
    if task not in TASKS:
        raise RadialError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "synthetic":
        return {
            "train": synthetic.generate(synthetic_train, levels, seed, "train", test_rows=synthetic_test),
            "test": synthetic.generate(synthetic_test, levels, seed, "test"),
        }
    if local_dir is not None:
        return load_local(task, Path(local_dir))
    return load_hub(task, hub_timeout)


def describe_source(task: str, local_dir: str | os.PathLike | None) -> str:
    """The `source` written to meta.json: "synthetic", "local:<path>" or "hub:<dataset id>"."""
    if task == "synthetic":
        return "synthetic"
    if local_dir is not None:
        return f"local:{Path(local_dir).resolve()}"
    return f"hub:{HUB_DATASETS[task][0]}"


def load_local(task: str, local_dir: Path) -> dict[str, list[dict]]:
    if not local_dir.is_dir():
        raise RadialError(f"local benchmark folder {local_dir} does not exist (config key data.local_dir)")
    splits: dict[str, list[dict]] = {}
    for split in SPLITS[task]:
        if task == "gsm8k":
            path = _existing(local_dir / "gsm8k" / f"{split}.jsonl")
            rows = read_gsm8k_jsonl(path, split)
        elif task == "mmlu":
            path = _existing(local_dir / "mmlu" / split)
            rows = read_mmlu_folder(path, split)
        else:
            path = _existing(local_dir / "arc" / f"{_ARC_FILE_PREFIX[task]}-{_ARC_FILE_SPLIT[split]}.csv")
            rows = read_arc_csv(path, task, split)
        check_row_count(task, split, len(rows), where=str(path))
        splits[split] = rows
    if task == "mmlu":
        _check_mmlu_subjects(splits, local_dir / "mmlu")
    return splits


def check_row_count(task: str, split: str, actual: int, where: str) -> None:
    expected = EXPECTED_ROWS[task][split]
    if actual != expected:
        raise RadialError(f"{where}: expected {expected} rows for {task} {split}, found {actual}")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise RadialError(f"missing benchmark file {path} (check data.local_dir)")
    return path


# ---------------------------------------------------------------------------------------------
# ARC: AI2's CSV release


def read_arc_csv(path: Path, task: str, split: str) -> list[dict]:
    rows = []
    for line, record in _csv_records(path, required_columns=_ARC_COLUMNS):
        question_id, answer_key, text = record["questionID"], record["AnswerKey"].strip(), record["question"]
        parsed = split_arc_question(text)
        if parsed is None:
            raise RadialError(f"{path}:{line}: cannot find inline choices '(A) ... (B) ...' in question {text[:80]!r}")
        stem, labels, choices = parsed
        if answer_key not in labels:
            raise RadialError(f"{path}:{line}: AnswerKey {answer_key!r} is not one of the choice labels {labels}")
        rows.append(
            {
                "id": f"{task}/{split}/{question_id}",
                "task": task,
                "split": split,
                "question": stem,
                "choices": choices,
                "labels": labels,
                "answer": labels.index(answer_key),
            }
        )
    return rows


def split_arc_question(text: str) -> tuple[str, list[str], list[str]] | None:
    """Split "stem (A) one (B) two ..." into (stem, labels, choice texts); None if there are no choices.

    Markers like "(S)" or "(N)" also occur inside stems and choices ("sulfur (S)"), so take the
    longest run of consecutive labels "(A)", "(B)", ...; on a tie the run starting last wins, so a
    stray "(A)" in the stem is not taken for the first choice.
    """
    best: list[int] = []  # start offsets of the markers of the best run
    best_sequence = ""
    for sequence in _ARC_LABEL_SEQUENCES:
        start = text.find(f"({sequence[0]})")
        while start >= 0:
            run = [start]
            for label in sequence[1:]:
                next_marker = text.find(f"({label})", run[-1] + 3)
                if next_marker < 0:
                    break
                run.append(next_marker)
            if len(run) >= len(best):
                best, best_sequence = run, sequence
            start = text.find(f"({sequence[0]})", start + 1)
    if len(best) < 2:
        return None
    ends = best[1:] + [len(text)]
    choices = [text[start + 3 : end].strip() for start, end in zip(best, ends)]
    if any(not choice for choice in choices):
        return None
    return text[: best[0]].strip(), list(best_sequence[: len(best)]), choices


# ---------------------------------------------------------------------------------------------
# GSM8K: JSON lines with the worked answer ending in "#### <number>"


def read_gsm8k_jsonl(path: Path, split: str) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON may hold U+2028
    except UnicodeDecodeError as err:
        raise RadialError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RadialError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
            raise RadialError(f"{where}: expected an object with string fields 'question' and 'answer'")
        solution = record["answer"]
        if "####" not in solution:
            raise RadialError(f"{where}: answer has no '#### <number>' final line")
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not _GSM8K_FINAL_NUMBER.fullmatch(final):
            raise RadialError(f"{where}: final answer after '####' is not a number: {final!r}")
        rows.append(
            {
                "id": f"gsm8k/{split}/{len(rows)}",
                "task": "gsm8k",
                "split": split,
                "question": record["question"],
                "choices": [],
                "labels": [],
                "answer": final,
                "solution": solution,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# MMLU: one CSV per subject with a header row, answer as index 0-3


def read_mmlu_folder(folder: Path, split: str) -> list[dict]:
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise RadialError(f"{folder}: no MMLU files named <subject>_{split}.csv")
    rows = []
    for path in tqdm(files, desc=f"mmlu {split}", unit="subject", disable=None):
        rows.extend(read_mmlu_csv(path, path.name.removesuffix(f"_{split}.csv"), split))
    return rows


def read_mmlu_csv(path: Path, subject: str, split: str) -> list[dict]:
    rows = []
    for line, record in _csv_records(path, required_columns=MMLU_COLUMNS, exact_header=True):
        answer = record["answer"].strip()
        if answer not in {"0", "1", "2", "3"}:
            raise RadialError(f"{path}:{line}: answer must be a choice index 0-3, found {answer!r}")
        rows.append(
            {
                "id": f"mmlu/{subject}/{split}/{len(rows)}",
                "task": "mmlu",
                "split": split,
                "question": record["question"],
                "choices": [record[f"choice{i}"] for i in range(4)],
                "labels": list(MMLU_LABELS),
                "answer": int(answer),
                "subject": subject,
            }
        )
    return rows


def _check_mmlu_subjects(splits: dict[str, list[dict]], where: Path) -> None:
    subjects = {split: {row["subject"] for row in rows} for split, rows in splits.items()}
    for split, found in subjects.items():
        if len(found) != MMLU_SUBJECT_COUNT:
            raise RadialError(f"{where / split}: expected {MMLU_SUBJECT_COUNT} subjects, found {len(found)}")
    if subjects["dev"] != subjects["test"]:
        differing = sorted(subjects["dev"] ^ subjects["test"])
        raise RadialError(f"{where}: dev and test subjects differ: {', '.join(differing)}")


def _csv_records(
    path: Path, required_columns: tuple[str, ...] | list[str], exact_header: bool = False
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line where the record starts, {column: value}) for each record; quoted fields may span lines."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise RadialError(f"{path}:1: empty file, expected a header row")
            if exact_header and header != list(required_columns):
                raise RadialError(f"{path}:1: expected header {','.join(required_columns)}, found {','.join(header)}")
            missing = [column for column in required_columns if column not in header]
            if missing:
                raise RadialError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
            while True:
                line = reader.line_num + 1
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    raise RadialError(f"{path}:{line}: malformed CSV ({err})") from None
                if not values:  # blank line
                    continue
                if len(values) != len(header):
                    raise RadialError(f"{path}:{line}: expected {len(header)} columns, found {len(values)}")
                yield line, dict(zip(header, values))
    except UnicodeDecodeError as err:
        raise RadialError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub fallback


def load_hub(task: str, timeout: float = DEFAULT_HUB_TIMEOUT_S) -> dict[str, list[dict]]:
    """Load `task` with `datasets.load_dataset`, after checking quickly that the Hub can serve it."""
    dataset_id, config = HUB_DATASETS[task]
    reason = hub.unavailable_reason("dataset", dataset_id, timeout, hub.OFFLINE_VARIABLES)
    if reason is not None:
        raise RadialError(
            f"no local benchmark folder was given and the Hugging Face Hub cannot serve {dataset_id} ({reason}); "
            f"set the config key `data.local_dir` (or pass --local-dir) to a folder with the original files"
        )
    import datasets

    splits = {}
    for split in SPLITS[task]:
        rows = _normalize_hub_records(task, split, datasets.load_dataset(dataset_id, config, split=split))
        check_row_count(task, split, len(rows), where=f"hub:{dataset_id} ({config}, {split})")
        splits[split] = rows
    if task == "mmlu":
        _check_mmlu_subjects(splits, Path(f"hub:{dataset_id}"))
    return splits


def _normalize_hub_records(task: str, split: str, records) -> list[dict]:
    """Hub rows in the shared schema, with the same ids as the local files give."""
    rows = []
    if task == "gsm8k":
        for index, record in enumerate(records):
            solution = record["answer"]
            final = solution.rsplit("####", 1)[1].strip().replace(",", "")
            rows.append(
                {
                    "id": f"gsm8k/{split}/{index}",
                    "task": task,
                    "split": split,
                    "question": record["question"],
                    "choices": [],
                    "labels": [],
                    "answer": final,
                    "solution": solution,
                }
            )
    elif task == "mmlu":
        rows_per_subject: dict[str, int] = {}
        for record in records:
            subject = record["subject"]
            row_in_subject = rows_per_subject.get(subject, 0)
            rows_per_subject[subject] = row_in_subject + 1
            rows.append(
                {
                    "id": f"mmlu/{subject}/{split}/{row_in_subject}",
                    "task": task,
                    "split": split,
                    "question": record["question"],
                    "choices": list(record["choices"]),
                    "labels": list(MMLU_LABELS),
                    "answer": int(record["answer"]),
                    "subject": subject,
                }
            )
    else:
        for record in records:
            labels = list(record["choices"]["label"])
            rows.append(
                {
                    "id": f"{task}/{split}/{record['id']}",
                    "task": task,
                    "split": split,
                    "question": record["question"],
                    "choices": list(record["choices"]["text"]),
                    "labels": labels,
                    "answer": labels.index(record["answerKey"]),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# The stage's command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Normalize one benchmark (ARC-Easy, ARC-Challenge, GSM8K, MMLU) from a local folder of the "
        "original files or the Hugging Face Hub, or generate the synthetic arithmetic task, and write "
        "DIR/<split>.jsonl plus DIR/meta.json."
    )
    parser.add_argument(
        "--task", required=True, choices=TASKS, metavar="TASK", help=f"task to write: {', '.join(TASKS)}"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output folder (written atomically, replaced if present)"
    )
    settings.add_setting(
        parser, "data.local_dir", type=Path, metavar="PATH",
        help="folder with the original files (arc/, gsm8k/, mmlu/); without it the Hub is used (config key data.local_dir)",
    )
    settings.add_setting(parser, "data.hub_timeout", metavar="SECONDS")
    settings.add_setting(parser, "data.synthetic.train", flag="--synthetic-train", metavar="N")
    settings.add_setting(parser, "data.synthetic.test", flag="--synthetic-test", metavar="N")
    settings.add_setting(parser, "data.synthetic.levels", metavar="N")
    settings.add_common_arguments(parser)


def main(args: argparse.Namespace) -> int:
    seed_everything(args.seed)
    from radial.tracking import log_artifact, stage_run

    with stage_run("data", args) as run:
        splits = load_task(
            args.task,
            args.local_dir,
            hub_timeout=args.hub_timeout,
            synthetic_train=args.synthetic_train,
            synthetic_test=args.synthetic_test,
            levels=args.levels,
            seed=args.seed,
        )
        counts = {split: len(rows) for split, rows in splits.items()}
        meta: dict = {"task": args.task, "source": describe_source(args.task, args.local_dir), "counts": counts}
        if args.task == "synthetic":
            meta.update(levels=args.levels, seed=args.seed)
        elif args.local_dir is None:
            meta["hub_config"] = HUB_DATASETS[args.task][1]
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            for split, rows in splits.items():
                write_jsonl(tmp / f"{split}.jsonl", rows)
            write_json(tmp / "meta.json", meta)
        run.log({f"rows/{split}": n for split, n in counts.items()})
        run.summary.update({"source": meta["source"], "rows_total": sum(counts.values())})
        log_artifact(run, f"data-{args.task}", "dataset", [args.out])
    print(f"wrote {', '.join(f'{split}: {n}' for split, n in counts.items())} rows to {args.out}")
    return 0
