"""A wandb Report of one workflow run, built with wandb-workspaces from the runs the stages logged.

Every stage logs a run in the wandb group named by `run_name` (radial.tracking). The Report shows,
for that group: the comparison table (accuracy, executed layers, speedup per variant and task), the
Pareto plot, the per-subtask table (synthetic levels, MMLU subjects), the equal-depth table and each
training stage's curves. Its run sets are filtered on the group (and, for the report's own tables,
on the report job), so two experiments in one project never mix.

Runs logged offline must be synced first (`wandb sync wandb/offline-run-*`); the workflow runs this
stage itself after the report when `wandb.mode` is `online`. `--dry-run` builds the Report and
prints what it holds without contacting wandb.
"""

from __future__ import annotations

import argparse
import os

from radial import settings
from radial.tracking import PROJECT
from radial.utils import RadialError

# What the report stage logs (radial.stages.report): summary tables and the Pareto image.
COMPARISON_TABLES = {
    "results": "Accuracy, executed layers and paired speedup per variant and task",
    "subtasks": "Per subtask: synthetic levels, MMLU subjects",
    "equal_depth": "At equal average depth: each routed variant against its static counterpart",
}
PARETO_IMAGE = "pareto"
# Each training stage's curves: (job type, title, keys logged by radial.training.loop or the stage).
TRAINING_CURVES = (
    ("base_model", "Pre-training", ["train/loss"]),
    ("routers", "Dr.LLM routers", ["routers/loss", "routers/val_macro_f1"]),
    ("distill", "Radial distillation", ["distill/kl", "distill/executed_fraction"]),
    ("soft", "SoFT sorted fine-tuning", ["soft/loss"]),
    ("dlo", "DLO fine-tuning", ["dlo/loss"]),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_setting(parser, "wandb.entity", flag="--entity",
                         help="wandb user or team owning the project (default: $WANDB_ENTITY)")  # fmt: skip
    parser.add_argument("--project", default=os.environ.get("WANDB_PROJECT", PROJECT),
                        help="wandb project the stages logged to (default: $WANDB_PROJECT or radial)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="build the Report and describe it; save nothing")
    settings.add_setting(parser, "run_name")


def build_report(run_name: str, entity: str, project: str = PROJECT):
    """The Report object (not saved): blocks and run sets for the runs of group `run_name`."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    def runset(name: str, *conditions) -> wr.Runset:
        return wr.Runset(entity=entity, project=project, name=name,
                         filters=expr.And(expr.Metric("Group") == run_name, *conditions))  # fmt: skip

    report_job = runset(f"{run_name}: report", expr.Metric("JobType") == "report")
    blocks = [
        wr.P(f"Runs of the workflow run '{run_name}' (wandb group '{run_name}'), as its report.md shows them."),
        wr.H2("Comparison"),
        wr.UnorderedList(items=[f"{name}: {text}" for name, text in COMPARISON_TABLES.items()]),
        wr.PanelGrid(
            runsets=[report_job],
            panels=[wr.WeavePanelSummaryTable(table_name=name) for name in COMPARISON_TABLES]
            + [wr.MediaBrowser(title="Accuracy against executed layers", media_keys=[PARETO_IMAGE])],
        ),
        wr.H2("Training"),
    ]
    for job_type, title, keys in TRAINING_CURVES:
        blocks += [
            wr.H3(title),
            wr.PanelGrid(
                runsets=[runset(f"{run_name}: {job_type}", expr.Metric("JobType") == job_type)],
                panels=[wr.LinePlot(title=key, x="Step", y=[key]) for key in keys],
            ),
        ]
    return wr.Report(
        entity=entity,
        project=project,
        title=f"radial: {run_name}"[:128],
        description="Dynamic-depth variants against the dense model: accuracy, executed layers, speed.",
        blocks=blocks,
    )


def describe(report) -> list[str]:
    """One line per block: what a reader will find, and which runs each grid shows."""
    import wandb_workspaces.reports.v2 as wr

    lines = [f"{report.title} ({report.entity}/{report.project})"]
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            panels = ", ".join(
                getattr(panel, "table_name", None) or ", ".join(getattr(panel, "media_keys", []) or [])
                or ", ".join(map(str, getattr(panel, "y", []) or []))
                for panel in block.panels
            )
            filters = "; ".join(str(runset.filters) for runset in block.runsets)
            lines.append(f"  grid [{panels}] over runs where {filters}")
        elif hasattr(block, "text"):
            lines.append(f"  {type(block).__name__}: {block.text}")
    return lines


def main(args: argparse.Namespace) -> int:
    args.entity = args.entity or os.environ.get("WANDB_ENTITY")
    if not args.entity and not args.dry_run:
        raise RadialError("--entity (or $WANDB_ENTITY) is required to save a Report: the wandb user or team")
    report = build_report(args.run_name, args.entity or "your-entity", args.project)
    print("\n".join(describe(report)))
    if args.dry_run:
        return 0
    try:
        report.save()
    except Exception as error:  # noqa: BLE001 - network, login, permissions: one line, not a traceback
        raise RadialError(f"could not save the Report to {args.entity}/{args.project}: {error}") from None
    print(f"wandb-report: {report.url}")
    return 0
