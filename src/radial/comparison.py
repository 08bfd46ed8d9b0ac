"""The comparison part of the report: methods, the accuracy-depth Pareto plot, equal-depth pairs, prose.

Variant names say which method made them (radial.variants): `dense`, `shortgpt-k{k}`,
`soft-exit{n}`, `soft-conf{t}`, `dlo-c{c}`, `routers`/`routers-b{bias}`, `radial`/`radial-b{bias}`, and
any other name is its own method (its prefix before the first "-"). A method evaluated at several
points of its knob is drawn as a curve (dotted), every point compared at its own depth. Two
baselines are *static curves*: ShortGPT
(pruned depth L−k, with dense as k = 0) and SoFT's fixed exits, one accuracy per depth. Every
other non-dense variant (routed models, SoFT's confidence exit, DLO) is compared with those curves
at its own measured average depth, the curve's accuracy interpolated linearly between the two
evaluated depths around it (never extrapolated).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from radial.variant_folders import VARIANT_INFO
from radial.variants import knob_setting


@dataclass(frozen=True)
class Method:
    label: str
    marker: str
    color: str


METHODS = {
    "dense": Method("dense", "*", "black"),
    "shortgpt": Method("ShortGPT pruning", "s", "C0"),
    "soft-exit": Method("SoFT fixed exit", "o", "C1"),
    "soft-conf": Method("SoFT confidence exit", "D", "C2"),
    "dlo": Method("DLO-style skip", "^", "C3"),
    "routers": Method("Dr.LLM routers", "P", "C4"),
    "radial": Method("radial (distilled, token-routed)", "X", "C5"),
    "radial-reuse": Method("radial with reuse (token-routed between layers)", "v", "C6"),
}
STATIC_CURVES = ("shortgpt", "soft-exit")
BASELINES = ("shortgpt", "soft-exit", "soft-conf", "dlo")
# From this share of padding in the timed batches, the realized-against-ideal cell says so.
NOTABLE_PADDING = 0.05
_PATTERNS = [
    ("shortgpt", re.compile(r"^shortgpt-k(\d+)$")),
    ("soft-exit", re.compile(r"^soft-exit(\d+)$")),
    ("soft-conf", re.compile(r"^soft-conf([\d.]+)$")),
    ("dlo", re.compile(r"^dlo(?:-c([\d.]+))?$")),
    ("routers", re.compile(r"^routers(?:-b([-\d.]+))?$")),
    ("radial-reuse", re.compile(r"^radial-reuse$")),
]
TASK_LABELS = {
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "gsm8k": "GSM8K",
    "mmlu": "MMLU",
    "synthetic": "synthetic",
}


def method_of(variant: str) -> str:
    if variant == "dense":
        return "dense"
    for method, pattern in _PATTERNS:
        if pattern.match(variant):
            return method
    return variant.split("-")[0]


def method_label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def variant_sort_key(variant: str) -> tuple:
    """dense first, then the methods in METHODS order (others after), each by its parameter."""
    method = method_of(variant)
    rank = list(METHODS).index(method) if method in METHODS else len(METHODS)
    number = re.findall(r"(?<=-b)-?[\d.]+$|[\d.]+$", variant)  # routers-b-1: -1
    try:
        parameter = float(number[0]) if number else 0.0
    except ValueError:
        parameter = 0.0
    if method == "soft-exit":
        parameter = -parameter  # deepest exit first, next to dense
    return rank, method, parameter, variant


def with_methods(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `method` column, rows in variant order within each task."""
    table = table.assign(method=table.variant.map(method_of))
    order = {v: i for i, v in enumerate(sorted(table.variant.unique(), key=variant_sort_key))}
    return table.sort_values(["task", "variant"], key=lambda col: col.map(order) if col.name == "variant" else col)


def variant_infos(evaluations: list[dict]) -> dict[str, dict]:
    """radial_variant.json of each variant's model folder (named in its evaluation), where there is one."""
    infos = {}
    for evaluation in evaluations:
        path = Path(str(evaluation.get("model", ""))) / VARIANT_INFO
        if evaluation["variant"] not in infos and path.is_file():
            infos[evaluation["variant"]] = json.loads(path.read_text())
    return infos


# ---------------------------------------------------------------------------------------------
# Pareto front and equal-depth comparison


def pareto_front(layers: list[float], accuracy: list[float]) -> list[int]:
    """Indices of the points no other point beats on both (fewer or equal layers, higher or equal accuracy)."""
    front = []
    for i, (li, ai) in enumerate(zip(layers, accuracy)):
        dominated = any(
            (lj <= li and aj >= ai) and (lj < li or aj > ai) for j, (lj, aj) in enumerate(zip(layers, accuracy)) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: layers[i])


def curve_points(table: pd.DataFrame, task: str, method: str) -> pd.DataFrame:
    """The static curve's (layers, accuracy) points on one task, by depth; ShortGPT includes dense (k = 0)."""
    rows = table[(table.task == task) & (table.method == method)]
    if method == "shortgpt":
        rows = pd.concat([rows, table[(table.task == task) & (table.method == "dense")]])
    return rows.sort_values("avg_executed_layers")


def equal_depth_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Each dynamic variant against each static curve at the variant's own average depth, per task.

    reference_accuracy is the curve interpolated linearly between its two evaluated depths around
    the variant's depth; None when the depth lies outside the curve's evaluated range.
    """
    table = table if "method" in table else with_methods(table)
    rows = []
    subjects = table[~table.method.isin(("dense", *STATIC_CURVES))]
    for subject in subjects.itertuples():
        for curve in STATIC_CURVES:
            points = curve_points(table, subject.task, curve)
            if points.empty or points.method.eq("dense").all():
                continue
            depths, accuracies = points.avg_executed_layers.to_numpy(float), points.accuracy.to_numpy(float)
            depth = float(subject.avg_executed_layers)
            inside = depths.min() - 1e-9 <= depth <= depths.max() + 1e-9
            reference = float(np.interp(depth, depths, accuracies)) if inside else None
            below = points[points.avg_executed_layers <= depth + 1e-9].tail(1).variant.tolist()
            above = points[points.avg_executed_layers >= depth - 1e-9].head(1).variant.tolist()
            rows.append(
                {
                    "task": subject.task,
                    "variant": subject.variant,
                    "method": subject.method,
                    "avg_executed_layers": depth,
                    "accuracy": float(subject.accuracy),
                    "reference": curve,
                    "reference_accuracy": reference,
                    "accuracy_gain": None if reference is None else float(subject.accuracy) - reference,
                    "bracketed_by": " – ".join(dict.fromkeys(below + above))
                    if inside
                    else f"outside {depths.min():g}–{depths.max():g} layers",
                }
            )
    columns = ["task", "variant", "method", "avg_executed_layers", "accuracy", "reference", "reference_accuracy",
               "accuracy_gain", "bracketed_by"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# Plot


def plot_pareto(table: pd.DataFrame, path: Path, title: str) -> None:
    """Accuracy against average executed layers, one panel per task, every method; the Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table if "method" in table else with_methods(table)
    tasks = list(dict.fromkeys(table.task))
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    methods = sorted(table.method.unique(), key=lambda m: (list(METHODS).index(m) if m in METHODS else len(METHODS), m))
    for ax, task in zip(axes.flat, tasks):
        on_task = table[table.task == task]
        for method in methods:
            style = METHODS.get(method, Method(method, "x", None))
            points = on_task[on_task.method == method]
            if points.empty:
                continue
            if method in STATIC_CURVES:  # the curve over depth (ShortGPT's starts at dense, k = 0)
                curve = curve_points(table, task, method)
                ax.plot(curve.avg_executed_layers, curve.accuracy, linestyle="-", color=style.color, alpha=0.6)
            elif len(points) > 1:  # a dynamic method swept over its knob (thresholds, skip biases)
                curve = points.sort_values("avg_executed_layers")
                ax.plot(curve.avg_executed_layers, curve.accuracy, linestyle=":", color=style.color, alpha=0.8)
            ax.plot(points.avg_executed_layers, points.accuracy, marker=style.marker, linestyle="none",
                    color=style.color, markersize=11 if method == "dense" else 6, label=style.label, alpha=0.9,
                    zorder=4 if method == "dense" else 3)
        front = on_task.iloc[pareto_front(on_task.avg_executed_layers.tolist(), on_task.accuracy.tolist())]
        ax.step(front.avg_executed_layers, front.accuracy, where="post", color="gray", linestyle="--", linewidth=1,
                label="Pareto front")
        ax.set_title(TASK_LABELS.get(task, task), fontsize=10)
        ax.set_xlabel("average executed layers")
        ax.set_ylabel(on_task.metric.iloc[0] if "metric" in on_task else "accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    handles, labels = {}, []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(7, len(handles)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Markdown


def _cell(row) -> str:
    speedup = f"{row.speedup_vs_dense:.2f}×" if pd.notna(row.speedup_vs_dense) else "–"
    return f"{row.accuracy:.3f} · {row.avg_executed_layers:.1f} · {speedup}"


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """Variants as rows, tasks as columns; each cell "accuracy · average layers · speedup"."""
    table = table if "method" in table else with_methods(table)
    variants = sorted(table.variant.unique(), key=variant_sort_key)
    tasks = list(dict.fromkeys(table.task))
    indexed = table.set_index(["variant", "task"])
    rows = []
    for variant in variants:
        row = {"variant": variant, "method": method_label(method_of(variant))}
        for task in tasks:
            row[TASK_LABELS.get(task, task)] = _cell(indexed.loc[(variant, task)]) if (variant, task) in indexed.index else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def equal_depth_wide(equal_depth: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, static baseline), tasks as columns; each cell "accuracy − baseline's (layers)".

    Pairs whose depth lies outside the baseline's evaluated range show "–" (they stay in equal_depth.csv).
    """
    tasks = list(dict.fromkeys(equal_depth.task))
    rows = []
    for (variant, reference), group in equal_depth.groupby(["variant", "reference"], sort=False):
        if group.reference_accuracy.isna().all():
            continue
        row = {"variant": variant, "vs": method_label(reference)}
        by_task = group.set_index("task")
        for task in tasks:
            cell = "–"
            if task in by_task.index and pd.notna(by_task.loc[task, "reference_accuracy"]):
                r = by_task.loc[task]
                cell = f"{r.accuracy:.3f} − {r.reference_accuracy:.3f} = {r.accuracy_gain:+.3f} ({r.avg_executed_layers:.1f} L)"
            row[TASK_LABELS.get(task, task)] = cell
        rows.append(row)
    return pd.DataFrame(rows, columns=["variant", "vs", *[TASK_LABELS.get(t, t) for t in tasks]])


def results_section(
    table: pd.DataFrame,
    equal_depth: pd.DataFrame,
    evaluations: list[dict],
    infos: dict[str, dict],
    base_info: dict | None,
    markdown_table,
    pareto_image: str | None,
) -> list[str]:
    """Markdown lines: what was run, on what and with what limits; the main table; plot; equal depth; findings."""
    table = table if "method" in table else with_methods(table)
    variants = sorted(table.variant.unique(), key=variant_sort_key)
    num_layers = int(table.num_layers.max())
    first = {e["task"]: e for e in evaluations}
    tasks = list(dict.fromkeys(table.task))

    lines = ["### What was run", ""]
    base = base_info.get("source") if base_info else None
    lines.append(
        f"{len(variants)} variants of the {'base model `' + str(base) + '`' if base else 'base model'} "
        f"({num_layers} decoder layers) on {len(tasks)} tasks, each scored by the stock lm-evaluation-harness "
        "in one process per variant (the model loaded once for all its tasks):"
    )
    lines.append("")
    for variant in variants:
        info = infos.get(variant, {})
        description = info.get("description") or ("the base model, every layer" if variant == "dense" else "")
        knob = knob_setting(variant)
        if knob is not None:  # the trained model of its family, evaluated at another point of its knob
            description += f"; evaluated with skip bias {knob[1]:+g} over the saved one (positive: fewer layers)"
        lines.append(f"- `{variant}` ({method_label(method_of(variant))}){': ' + description if description else ''}")
    lines.append("")
    limits = []
    for task in tasks:
        e = first[task]
        n = table[table.task == task].n_examples.max()
        shots = e.get("num_fewshot")
        limits.append(
            f"{TASK_LABELS.get(task, task)} " + (f"{int(n)} examples" if pd.notna(n) else "examples not recorded")
            + (f" ({shots}-shot" if shots else " (0-shot") + f", {e.get('metric', 'score')})"
        )
    any_eval = evaluations[0]
    cuts = [f"{TASK_LABELS.get(task, task)} {first[task]['limit']}" for task in tasks if first[task].get("limit")]
    lines += [
        "Data: " + "; ".join(limits) + "."
        + (f" Tasks cut to their first examples (per MMLU subject and synthetic level): {', '.join(cuts)}." if cuts else "")
        + f" Batch size {any_eval.get('batch_size')}, seed {any_eval.get('seed')}.",
        "",
    ]

    lines += [
        "### Accuracy, depth and speed",
        "",
        "Each cell: accuracy · average decoder layers executed per forward pass · speedup over dense on the same "
        "task, timed against dense in one process on the task's first lm-eval batches (median of alternating "
        "rounds).",
        "",
        markdown_table(wide_table(table)),
        "",
    ]
    if pareto_image:
        lines += [f"![accuracy against average executed layers]({pareto_image})", ""]

    lines += sparse_execution_section(table, markdown_table)
    lines += ["### At equal depth", ""]
    if equal_depth.empty:
        lines += [
            "No dynamic-depth variant (routed model, SoFT confidence exit, DLO) was evaluated together with a static "
            "curve (ShortGPT or SoFT fixed exits), so there is nothing to compare at equal depth.",
            "",
        ]
    else:
        lines += [
            "Each dynamic-depth variant against the static baselines at its own average depth, per task: its accuracy "
            "minus the baseline's, interpolated linearly between the baseline's two evaluated depths around it "
            "(ShortGPT's curve starts at dense, k = 0); – where the depth lies outside the evaluated range "
            "(all pairs, with the variants bracketing each depth, are in `equal_depth.csv`).",
            "",
        ]
        lines += [markdown_table(equal_depth_wide(equal_depth)), ""]

    lines += ["### Findings", ""] + findings(table, equal_depth) + [""]
    lines += ["### Limits", ""] + limit_notes(table, infos, evaluations) + [""]
    return lines


def sparse_execution_table(table: pd.DataFrame) -> pd.DataFrame:
    """Token-routed variants: realized paired speedup against the ideal from the FLOPs their routing left.

    `share_of_ideal` is the part of the ideal gain realized, (speedup - 1) / (ideal - 1): 1 for an
    execution as efficient as the FLOP count, 0 for no gain, negative for a slowdown.
    """
    columns = ["variant", "task", "avg_executed_layers", "speedup_vs_dense", "speedup_q1", "speedup_q3",
               "ideal_speedup", "share_of_ideal", "timed_padding_share"]  # fmt: skip
    if "ideal_speedup" not in table:
        return pd.DataFrame(columns=columns)
    rows = table[table.ideal_speedup.notna() & table.speedup_vs_dense.notna()].copy()
    gain = rows.ideal_speedup - 1
    rows["share_of_ideal"] = ((rows.speedup_vs_dense - 1) / gain).where(gain.abs() > 1e-9)
    return rows.reindex(columns=columns).reset_index(drop=True)  # a column missing from the table: NaN


def sparse_execution_section(table: pd.DataFrame, markdown_table) -> list[str]:
    """Realized against ideal speedups of the token-routed variants, variants as rows and tasks as columns."""
    sparse = sparse_execution_table(table)
    if sparse.empty:
        return []
    tasks = list(dict.fromkeys(sparse.task))
    indexed = sparse.set_index(["variant", "task"])
    rows = []
    for variant in sorted(sparse.variant.unique(), key=variant_sort_key):
        row = {"variant": variant}
        for task in tasks:
            if (variant, task) in indexed.index:
                r = indexed.loc[(variant, task)]
                notes = [f"{r.share_of_ideal:.0%}"] if pd.notna(r.share_of_ideal) else []
                if pd.notna(r.timed_padding_share) and r.timed_padding_share >= NOTABLE_PADDING:
                    notes.append(f"{r.timed_padding_share:.0%} padding")
                share = f" ({', '.join(notes)})" if notes else ""
                spread = f" [{r.speedup_q1:.2f}–{r.speedup_q3:.2f}]" if pd.notna(r.speedup_q1) else ""
                row[TASK_LABELS.get(task, task)] = f"{r.speedup_vs_dense:.2f}×{spread} of {r.ideal_speedup:.2f}×{share}"
            else:
                row[TASK_LABELS.get(task, task)] = "–"
        rows.append(row)
    return [
        "### Token routing: realized against ideal speedup",
        "",
        "Each cell: the paired speedup over dense, in square brackets the quartiles of its timing rounds' ratios "
        "(their spread in the one process: another run's median may land anywhere near that range) · of the ideal "
        "one, dense FLOPs over the FLOPs the variant's routing left on the same timed batches (matmuls of "
        "projections, attention and MLP; a skipped token still pays its keys and values, except at a reuse slot, or "
        "with skip mlp the whole attention) · in round brackets the share of the ideal gain realized, "
        "(speedup − 1) / (ideal − 1). Norms, routers, gathering and scattering tokens and timing noise (see the "
        "`dense` row above) are what separates the two. Where the timed batches hold notable padding (given in "
        f"the cell from {NOTABLE_PADDING:.0%}), dense computes it and token routing drops it while the ideal leaves it "
        "out: part of such a speedup is padding no router skipped, and it may exceed the ideal.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]


def findings(table: pd.DataFrame, equal_depth: pd.DataFrame) -> list[str]:
    """Sentences read off the numbers: the Pareto front per task and the equal-depth wins and losses."""
    out = []
    for task in dict.fromkeys(table.task):
        on_task = table[table.task == task]
        front = on_task.iloc[pareto_front(on_task.avg_executed_layers.tolist(), on_task.accuracy.tolist())]
        dense = on_task[on_task.method == "dense"]
        text = ", ".join(f"`{r.variant}` ({r.accuracy:.3f} at {r.avg_executed_layers:.1f} layers)" for r in front.itertuples())
        sentence = f"- {TASK_LABELS.get(task, task)}: Pareto front {text}"
        if not dense.empty:
            best = on_task.loc[on_task.accuracy.idxmax()]
            sentence += f"; dense {dense.accuracy.iloc[0]:.3f}, best `{best.variant}` {best.accuracy:.3f}"
        fastest = on_task.loc[on_task.speedup_vs_dense.fillna(0).idxmax()]
        if pd.notna(fastest.speedup_vs_dense) and fastest.variant != "dense":
            sentence += f"; fastest `{fastest.variant}` ({fastest.speedup_vs_dense:.2f}× dense)"
        out.append(sentence + ".")
    compared = equal_depth.dropna(subset=["accuracy_gain"]) if not equal_depth.empty else equal_depth
    for (variant, reference), group in (compared.groupby(["variant", "reference"]) if not compared.empty else []):
        higher, lower = int((group.accuracy_gain > 0).sum()), int((group.accuracy_gain < 0).sum())
        out.append(
            f"- `{variant}` vs {method_label(reference)} at equal depth: higher on {higher}, lower on {lower}, "
            f"equal on {len(group) - higher - lower} of {len(group)} tasks (mean difference {group.accuracy_gain.mean():+.3f})."
        )
    return out


def limit_notes(table: pd.DataFrame, infos: dict[str, dict], evaluations: list[dict]) -> list[str]:
    notes = []
    n_min = int(table.n_examples.min())
    notes.append(
        f"- Small samples: as few as {n_min} examples per task; the standard errors are in `table.csv` "
        "(`accuracy_stderr`), and differences within about two of them are noise."
    )
    notes.append(
        "- Speedups: each evaluation job replays the task's first lm-eval batches through the variant and the "
        "dense model in turn (generation: a fixed number of new tokens), several rounds, and reports the median "
        "ratio; `dense` timed against itself shows the noise floor. Timing separate jobs instead varied by "
        "10-30 % on one model. With `evaluate.timing: exclusive` (the default) each job had every core to "
        "itself; with `shared`, jobs ran side by side. Compare speedups within one run on one machine."
    )
    methods = set(table.method)
    if "shortgpt" in methods:
        profile = next((i.get("profile") for i in infos.values() if i.get("method") == "shortgpt"), None)
        notes.append(
            "- ShortGPT removes layers by Block Influence measured on the profiling stage's calibration set"
            + (f" (`{profile}`)" if profile else "")
            + "; the pruned model is not re-trained."
        )
    if methods & {"soft-exit", "soft-conf"}:
        soft = next((i for i in infos.values() if i.get("method") in ("soft-exit", "soft-conf")), {})
        notes.append(
            "- SoFT variants are one fine-tuned model (fine-tuned on the train splits, trained exits "
            f"{soft.get('trained_exits', '?')}); compare them with the full-depth SoFT model where it was evaluated, "
            "since fine-tuning alone moves accuracy."
        )
    if "soft-conf" in methods:
        notes.append(
            "- The confidence exit decides per example from the prompt's last token (for a multiple-choice question: "
            "once for all its answer choices) and keeps that depth while generating."
        )
    executions: dict[str, set[str]] = {}
    for evaluation in evaluations:
        if evaluation.get("token_execution"):
            executions.setdefault(evaluation["variant"], set()).add(evaluation["token_execution"])
    sparse = sorted(v for v, ways in executions.items() if all(way.startswith("sparse (") for way in ways))
    if sparse:
        notes.append(
            f"- Token-routed variants ({', '.join(f'`{v}`' for v in sparse)}) ran sparsely: each layer (or, with "
            "skip mlp, each MLP) computed only the real tokens its router runs; a skipped token still paid its "
            "keys and values (skip layer), except at a reuse slot. Their executed layers count real tokens only."
        )
    for variant, ways in sorted(executions.items()):
        if variant not in sparse:
            notes.append(
                f"- `{variant}` did NOT run sparsely ({'; '.join(sorted(ways))}): its skipped computation was "
                "computed and discarded, so its layer count is real but its speedup is not."
            )
    if "dlo" in methods:
        notes.append(
            "- DLO counts capacity as the share of tokens executed (0.9 in its paper); `dlo-c{capacity}` here names "
            "the share skipped. With skip mlp (the authors' default) a skipped (layer, token) pair still runs the "
            "attention, so the executed-layers column counts MLPs run and overstates the saving against layer skipping."
        )
    return notes
