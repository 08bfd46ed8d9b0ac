"""The report stage on hand-written evaluation files."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from radial.stages.report import build_table, load_evaluations
from radial.utils import RadialError


def _evaluation(variant, task, accuracy, layers, forward_time, subtasks=None, tokens=1000):
    return {
        "variant": variant, "task": task, "metric": "acc", "accuracy": accuracy, "accuracy_stderr": 0.01,
        "avg_executed_layers": layers, "num_layers": 12, "n_examples": 10, "subtasks": subtasks or {},
        # lm-eval's own seconds around the forwards, the same for every variant: not part of the speedup
        "wall_time_s": forward_time + 3.0, "forward_time_s": forward_time, "forward_tokens": tokens,
    }


def _write(tmp_path, evaluations):
    paths = []
    for e in evaluations:
        path = tmp_path / f"{e['variant']}-{e['task']}.json"
        path.write_text(json.dumps(e))
        paths.append(str(path))
    return paths


def test_speedup_is_dense_forward_time_over_variant_forward_time():
    table = build_table([
        _evaluation("dense", "arc_easy", 0.5, 12, 10.0),
        _evaluation("routed", "arc_easy", 0.45, 8, 5.0),
        _evaluation("dense", "synthetic", 0.8, 12, 4.0),
    ])
    speedups = table.set_index(["variant", "task"]).speedup_vs_dense
    assert speedups["routed", "arc_easy"] == pytest.approx(2.0)  # wall times 13 s and 8 s would say 1.6
    assert speedups["dense", "synthetic"] == pytest.approx(1.0)


def test_paired_timing_is_the_speedup_where_the_evaluation_has_it():
    paired = _evaluation("routed", "arc_easy", 0.45, 8, 5.0) | {"timing": {"speedup": 1.3}}
    table = build_table([_evaluation("dense", "arc_easy", 0.5, 12, 10.0), paired,
                         _evaluation("pruned", "arc_easy", 0.4, 6, 4.0)])  # fmt: skip
    rows = table.set_index("variant")
    assert rows.speedup_vs_dense["routed"] == pytest.approx(1.3)  # not 10 / 5 from the separate evaluations
    assert rows.speedup_measured["routed"] == "paired"
    assert rows.speedup_vs_dense["pruned"] == pytest.approx(2.5) and rows.speedup_measured["pruned"] == "throughput"


def test_speedup_in_generation_is_per_token():
    """A variant that writes twice the tokens in twice the time is as fast as dense, not half as fast."""
    table = build_table([
        _evaluation("dense", "gsm8k", 0.1, 12, 4.0, tokens=800),
        _evaluation("rambling", "gsm8k", 0.0, 12, 8.0, tokens=1600),
        _evaluation("shallow", "gsm8k", 0.0, 6, 4.0, tokens=1600),
    ])
    speedups = table.set_index("variant").speedup_vs_dense
    assert speedups["rambling"] == pytest.approx(1.0)
    assert speedups["shallow"] == pytest.approx(2.0)


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


def test_pareto_front_keeps_the_undominated_points():
    from radial.comparison import pareto_front

    layers = [12, 8, 8, 6, 10, 4]
    accuracy = [0.60, 0.50, 0.40, 0.50, 0.45, 0.20]
    assert pareto_front(layers, accuracy) == [5, 3, 0]  # by depth: 4 layers, 6 layers, dense


def test_equal_depth_pairs_each_dynamic_variant_with_the_static_curves():
    from radial.comparison import equal_depth_comparison, with_methods

    table = with_methods(build_table([
        _evaluation("dense", "arc_easy", 0.60, 12, 10.0),
        _evaluation("shortgpt-k4", "arc_easy", 0.40, 8, 7.0),
        _evaluation("shortgpt-k2", "arc_easy", 0.50, 10, 8.0),
        _evaluation("soft-exit6", "arc_easy", 0.30, 6, 5.0),
        _evaluation("soft-exit12", "arc_easy", 0.58, 12, 10.0),
        _evaluation("routers-b0.5", "arc_easy", 0.52, 9, 6.0),  # between shortgpt-k4 and -k2
        _evaluation("dlo-c0.25", "arc_easy", 0.35, 5, 11.0),  # shallower than every curve point
    ]))
    pairs = equal_depth_comparison(table).set_index(["variant", "reference"])
    routers_vs_shortgpt = pairs.loc[("routers-b0.5", "shortgpt")]
    assert routers_vs_shortgpt.reference_accuracy == pytest.approx(0.45)  # halfway from 0.40 (8) to 0.50 (10)
    assert routers_vs_shortgpt.accuracy_gain == pytest.approx(0.07)
    assert routers_vs_shortgpt.bracketed_by == "shortgpt-k4 – shortgpt-k2"
    assert pairs.loc[("routers-b0.5", "soft-exit")].reference_accuracy == pytest.approx(0.30 + 0.28 * 3 / 6)
    dlo = pairs.loc[("dlo-c0.25", "shortgpt")]
    assert pd.isna(dlo.reference_accuracy) and dlo.bracketed_by.startswith("outside")
    assert set(pairs.index.get_level_values(0)) == {"routers-b0.5", "dlo-c0.25"}  # static curves are references only


def test_report_compares_methods_with_a_pareto_plot(tmp_path):
    models = tmp_path / "models"
    (models / "shortgpt-k4").mkdir(parents=True)
    (models / "shortgpt-k4" / "radial_variant.json").write_text(json.dumps(
        {"method": "shortgpt", "description": "ShortGPT: the 4 layers of lowest Block Influence removed (1, 2, 3, 5)"}
    ))
    evaluations = []
    for task, scale in (("arc_easy", 1.0), ("synthetic", 0.5)):
        evaluations += [
            _evaluation("dense", task, 0.6 * scale, 12, 10.0),
            _evaluation("shortgpt-k4", task, 0.4 * scale, 8, 6.0) | {"model": str(models / "shortgpt-k4")},
            _evaluation("dlo-c0.25", task, 0.5 * scale, 9, 12.5),
        ]
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "radial", "report", "--evaluations", *_write(tmp_path, evaluations),
                    "--out-dir", str(out), "--run-name", "unit"], check=True, capture_output=True)
    assert (out / "pareto.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "![accuracy against average executed layers](pareto.png)" in report
    assert "ShortGPT: the 4 layers of lowest Block Influence removed" in report  # what was run
    assert "| shortgpt-k4 | ShortGPT pruning | 0.400 · 8.0 · 1.67× | 0.200 · 8.0 · 1.67× |" in report
    assert "| dlo-c0.25 | DLO-style skip | 0.500 · 9.0 · 0.80× |" in report
    table = pd.read_csv(out / "table.csv")
    assert table.set_index(["variant", "task"]).speedup_vs_dense["shortgpt-k4", "arc_easy"] == pytest.approx(10 / 6)
    pairs = pd.read_csv(out / "equal_depth.csv")
    assert pairs.variant.unique().tolist() == ["dlo-c0.25"]
    assert pairs.reference_accuracy.tolist() == pytest.approx([0.45, 0.225])  # 9 layers: 1/4 from 8 to 12
    assert "### Findings" in report and "### Limits" in report


def test_token_routed_variants_show_their_realized_against_ideal_speedup(tmp_path):
    evaluations = []
    for task, realized, padding in (("arc_easy", 1.05, 0.196), ("mmlu", 0.95, 0.037)):
        rounds = [realized + step for step in (-0.04, -0.01, 0.0, 0.01, 0.03)] if task == "mmlu" else []
        timing = {"speedup": realized, "ideal_speedup": 1.2, "padding_share": padding, "round_ratios": rounds}
        evaluations += [
            _evaluation("dense", task, 0.3, 12, 10.0) | {"timing": {"speedup": 1.0, "ideal_speedup": None}},
            _evaluation("dlo-c0.25", task, 0.3, 10, 9.0) | {"timing": timing},
        ]
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "radial", "report", "--evaluations", *_write(tmp_path, evaluations),
                    "--out-dir", str(out), "--run-name", "unit"], check=True, capture_output=True)  # fmt: skip
    table = pd.read_csv(out / "table.csv").set_index(["variant", "task"])
    assert table.ideal_speedup["dlo-c0.25", "mmlu"] == pytest.approx(1.2)
    assert pd.isna(table.ideal_speedup["dense", "mmlu"])
    report = (out / "report.md").read_text()
    assert "### Token routing: realized against ideal speedup" in report
    # Quartiles of the rounds where there were enough of them; padding named from 5 %.
    assert "| dlo-c0.25 | 1.05× of 1.20× (25%, 20% padding) | 0.95× [0.92–0.97] of 1.20× (-25%) |" in report
    assert table.speedup_q1["dlo-c0.25", "mmlu"] == pytest.approx(0.925)  # between the 1st and 2nd of 5 rounds
    assert pd.isna(table.speedup_q1["dlo-c0.25", "arc_easy"])
    assert table.timed_padding_share["dlo-c0.25", "arc_easy"] == pytest.approx(0.196)
    assert "| dense |" not in report.split("### Token routing")[1].split("###")[0]


def test_report_describes_the_mcts_labels(tmp_path):
    from radial.stages.mcts import plot_summary, select_label_set, summarize

    def label(i, level, path, default_correct):
        return {"id": f"synthetic/{i}", "task": "synthetic", "level": level, "path": path,
                "layer_labels": [path.count(layer) for layer in range(4)], "reward": 1.0,
                "default_correct": default_correct, "simulations": 3 + i, "layers_saved": 4 - len(path),
                "num_layers": 4, "block_evaluations": 10, "naive_block_evaluations": 25}

    labels = [label(0, 1, [0, 1, 3], True), label(1, 1, [0, 1, 2, 3], False), label(2, 2, [0, 1, 1, 2, 3], False)]
    labels[1]["reward"] = 0.0  # no correct path
    stats = summarize(labels) | {"label_set": select_label_set(labels, 0.5, seed=0)[1]}
    mcts = tmp_path / "mcts"
    mcts.mkdir()
    (mcts / "stats.json").write_text(json.dumps(stats))
    plot_summary(mcts / "layers_saved.png", stats, labels)
    out = tmp_path / "report"
    command = [sys.executable, "-m", "radial", "report", "--evaluations",
               *_write(tmp_path, [_evaluation("dense", "synthetic", 0.7, 4, 2.0)]), "--out-dir", str(out),
               "--run-name", "unit", "--wandb-mode", "disabled"]
    subprocess.run([*command, "--mcts-stats", str(mcts / "stats.json")], check=True, capture_output=True)
    report = (out / "report.md").read_text()
    assert "3 training examples searched" in report and "answered 33.3% of them correctly" in report
    assert "saving 0.00 of 4 layers on average after 4.0 simulations" in report  # (1 + 0 - 1) / 3 saved
    assert "skip 1, execute 10, repeat 1" in report and "2.50x fewer than evaluating" in report
    assert "| synthetic L1 | 2 | 0.500 | 0.500 | 0.500 | 3.500 |" in report
    assert "2 of 3 examples kept. Dropped: 1 for which no path answered correctly" in report
    assert "and 0 that did not improve on the default" in report and "Improved share 66.7% searched, 100.0% kept" in report
    assert (out / "mcts.png").read_bytes() == (mcts / "layers_saved.png").read_bytes()

    missing = subprocess.run([*command, "--mcts-stats", str(tmp_path / "nowhere.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--mcts-stats" in missing.stderr and "nowhere.json" in missing.stderr


def test_a_method_swept_over_its_knob_is_one_curve(tmp_path, monkeypatch):
    """routers-b<bias> / radial-b<bias> are points of their family's curve, ordered by bias, drawn as one line."""
    import matplotlib.figure

    from radial.comparison import method_of, plot_pareto, variant_sort_key, with_methods

    variants = ["routers-b1", "radial", "routers", "routers-b-1", "radial-b0.5", "dense"]
    assert sorted(variants, key=variant_sort_key) == ["dense", "routers-b-1", "routers", "routers-b1", "radial", "radial-b0.5"]
    assert {method_of(v) for v in variants} == {"dense", "routers", "radial"}
    table = with_methods(build_table([
        _evaluation("dense", "synthetic", 0.80, 12, 10.0),
        _evaluation("routers-b-1", "synthetic", 0.79, 11.5, 9.0),
        _evaluation("routers", "synthetic", 0.75, 10.0, 8.0),
        _evaluation("routers-b1", "synthetic", 0.60, 8.0, 7.0),
        _evaluation("radial", "synthetic", 0.70, 9.0, 7.5),
    ]))  # fmt: skip
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: saved.append(figure))
    plot_pareto(table, tmp_path / "pareto.png", "knobs")
    (ax,) = [ax for ax in saved[0].axes if ax.get_visible()]
    curves = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(curves) == 1  # the routers' three points; radial has one point, no curve
    assert list(curves[0].get_xdata()) == [8.0, 10.0, 11.5] and list(curves[0].get_ydata()) == [0.60, 0.75, 0.79]


def test_speedups_timed_under_load_are_flagged(tmp_path):
    evaluations = [_evaluation("dense", "arc_easy", 0.6, 12, 10.0), _evaluation("dlo-c0.25", "arc_easy", 0.5, 9, 9.0)]
    evaluations[1]["timing"] = {"speedup": 0.7, "contended": True, "load_average": [4.2, 4.0]}
    out = tmp_path / "report"
    subprocess.run([sys.executable, "-m", "radial", "report", "--evaluations", *_write(tmp_path, evaluations),
                    "--out-dir", str(out), "--wandb-mode", "disabled"], check=True, capture_output=True)  # fmt: skip
    report = (out / "report.md").read_text()
    assert "**Timed under load**" in report and "these speedups are not trustworthy): dlo-c0.25/arc_easy." in report
    table = pd.read_csv(out / "table.csv").set_index("variant")
    assert table.timing_contended["dlo-c0.25"] == True and pd.isna(table.timing_contended["dense"])  # noqa: E712
