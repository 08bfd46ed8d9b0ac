"""Report stage: every evaluated variant x task in one table, with the profiling plots.

Reads the evaluation JSONs written by `radial evaluate`, the profiling folder, the base
model's `radial_base.json` and the MCTS stage's `stats.json`; writes `report.md`, `table.csv`,
`subtasks.csv` (synthetic levels, MMLU subjects), `equal_depth.csv`, `pareto.png` and copies of
the plots beside them, and logs the tables to wandb. The comparison of methods (what was run,
the accuracy-depth-speed table, the Pareto plot, the equal-depth pairs, findings and limits)
comes from radial.comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import pandas as pd

from radial import comparison, settings, tracking
from radial.utils import RadialError, atomic_path

TABLE_COLUMNS = [
    "variant",
    "task",
    "metric",
    "accuracy",
    "accuracy_stderr",
    "avg_executed_layers",
    "num_layers",
    "wall_time_s",
    "forward_time_s",
    "forward_tokens",
    "speedup_vs_dense",
    "speedup_measured",
    "speedup_q1",
    "speedup_q3",
    "ideal_speedup",
    "timed_padding_share",
    "timing_contended",
    "n_examples",
]
# Table columns read from an evaluation's paired timing (its "timing" record), by their key there.
FROM_TIMING = {
    "paired_speedup": "speedup",
    "ideal_speedup": "ideal_speedup",
    "timed_padding_share": "padding_share",
    "timing_contended": "contended",
}
REQUIRED_FIELDS = (
    "variant",
    "task",
    "metric",
    "accuracy",
    "avg_executed_layers",
    "num_layers",
    "wall_time_s",
    "forward_time_s",
    "forward_tokens",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluations", nargs="+", required=True, help="evaluation JSON files")
    parser.add_argument("--profile", type=Path, help="profiling output folder (plots and summary.json)")
    parser.add_argument("--base-model", type=Path, help="base model folder (radial_base.json, loss.png)")
    parser.add_argument("--mcts-stats", type=Path, help="the MCTS stage's stats.json (layers_saved.png beside it)")
    parser.add_argument("--depth-trend", type=Path, help="the depth-trend stage's folder (trend.md, trend.png)")
    parser.add_argument("--out-dir", type=Path, required=True, help="where report.md and table.csv go")
    settings.add_common_arguments(parser)


def load_evaluations(paths: list[str | Path]) -> list[dict]:
    evaluations = []
    for path in paths:
        try:
            evaluation = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise RadialError(f"evaluation file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise RadialError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        missing = [field for field in REQUIRED_FIELDS if field not in evaluation]
        if missing:
            raise RadialError(f"{path}: evaluation lacks {', '.join(missing)}")
        evaluations.append(evaluation)
    return evaluations


def build_table(evaluations: list[dict]) -> pd.DataFrame:
    """One row per evaluation, with the variant's speedup over dense on the task.

    `speedup_measured` says how: "paired" where the evaluation timed the variant against the dense
    model in its own process (`radial evaluate --reference-model`, what the workflow runs: the
    median over alternating rounds on the same lm-eval batches); else "throughput": the variant's
    tokens per second of model forward time in its evaluation over dense's in dense's evaluation.
    Separate processes vary by 10-30 % at the embedded model's size, so throughput ratios are rough.
    """
    derived = ("speedup_vs_dense", "speedup_measured", "speedup_q1", "speedup_q3", *FROM_TIMING)
    own_columns = [column for column in TABLE_COLUMNS if column not in derived]
    rows = []
    for e in evaluations:
        row = {c: e.get(c) for c in own_columns}
        timing = e.get("timing") or {}
        q1, q3 = _quartiles(timing.get("round_ratios") or [])
        from_timing = {column: timing.get(key) for column, key in FROM_TIMING.items()}
        rows.append(row | from_timing | {"speedup_q1": q1, "speedup_q3": q3})
    table = pd.DataFrame(rows)
    throughput = table.forward_tokens / table.forward_time_s.where(table.forward_time_s > 0)
    dense_throughput = dict(zip(table.task[table.variant == "dense"], throughput[table.variant == "dense"]))
    by_throughput = [
        rate / dense_throughput[task] if task in dense_throughput and pd.notna(rate) else None
        for task, rate in zip(table.task, throughput)
    ]
    paired = table.paired_speedup.notna()
    table["speedup_vs_dense"] = table.paired_speedup.where(paired, pd.Series(by_throughput, dtype=float))
    table["speedup_measured"] = ["paired" if p else ("throughput" if pd.notna(s) else None)
                                 for p, s in zip(paired, by_throughput)]
    return table[TABLE_COLUMNS].sort_values(["task", "variant"]).reset_index(drop=True)


def _quartiles(ratios: list[float]) -> tuple[float | None, float | None]:
    """The first and third quartiles of a paired timing's round ratios: the spread of the median
    speedup's rounds within its process (None for fewer than 4 rounds)."""
    if len(ratios) < 4:
        return None, None
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def subtask_table(evaluations: list[dict]) -> pd.DataFrame:
    rows = [
        {"variant": e["variant"], "task": e["task"], "subtask": name, "accuracy": accuracy}
        for e in evaluations
        for name, accuracy in sorted((e.get("subtasks") or {}).items())
    ]
    return pd.DataFrame(rows, columns=["variant", "task", "subtask", "accuracy"])


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def render(
    run_name: str,
    table: pd.DataFrame,
    subtasks: pd.DataFrame,
    base_info: dict | None,
    profile_summary: dict | None,
    images: dict[str, str],
    comparison_lines: list[str] | None = None,
    mcts_stats: dict | None = None,
    depth_trend: str | None = None,
) -> str:
    lines = [f"# radial report: {run_name}", ""]
    if base_info:
        lines += [
            "## Base model",
            "",
            f"- source: `{base_info.get('source')}`, {base_info.get('num_layers')} layers, "
            f"{base_info.get('num_parameters', 0):,} parameters",
        ]
        if base_info.get("synthetic_accuracy"):
            chance = base_info.get("chance") or {}
            levels = ", ".join(
                f"L{k}: {v:.2f}" + (f" (chance {chance[k]:.2f})" if isinstance(chance, dict) and k in chance else "")
                for k, v in sorted(base_info["synthetic_accuracy"].items())
            )
            lines.append(f"- synthetic accuracy after pre-training by level: {levels}")
        if "loss" in images:
            lines += ["", f"![pre-training loss]({images['loss']})"]
        lines.append("")
    lines += [
        "## Results",
        "",
        "Accuracy is lm-eval's headline metric for the task; layers are decoder layers executed per forward "
        "pass on average; wall time is the whole evaluation (model loading excluded), forward time the part of it "
        "spent in the model's forward calls, which processed forward_tokens tokens (padding included); speedup is "
        "measured as `speedup_measured` says: paired (the variant timed against dense in one process on the "
        "task's first lm-eval batches, alternating rounds, median ratio) or throughput (tokens per second of "
        "forward time, from separate evaluations).",
        "",
        *contention_lines(table),
        *(comparison_lines + ["### Every variant × task", ""] if comparison_lines else []),
        _markdown(table),
        "",
    ]
    levels = subtasks[subtasks.task == "synthetic"]
    if not levels.empty:
        wide = levels.pivot(index="variant", columns="subtask", values="accuracy")
        wide = wide.loc[sorted(wide.index, key=comparison.variant_sort_key)].reset_index()
        lines += ["### Synthetic task by difficulty level", "", _markdown(wide), ""]
    if (subtasks.task != "synthetic").any():
        lines += ["Scores of the other tasks' subtasks (MMLU subjects, the tasks of a group) are in `subtasks.csv`.", ""]
    if mcts_stats:
        lines += mcts_section(mcts_stats, images.get("mcts"))
    if profile_summary or images.keys() & {"heatmap", "layers"}:
        lines += ["## Residual profile", ""]
        if profile_summary:
            lines.append(
                f"{profile_summary.get('n_examples')} calibration examples, {profile_summary.get('n_tokens')} tokens."
            )
            lines.append("")
        for key, title in (("layers", "per-layer statistics"), ("heatmap", "residual ratio by layer and position")):
            if key in images:
                lines += [f"![{title}]({images[key]})", ""]
    if depth_trend:
        lines += [
            "## Depth trend (Radial Networks)",
            "",
            "The models of `profile.models`, profiled on the same calibration text: each block's median "
            "residual contribution ‖f(x)‖/‖x+f(x)‖, per layer and over layers, against depth and size.",
            "",
            depth_trend.strip(),
            "",
        ]
        if "depth_trend" in images:
            lines += [f"![residual contribution against depth]({images['depth_trend']})", ""]
    return "\n".join(lines)


def contention_lines(table: pd.DataFrame) -> list[str]:
    """A warning naming the evaluations whose paired timing ran beside other work (load above their threads)."""
    contended = table[table.timing_contended.fillna(False).astype(bool)]
    if contended.empty:
        return []
    cells = ", ".join(f"{v}/{t}" for v, t in zip(contended.variant, contended.task))
    return [
        f"**Timed under load** (the machine's load average exceeded the evaluation's threads + 1.5 during its "
        f"paired timing, so something else ran beside it and these speedups are not trustworthy): {cells}. "
        "Re-run them alone (`snakemake --forcerun evaluate`).",
        "",
    ]


def mcts_section(stats: dict, image: str | None) -> list[str]:
    """What the MCTS search found: the labels the Dr.LLM routers were trained on."""
    counts = stats.get("class_counts", {})
    lines = [
        "## MCTS labels (router supervision)",
        "",
        f"{stats['examples']} training examples searched. The default path (every layer once) answered "
        f"{stats['default_accuracy']:.1%} of them correctly, the labelled paths {stats['label_accuracy']:.1%}; "
        f"{stats['fraction_improved']:.1%} improved on the default, saving {stats['mean_layers_saved']:.2f} of "
        f"{stats['num_layers']} layers on average after {stats['mean_simulations']:.1f} simulations. "
        f"Per-layer labels: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()) + ".",
    ]
    if stats.get("eval_reduction"):
        lines[-1] += (
            f" Prefix sharing: {stats['block_evaluations']:,} block evaluations, {stats['eval_reduction']:.2f}x "
            "fewer than evaluating every simulated path from scratch."
        )
    label_set = stats.get("label_set")
    if label_set:
        kept_counts = label_set.get("class_counts_kept", {})
        lines += [
            "",
            f"Label set (what the routers train on): {label_set['kept']:,} of {label_set['searched']:,} examples kept. "
            f"Dropped: {label_set['dropped_no_correct_path']:,} for which no path answered correctly (no supervision), "
            f"and {label_set['dropped_for_enrichment']:,} that did not improve on the default, so that at least "
            f"{label_set['improved_share_target']:.0%} of the set improved on it (Dr.LLM's enrichment; "
            f"`mcts.improved_share`). Improved share {label_set['improved_share_searched']:.1%} searched, "
            f"{label_set['improved_share_kept']:.1%} kept; {label_set['mean_layers_saved_kept']:.2f} layers saved on average. "
            "Per-layer labels kept: " + ", ".join(f"{name} {count:,}" for name, count in kept_counts.items()) + ".",
        ]
    rows = [
        [name, group["examples"], group["default_accuracy"], group["label_accuracy"], group["mean_layers_saved"],
         group["mean_simulations"]]
        for name, group in stats.get("by_group", {}).items()
    ]
    if rows:
        columns = ["group", "examples", "default accuracy", "label accuracy", "layers saved", "simulations"]
        lines += ["", _markdown(pd.DataFrame(rows, columns=columns))]
    if image:
        lines += ["", f"![layers saved per difficulty level and per-layer labels]({image})"]
    return lines + [""]


def main(args: argparse.Namespace) -> int:
    evaluations = load_evaluations(args.evaluations)
    table = comparison.with_methods(build_table(evaluations))
    subtasks = subtask_table(evaluations)
    equal_depth = comparison.equal_depth_comparison(table)

    base_info = None
    if args.base_model and (args.base_model / "radial_base.json").exists():
        base_info = json.loads((args.base_model / "radial_base.json").read_text())
    profile_summary = None
    if args.profile and (args.profile / "summary.json").exists():
        profile_summary = json.loads((args.profile / "summary.json").read_text())

    depth_trend = None
    if args.depth_trend:
        if not (args.depth_trend / "trend.md").is_file():
            raise RadialError(f"--depth-trend: {args.depth_trend / 'trend.md'} not found (run the depth-trend stage)")
        depth_trend = (args.depth_trend / "trend.md").read_text()

    mcts_stats = None
    if args.mcts_stats:
        if not args.mcts_stats.is_file():
            raise RadialError(f"--mcts-stats: {args.mcts_stats} not found (run the mcts stage)")
        mcts_stats = json.loads(args.mcts_stats.read_text())

    args.out_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "loss": args.base_model / "loss.png" if args.base_model else None,
        "heatmap": args.profile / "heatmap.png" if args.profile else None,
        "layers": args.profile / "layers.png" if args.profile else None,
        "mcts": args.mcts_stats.parent / "layers_saved.png" if args.mcts_stats else None,
        "depth_trend": args.depth_trend / "trend.png" if args.depth_trend else None,
    }
    images = {}
    for key, source in sources.items():
        if source is not None and source.exists():
            with atomic_path(args.out_dir / f"{key}.png") as tmp:
                shutil.copyfile(source, tmp)
            images[key] = f"{key}.png"

    with atomic_path(args.out_dir / "pareto.png") as tmp:
        comparison.plot_pareto(table, tmp, f"{args.run_name}: accuracy against average executed layers")
    images["pareto"] = "pareto.png"
    comparison_lines = comparison.results_section(
        table, equal_depth, evaluations, comparison.variant_infos(evaluations), base_info, _markdown, images["pareto"]
    )

    with atomic_path(args.out_dir / "table.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(args.out_dir / "equal_depth.csv") as tmp:
        equal_depth.to_csv(tmp, index=False)
    with atomic_path(args.out_dir / "subtasks.csv") as tmp:
        subtasks.to_csv(tmp, index=False)
    with atomic_path(args.out_dir / "report.md") as tmp:
        tmp.write_text(
            render(
                args.run_name, table, subtasks, base_info, profile_summary, images, comparison_lines, mcts_stats,
                depth_trend,
            )
        )

    with tracking.stage_run("report", args) as run:
        import wandb

        run.log({"results": wandb.Table(dataframe=table)})
        if not equal_depth.empty:
            run.log({"equal_depth": wandb.Table(dataframe=equal_depth)})
        if not subtasks.empty:
            run.log({"subtasks": wandb.Table(dataframe=subtasks)})
        for key in images:
            tracking.log_image(run, key, args.out_dir / images[key])
        tracking.log_artifact(run, f"report-{args.run_name}", "report", [args.out_dir / "report.md", args.out_dir / "table.csv"])
    print(f"wrote {args.out_dir / 'report.md'} ({len(table)} rows)")
    return 0
