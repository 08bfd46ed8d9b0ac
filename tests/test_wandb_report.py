"""The wandb Report of a run, built offline: its blocks, what they show, and which runs they filter."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import wandb_workspaces.reports.v2 as wr
from test_report import _evaluation, _write

from radial import tracking
from radial.__main__ import main as radial_main
from radial.stages import wandb_report


def grids(report) -> list:
    return [block for block in report.blocks if isinstance(block, wr.PanelGrid)]


def test_report_shows_the_runs_comparison_and_each_training_stage_of_its_group_only():
    report = wandb_report.build_report("exp-7", "team", "radial")
    assert (report.entity, report.project, report.title) == ("team", "radial", "radial: exp-7")
    comparison, *training = grids(report)
    tables = [panel.table_name for panel in comparison.panels if isinstance(panel, wr.WeavePanelSummaryTable)]
    assert tables == ["results", "subtasks", "equal_depth"]
    assert [panel.media_keys for panel in comparison.panels if isinstance(panel, wr.MediaBrowser)] == [["pareto"]]
    assert comparison.runsets[0].filters == "Metric(\"Group\") == 'exp-7' and Metric(\"JobType\") == 'report'"
    plotted = {}
    for grid in training:
        group, job = grid.runsets[0].filters.split(" and ")
        assert group == "Metric(\"Group\") == 'exp-7'"  # another experiment's runs never show
        plotted[job] = [y for panel in grid.panels for y in panel.y]
    assert plotted["Metric(\"JobType\") == 'distill'"] == ["distill/kl", "distill/executed_fraction"]
    assert set(plotted) == {f"Metric(\"JobType\") == '{job}'" for job in ("base_model", "routers", "distill", "soft", "dlo")}


def test_the_comparison_panels_name_what_the_report_stage_logs(tmp_path, monkeypatch):
    logged = []

    class Run:
        summary: dict = {}

        def log(self, values, step=None):
            logged.extend(values)

        def log_artifact(self, artifact):
            pass

    @contextlib.contextmanager
    def stage_run(stage, args, config=None):
        assert stage == "report"
        yield Run()

    monkeypatch.setattr(tracking, "stage_run", stage_run)
    evaluations = [_evaluation("dense", "synthetic", 0.8, 12, 10.0, subtasks={"level_1": 0.9}),
                   _evaluation("shortgpt-k4", "synthetic", 0.6, 8, 7.0, subtasks={"level_1": 0.7}),
                   _evaluation("dlo-c0.25", "synthetic", 0.7, 9, 8.0, subtasks={"level_1": 0.8})]  # fmt: skip
    argv = ["report", "--evaluations", *_write(tmp_path, evaluations), "--out-dir", str(tmp_path / "report")]
    assert radial_main(argv) == 0
    comparison = grids(wandb_report.build_report("default", "team"))[0]
    shown = [getattr(panel, "table_name", None) or panel.media_keys[0] for panel in comparison.panels]
    assert set(shown) <= set(logged), set(shown) - set(logged)


def test_cli_describes_the_report_offline_and_needs_an_entity_to_save(monkeypatch):
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    dry = subprocess.run([sys.executable, "-m", "radial", "wandb-report", "--run-name", "exp-7", "--dry-run"],
                         capture_output=True, text=True)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "grid [results, subtasks, equal_depth, pareto] over runs where Metric(\"Group\") == 'exp-7'" in dry.stdout
    save = subprocess.run([sys.executable, "-m", "radial", "wandb-report", "--run-name", "exp-7"],
                          capture_output=True, text=True)  # fmt: skip
    assert save.returncode == 2 and "Traceback" not in save.stderr
    assert save.stderr.strip() == (
        "radial wandb-report: error: --entity (or $WANDB_ENTITY) is required to save a Report: the wandb user or team"
    )
