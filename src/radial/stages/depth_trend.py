"""Depth trend (Radial Networks, arXiv 2404.04900, Fig. 2): does a block's residual contribution fall
as models grow?

Reads the profile folders of several models profiled on the same calibration text (the workflow's
`profile.models`) and writes, into one folder: `trend.csv` (per model: layers, parameters, the median
over layers of each layer's median residual ratio ‖f(x)‖/‖x+f(x)‖, and the same without the first
layer), `per_layer.csv` (each model's per-layer medians, with the layer's relative depth),
`trend.png` (left: per-layer medians against relative depth, one line per model; right: the median
over layers against the number of layers) and `trend.md` (the table, for the report).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from radial import settings, tracking
from radial.utils import RadialError, atomic_path

METRIC = "residual_ratio"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", nargs="+", type=Path, required=True,
                        help="profile folders (the profile stage's output), one per model; named by folder")  # fmt: skip
    settings.add_path_argument(parser, "out", "output folder (written atomically)")
    settings.add_common_arguments(parser)


def read_profile(folder: Path) -> dict:
    """One model's row: name, layers, parameters, per-layer medians and their medians over layers."""
    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text())
        medians = [float(v) for v in summary["metrics"][METRIC]["median"]]
    except FileNotFoundError:
        raise RadialError(f"{path}: not found (is {folder} a profile folder?)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise RadialError(f"{path}: not a profile summary ({type(error).__name__}: {error})") from None
    return {
        "model": folder.name,
        "layers": len(medians),
        "parameters": summary.get("num_parameters"),
        "median": statistics.median(medians),
        "median_after_first": statistics.median(medians[1:]) if len(medians) > 1 else medians[0],
        "per_layer": medians,
    }


def trend_rows(profiles: list[Path]) -> list[dict]:
    rows = [read_profile(folder) for folder in profiles]
    names = [row["model"] for row in rows]
    if len(set(names)) != len(names):
        raise RadialError(f"--profiles: two folders share a name ({', '.join(names)}); the table names models by folder")
    return sorted(rows, key=lambda row: (row["parameters"] or 0, row["layers"]))


def falls_with_size(rows: list[dict], key: str = "median") -> bool:
    """True when every larger model's median contribution is below the next smaller one's."""
    return all(later[key] < earlier[key] for earlier, later in zip(rows, rows[1:]))


def markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| model | layers | parameters | median ‖f(x)‖/‖x+f(x)‖ over layers | without layer 0 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        parameters = f"{row['parameters'] / 1e6:.2f} M" if row["parameters"] else "–"
        lines.append(f"| {row['model']} | {row['layers']} | {parameters} | {row['median']:.3f} | {row['median_after_first']:.3f} |")
    if len(rows) > 1:
        verdict = "falls" if falls_with_size(rows) else "does not fall monotonically"
        lines += ["", f"From the smallest to the largest model the median contribution {verdict}: "
                  + " → ".join(f"{row['median']:.3f}" for row in rows) + " (Radial Networks: down to about 5 % at OPT-66B)."]  # fmt: skip
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (per_layer, overall) = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        layers = row["layers"]
        depth = [(i + 0.5) / layers for i in range(layers)]
        per_layer.plot(depth, row["per_layer"], marker="o", ms=3, label=f"{row['model']} ({layers} layers)")
    per_layer.set(xlabel="relative depth (layer + ½) / L", ylabel="median ‖f(x)‖/‖x+f(x)‖",
                  title="per layer", yscale="log")  # fmt: skip
    per_layer.legend(fontsize=8)
    per_layer.grid(alpha=0.3)
    layers = [row["layers"] for row in rows]
    overall.plot(layers, [row["median"] for row in rows], marker="o", label="all layers")
    overall.plot(layers, [row["median_after_first"] for row in rows], marker="s", ls="--", label="without layer 0")
    for row in rows:
        if row["parameters"]:
            overall.annotate(f"{row['parameters'] / 1e6:.1f} M", (row["layers"], row["median"]), fontsize=8,
                             textcoords="offset points", xytext=(4, 4))  # fmt: skip
    overall.set(xlabel="layers", ylabel="median over layers", title="median contribution against depth", xscale="log")
    overall.set_xticks(layers, [str(n) for n in layers])
    overall.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only the depths, no 2×10¹
    overall.legend(fontsize=8)
    overall.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    import pandas as pd

    rows = trend_rows(args.profiles)
    table = pd.DataFrame([{k: v for k, v in row.items() if k != "per_layer"} for row in rows])
    per_layer = pd.DataFrame(
        [{"model": row["model"], "layer": i, "relative_depth": (i + 0.5) / row["layers"], "median": value}
         for row in rows for i, value in enumerate(row["per_layer"])]  # fmt: skip
    )
    with atomic_path(args.out) as out:
        out.mkdir()
        table.to_csv(out / "trend.csv", index=False)
        per_layer.to_csv(out / "per_layer.csv", index=False)
        plot(rows, out / "trend.png")
        (out / "trend.md").write_text("\n".join(markdown(rows)) + "\n")
    with tracking.stage_run("depth_trend", args) as run:
        import wandb

        run.log({"depth_trend": wandb.Table(dataframe=table)})
        tracking.log_image(run, "depth_trend/plot", args.out / "trend.png")
    print("\n".join(markdown(rows)))
    return 0
