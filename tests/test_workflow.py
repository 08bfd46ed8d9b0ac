"""The Snakemake workflow itself: lint-clean, and the tiny config runs end to end, then is complete."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import PROJECT_ROOT, write_user_tasks
from radial.variants import evaluation_variants

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(PROJECT_ROOT / "Snakefile")]
TINY_CONFIG = str(PROJECT_ROOT / "tests/workflow/config.yaml")


@pytest.mark.slow
def test_lint_is_clean():
    result = subprocess.run([*SNAKEMAKE, "--lint"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tmp_path):
    # The tiny config, plus a task of the user's own (none of radial's five) through evaluate.include_path.
    tiny_config = yaml.safe_load(open(TINY_CONFIG))
    tiny_config["evaluate"]["tasks"].append("toy_parity")
    tiny_config["evaluate"]["include_path"] = str(write_user_tasks(tmp_path / "my-tasks"))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config))
    run = [*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(config_file)]
    result = subprocess.run([*run, "--cores", "2"], capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-5000:]

    report = tmp_path / "results/embedded/report"
    table = pd.read_csv(report / "table.csv")
    variants = evaluation_variants(tiny_config)
    assert {"dense", "shortgpt-k2", "soft-exit2", "soft-conf0.5", "dlo-c0.25"} <= set(variants)  # the baselines' sweeps
    assert sorted(zip(table.variant, table.task)) == sorted(
        (v, t) for v in variants for t in tiny_config["evaluate"]["tasks"]
    )
    assert table.accuracy.between(0, 1).all()
    user_task = table[table.task == "toy_parity"]
    assert (user_task.metric == "acc_norm").all() and (user_task.n_examples == 4).all()  # its YAML's first metric
    layers = table.groupby("variant").avg_executed_layers
    assert (layers.min()[["dense"]] == 4).all() and (layers.max()[["shortgpt-k2", "soft-exit2"]] == 2).all()
    assert layers.min()[["soft-conf0.5", "dlo-c0.25"]].between(0, 4).all()
    assert (report / "pareto.png").stat().st_size > 0
    assert (table.wall_time_s > table.forward_time_s).all() and (table.forward_time_s > 0).all()
    assert (table.forward_tokens > 0).all() and table.speedup_vs_dense.notna().all()
    assert (table.speedup_measured == "paired").all()  # every variant timed against dense in its own job
    markdown = (report / "report.md").read_text()
    assert "toy_parity 4 examples (0-shot, acc_norm)" in markdown
    assert "![residual ratio by layer and position](heatmap.png)" in markdown
    assert (report / "heatmap.png").stat().st_size > 0
    mcts_stats = json.loads((tmp_path / "results/embedded/mcts/stats.json").read_text())
    assert f"{mcts_stats['examples']} training examples searched" in markdown  # the routers' labels, described
    assert mcts_stats["naive_block_evaluations"] > mcts_stats["block_evaluations"] > 0
    assert (report / "mcts.png").stat().st_size > 0

    base = json.loads((tmp_path / "results/embedded/models/dense/radial_base.json").read_text())
    assert base["num_layers"] == 4 and len(base["synthetic_accuracy"]) == 5
    for stage_log in ("logs/embedded/base_model.log", "logs/embedded/profile.log", "logs/embedded/report.log"):
        assert (tmp_path / stage_log).exists()

    # A second run has nothing to do: every output is cached and up to date.
    again = subprocess.run([*run, "--cores", "2", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
