"""The depth-trend stage on hand-written profile summaries, and its section in the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_report import _evaluation, _write

from radial.__main__ import main as radial_main


def write_profile(folder, medians, parameters):
    folder.mkdir(parents=True)
    metrics = {"residual_ratio": {"median": medians, "q1": medians, "q3": medians, "mean": medians}}
    (folder / "summary.json").write_text(json.dumps({"num_parameters": parameters, "metrics": metrics}))
    return folder


def test_trend_orders_models_by_size_and_says_whether_the_contribution_falls(tmp_path, capsys):
    profiles = [
        write_profile(tmp_path / "deep", [1.0, 0.1, 0.08, 0.06, 0.05, 0.07], 3_000_000),
        write_profile(tmp_path / "shallow", [1.0, 0.3, 0.2], 1_000_000),
        write_profile(tmp_path / "middle", [1.0, 0.2, 0.1, 0.12], 2_000_000),
    ]
    out = tmp_path / "trend"
    assert radial_main(["depth-trend", "--profiles", *map(str, profiles), "--out", str(out), "--wandb-mode", "disabled"]) == 0
    table = pd.read_csv(out / "trend.csv")
    assert table.model.tolist() == ["shallow", "middle", "deep"] and table.layers.tolist() == [3, 4, 6]
    assert table["median"].tolist() == pytest.approx([0.3, 0.16, 0.075])
    assert table.median_after_first.tolist() == pytest.approx([0.25, 0.12, 0.07])
    per_layer = pd.read_csv(out / "per_layer.csv")
    assert len(per_layer) == 13 and per_layer.relative_depth.max() < 1
    text = (out / "trend.md").read_text()
    assert "| deep | 6 | 3.00 M | 0.075 | 0.070 |" in text
    assert "the median contribution falls: 0.300 → 0.160 → 0.075" in text
    assert (out / "trend.png").stat().st_size > 10_000


def test_a_trend_that_rises_is_reported_as_such(tmp_path):
    profiles = [write_profile(tmp_path / "a", [0.1, 0.1], 1), write_profile(tmp_path / "b", [0.2, 0.3, 0.2], 2)]
    out = tmp_path / "trend"
    assert radial_main(["depth-trend", "--profiles", *map(str, profiles), "--out", str(out), "--wandb-mode", "disabled"]) == 0
    assert "does not fall monotonically: 0.100 → 0.200" in (out / "trend.md").read_text()


def test_a_folder_without_a_profile_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["depth-trend", "--profiles", str(tmp_path / "empty"), "--out", str(tmp_path / "t"), "--wandb-mode", "disabled"]
    assert radial_main(argv) == 2
    assert f"{tmp_path / 'empty' / 'summary.json'}: not found" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_the_report_carries_the_depth_trend(tmp_path):
    profiles = [write_profile(tmp_path / "s", [1.0, 0.3], 1_000_000), write_profile(tmp_path / "l", [1.0, 0.1, 0.1], 2_000_000)]
    trend = tmp_path / "report" / "depth_trend"
    assert radial_main(["depth-trend", "--profiles", *map(str, profiles), "--out", str(trend), "--wandb-mode", "disabled"]) == 0
    evaluations = _write(tmp_path, [_evaluation("dense", "synthetic", 0.8, 12, 10.0)])
    argv = ["report", "--evaluations", *evaluations, "--depth-trend", str(trend), "--out-dir", str(tmp_path / "report"),
            "--wandb-mode", "disabled"]  # fmt: skip
    assert radial_main(argv) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Depth trend (Radial Networks)" in report and "| l | 3 | 2.00 M | 0.100 | 0.100 |" in report
    assert "![residual contribution against depth](depth_trend.png)" in report
    assert (tmp_path / "report" / "depth_trend.png").is_file()
