"""The report stage on hand-written evaluation files."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from radial.report import build_table, load_evaluations
from radial.utils import RadialError


def _evaluation(variant, task, accuracy, layers, wall_time, subtasks=None):
    return {
        "variant": variant, "task": task, "metric": "acc", "accuracy": accuracy, "accuracy_stderr": 0.01,
        "avg_executed_layers": layers, "num_layers": 12, "wall_time_s": wall_time, "n_examples": 10,
        "subtasks": subtasks or {},
    }


def _write(tmp_path, evaluations):
    paths = []
    for e in evaluations:
        path = tmp_path / f"{e['variant']}-{e['task']}.json"
        path.write_text(json.dumps(e))
        paths.append(str(path))
    return paths


def test_speedup_is_dense_time_over_variant_time():
    table = build_table([
        _evaluation("dense", "arc_easy", 0.5, 12, 10.0),
        _evaluation("routed", "arc_easy", 0.45, 8, 5.0),
        _evaluation("dense", "synthetic", 0.8, 12, 4.0),
    ])
    speedups = table.set_index(["variant", "task"]).speedup_vs_dense
    assert speedups["routed", "arc_easy"] == pytest.approx(2.0)
    assert speedups["dense", "synthetic"] == pytest.approx(1.0)


def test_incomplete_evaluation_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"variant": "dense", "task": "arc_easy"}))
    with pytest.raises(RadialError, match="bad.json.*accuracy"):
        load_evaluations([bad])


def test_report_cli_writes_markdown_and_csv(tmp_path):
    paths = _write(tmp_path, [
        _evaluation("dense", "arc_easy", 0.31, 12, 3.0),
        _evaluation("dense", "synthetic", 0.7, 12, 2.0, {"level1": 0.95, "level5": 0.4}),
        _evaluation("dense", "mmlu", 0.26, 12, 9.0, {"anatomy": 0.3, "virology": 0.2}),
    ])
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "radial", "report", "--evaluations", *paths, "--out-dir", str(out),
                    "--run-name", "unit"], check=True, capture_output=True)
    table = pd.read_csv(out / "table.csv")
    assert list(table.task) == ["arc_easy", "mmlu", "synthetic"]
    assert table.accuracy.tolist() == [0.31, 0.26, 0.7]
    report = (out / "report.md").read_text()
    assert "# radial report: unit" in report
    assert "| dense | arc_easy | acc | 0.310 |" in report
    assert "| variant | level1 | level5 |" in report and "| dense | 0.950 | 0.400 |" in report
    assert "virology" not in report  # MMLU subjects go to subtasks.csv, not the page
    subtasks = pd.read_csv(out / "subtasks.csv")
    assert set(subtasks.subtask) == {"level1", "level5", "anatomy", "virology"}
