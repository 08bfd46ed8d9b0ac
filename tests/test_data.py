"""The data stage on the real benchmark files: counts, parsed rows, malformed input, Hub fail-fast, CLI."""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radial import hub
from radial.stages import data
from radial.utils import RadialError, read_jsonl

ARC_HEADER = (
    "questionID,originalQuestionID,totalPossiblePoint,AnswerKey,isMultipleChoiceQuestion,"
    "includesDiagram,examName,schoolGrade,year,question,subject,category\n"
)
MMLU_HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


@functools.lru_cache(maxsize=None)
def _load(task: str, local_dir: Path) -> dict[str, list[dict]]:
    return data.load_task(task, local_dir)


def _row(rows: list[dict], row_id: str) -> dict:
    matches = [row for row in rows if row["id"] == row_id]
    assert len(matches) == 1, f"{row_id}: {len(matches)} rows"
    return matches[0]


def _arc_line(question_id: str, answer_key: str, question: str) -> str:
    question = '"' + question.replace('"', '""') + '"'
    return f"{question_id},1,1,{answer_key},1,0,Test,8,2015,{question},,Train\n"


# --- the real files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, counts",
    [
        ("arc_easy", {"train": 2251, "validation": 570, "test": 2376}),
        ("arc_challenge", {"train": 1119, "validation": 299, "test": 1172}),
        ("gsm8k", {"train": 7473, "test": 1319}),
        ("mmlu", {"dev": 285, "test": 14042}),
    ],
)
def test_row_counts_match_the_official_sizes(shared_data, task, counts):
    splits = _load(task, shared_data)
    assert {split: len(rows) for split, rows in splits.items()} == counts
    assert tuple(splits) == data.SPLITS[task]


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "gsm8k", "mmlu"])
def test_every_row_follows_the_shared_schema(shared_data, task):
    for split, rows in _load(task, shared_data).items():
        assert len({row["id"] for row in rows}) == len(rows), "ids must be unique within a split"
        for row in rows:
            assert row["task"] == task and row["split"] == split
            assert isinstance(row["question"], str) and row["question"]
            assert len(row["choices"]) == len(row["labels"])
            if task == "gsm8k":
                assert row["choices"] == [] and re.fullmatch(r"-?\d+", row["answer"])
                assert row["solution"].rsplit("#### ", 1)[1].replace(",", "") == row["answer"]
            else:
                assert isinstance(row["answer"], int) and 0 <= row["answer"] < len(row["choices"])
                assert all(isinstance(choice, str) for choice in row["choices"])
            json.dumps(row)  # serializable as is


def test_known_arc_row(shared_data):
    row = _row(_load("arc_challenge", shared_data)["train"], "arc_challenge/train/Mercury_SC_415702")
    assert row == {
        "id": "arc_challenge/train/Mercury_SC_415702",
        "task": "arc_challenge",
        "split": "train",
        "question": "George wants to warm his hands quickly by rubbing them. "
        "Which skin surface will produce the most heat?",
        "choices": ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"],
        "labels": ["A", "B", "C", "D"],
        "answer": 0,
    }


def test_arc_numeric_labels_parse(shared_data):
    row = _row(_load("arc_challenge", shared_data)["test"], "arc_challenge/test/NYSEDREGENTS_2008_8_27")
    assert row["labels"] == ["1", "2", "3", "4"]
    assert row["choices"] == ["5 N", "10 N", "20 N", "30 N"]
    assert row["answer"] == 2  # AnswerKey "3"
    assert row["question"].endswith("accelerate at 6 meters per second^2?")


def test_arc_five_and_three_options_parse(shared_data):
    validation = _load("arc_challenge", shared_data)["validation"]
    five = _row(validation, "arc_challenge/validation/TIMSS_2003_8_pg29")
    assert five["labels"] == ["A", "B", "C", "D", "E"]
    assert five["choices"] == ["liver", "kidney", "stomach", "bladder", "heart"]
    assert five["answer"] == 4
    three = _row(validation, "arc_challenge/validation/NYSEDREGENTS_2014_4_4")
    assert three["choices"] == ["gas", "liquid", "solid"] and three["labels"] == ["A", "B", "C"]
    assert three["answer"] == 0


def test_arc_parenthesized_letters_inside_choices_stay_in_the_text(shared_data):
    row = _row(_load("arc_challenge", shared_data)["test"], "arc_challenge/test/Mercury_411729")
    assert row["choices"] == ["sulfur (S)", "argon (Ar)", "fluorine (F)", "bromine (Br)"]
    assert row["question"] == "An atom of which element contains one more proton than one atom of chlorine (Cl)?"
    assert row["answer"] == 1


def test_split_arc_question_prefers_the_last_full_run():
    stem, labels, choices = data.split_arc_question("Compare (A) and (B) in the table. (A) x (B) y (C) z")
    assert stem == "Compare (A) and (B) in the table."
    assert labels == ["A", "B", "C"] and choices == ["x", "y", "z"]
    assert data.split_arc_question("No choices here (A) only one") is None


def test_gsm8k_rows(shared_data):
    splits = _load("gsm8k", shared_data)
    first = splits["test"][0]
    assert first["id"] == "gsm8k/test/0"
    assert first["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first["answer"] == "18"
    assert first["solution"].endswith("#### 18") and "<<16-3-4=9>>" in first["solution"]
    assert splits["train"][345]["answer"] == "1080"  # "#### 1,080": commas removed
    assert splits["train"][5715]["answer"] == "-7"


def test_mmlu_rows_and_subjects(shared_data):
    splits = _load("mmlu", shared_data)
    assert splits["test"][0] == {
        "id": "mmlu/abstract_algebra/test/0",
        "task": "mmlu",
        "split": "test",
        "question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "choices": ["0", "4", "2", "6"],
        "labels": ["A", "B", "C", "D"],
        "answer": 1,
        "subject": "abstract_algebra",
    }
    dev_subjects = [row["subject"] for row in splits["dev"]]
    assert len(set(dev_subjects)) == 57 and all(dev_subjects.count(s) == 5 for s in set(dev_subjects))
    assert {row["subject"] for row in splits["test"]} == set(dev_subjects)
    last = splits["test"][-1]
    assert last["subject"] == "world_religions" and last["id"].startswith("mmlu/world_religions/test/")


# --- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        (_arc_line("Q3", "A", "What is this? no inline choices at all"), "cannot find inline choices"),
        (_arc_line("Q3", "E", "Pick one. (A) x (B) y (C) z (D) w"), "AnswerKey 'E' is not one of"),
        ("Q3,1,1,A,1,0,Test,8,2015,Pick one. (A) x (B) y,,Train,extra\n", "expected 12 columns, found 13"),
    ],
)
def test_malformed_arc_row_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "arc" / "ARC-Easy-Train.csv"
    path.parent.mkdir()
    good_multiline = _arc_line("Q2", "B", "A question\nover two lines? (A) x (B) y")
    path.write_text(ARC_HEADER + _arc_line("Q1", "2", "Pick one. (1) x (2) y") + good_multiline + bad_line)
    with pytest.raises(RadialError, match=problem) as err:
        data.load_task("arc_easy", tmp_path)
    assert f"{path}:5:" in str(err.value)  # header, Q1, Q2 on lines 3-4, the bad row on 5


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"question": "q", "answer": "so 3"}\n', "no '#### <number>'"),
        ('{"question": "q", "answer": "#### 3"\n', "not valid JSON"),
        ('{"question": "q", "answer": "#### three"}\n', "not a number"),
        ('["q", "#### 3"]\n', "expected an object"),
    ],
)
def test_malformed_gsm8k_row_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "gsm8k" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"question": "q1", "answer": "1+1=2\\n#### 2"}\n\n' + bad_line)
    with pytest.raises(RadialError, match=problem) as err:
        data.load_task("gsm8k", tmp_path)
    assert f"{path}:3:" in str(err.value)


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("q,a,b,c,d,4\n", "answer must be a choice index 0-3, found '4'"),
        ("q,a,b,c,d,B\n", "answer must be a choice index 0-3, found 'B'"),
        ("q,a,b,c,3\n", "expected 6 columns, found 5"),
        ('"a question\nover lines",a,b,c,d,7\n', "found '7'"),  # reported at the line the record starts
    ],
)
def test_malformed_mmlu_row_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "mmlu" / "dev" / "anatomy_dev.csv"
    path.parent.mkdir(parents=True)
    path.write_text(MMLU_HEADER + '"two\nlines",a,b,c,d,0\n' + bad_line)
    with pytest.raises(RadialError, match=problem) as err:
        data.load_task("mmlu", tmp_path)
    assert f"{path}:4:" in str(err.value)


def test_mmlu_wrong_header_is_rejected(tmp_path):
    path = tmp_path / "anatomy_dev.csv"
    path.write_text("q,a,b,c,d,answer\nq,a,b,c,d,0\n")
    with pytest.raises(RadialError, match=f"{path}:1: expected header question,choice0"):
        data.read_mmlu_csv(path, "anatomy", "dev")


def test_non_utf8_file_is_a_clear_error(tmp_path):
    path = tmp_path / "anatomy_dev.csv"
    path.write_bytes(MMLU_HEADER.encode() + b"caf\xe9,a,b,c,d,0\n")
    with pytest.raises(RadialError, match=f"{path}: not UTF-8 text"):
        data.read_mmlu_csv(path, "anatomy", "dev")

def test_wrong_row_count_names_file_and_counts(tmp_path, shared_data):
    path = tmp_path / "gsm8k" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines(keepends=True)[:10]))
    with pytest.raises(RadialError) as err:
        data.load_task("gsm8k", tmp_path)
    assert str(err.value) == f"{path}: expected 7473 rows for gsm8k train, found 10"


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(RadialError, match=r"missing benchmark file .*ARC-Challenge-Train\.csv"):
        data.load_task("arc_challenge", tmp_path)


# --- the Hub fallback fails fast ---------------------------------------------------------------


def test_hub_offline_fails_fast_naming_the_config_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(RadialError, match=r"data\.local_dir") as err:
        data.load_task("gsm8k", None)
    assert time.monotonic() - start < 1
    assert "no local benchmark folder" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)


def test_hub_probe_gives_up_after_the_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def hanging_connect(*args, **kwargs):
        time.sleep(30)
        raise OSError("still no answer")

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    start = time.monotonic()
    reason = hub.unreachable_reason(timeout=0.3, variables=hub.OFFLINE_VARIABLES)
    assert time.monotonic() - start < 2
    assert reason is not None and "huggingface.co:443 within 0.3 s" in reason


def test_hub_probe_reports_a_refused_connection(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # "0" means online
    with socket.socket() as unused:  # a local port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(RadialError, match=rf"127\.0\.0\.1:{port}.*data\.local_dir"):
        data.load_task("mmlu", None, hub_timeout=2)


def test_an_endpoint_that_is_not_the_hub_fails_fast_naming_the_config_key(monkeypatch):
    """A server that accepts the connection but does not answer as the Hub (a proxy, a wrong
    HF_ENDPOINT) stops the stage within seconds instead of in `datasets`' retries."""
    import http.server
    import threading

    class NotTheHub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotTheHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        start = time.monotonic()
        with pytest.raises(RadialError, match=r"did not serve openai/gsm8k.*data\.local_dir"):
            data.load_task("gsm8k", None, hub_timeout=2)
        assert time.monotonic() - start < 10
    finally:
        server.shutdown()


# --- the command line ----------------------------------------------------------------------------


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    full_env = {**os.environ, **offline, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "radial", "data", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_cli_writes_splits_and_meta(tmp_path, shared_data):
    out = tmp_path / "data" / "arc_challenge"
    result = _run_cli("--task", "arc_challenge", "--local-dir", str(shared_data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task"] == "arc_challenge"
    assert meta["source"] == f"local:{shared_data.resolve()}"
    assert meta["counts"] == {"train": 1119, "validation": 299, "test": 1172}
    validation = read_jsonl(out / "validation.jsonl")
    assert len(validation) == 299 and validation == _load("arc_challenge", shared_data)["validation"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["arc_challenge"]  # no temp dirs left


def test_cli_offline_without_local_dir_fails_fast_and_writes_nothing(tmp_path):
    out = tmp_path / "gsm8k"
    start = time.monotonic()
    result = _run_cli("--task", "gsm8k", "--out", str(out))
    assert time.monotonic() - start < 30  # interpreter + wandb start-up; the Hub check itself is instant
    assert result.returncode == 2
    assert "data.local_dir" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_failing_cli_keeps_an_existing_output_untouched(tmp_path):
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Easy-Train.csv").write_text(ARC_HEADER + _arc_line("Q1", "Z", "Pick (A) x (B) y"))
    out = tmp_path / "out" / "arc_easy"
    out.mkdir(parents=True)
    (out / "train.jsonl").write_text("previous\n")
    result = _run_cli("--task", "arc_easy", "--local-dir", str(tmp_path), "--out", str(out))
    assert result.returncode == 2
    assert "ARC-Easy-Train.csv:2: AnswerKey 'Z'" in result.stderr
    assert (out / "train.jsonl").read_text() == "previous\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["arc_easy"]

