"""MCTS stage: per-example layer paths (skip / execute / repeat) as router supervision (Dr.LLM).

Two steps, so Snakemake can scatter the examples over shards and gather the labels:

    python -m radial mcts search --model results/embedded/models/dense --data-dir results/data \\
        --tasks synthetic --examples 200 --shard 0 --shards 2 \\
        --progress results/embedded/mcts/progress/1-of-2.jsonl --out results/embedded/mcts/shards/1-of-2.jsonl
    python -m radial mcts gather results/embedded/mcts/shards/*.jsonl --out-dir results/embedded/mcts

`search` draws `--examples` rows per task from <data-dir>/<task>/train.jsonl (seeded), keeps
every `--shards`-th one starting at `--shard`, and runs the search of radial.path_search on each
with prefix-shared path evaluation (radial.path_eval). Each example's search is seeded from the
global seed and the example id, so it gives the same label whenever and wherever it runs.
Finished labels are appended to the progress file every `--checkpoint-every` examples (flushed
and fsynced); a killed shard that is started again resumes after the last complete line. The
progress file starts with a fingerprint of everything the labels depend on (model files, data
rows, search settings, seed, shard); a progress file with another fingerprint is started over.
The shard's `--out` is written atomically once the shard is complete.

`gather` merges the shards (checking that no example is missing or duplicated) and keeps the
label set the routers train on (Dr.LLM's data generation, `select_label_set`): examples for which
no path answered correctly are dropped, and when fewer than `--improved-share` of the rest improved
on the default path, examples that did not are dropped at random (seeded) until that share is
reached. It writes labels.jsonl (the kept examples), stats.json (the figures of every searched
example, and under "label_set" what was kept and why) and layers_saved.png. The shard files keep
every searched example.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from radial import settings
from radial.utils import (
    RadialError,
    atomic_path,
    read_jsonl,
    seed_everything,
    write_json,
    write_jsonl,
)

LABEL_NAMES = ("skip", "execute", "repeat")
PLOT_NAME = "layers_saved.png"


SEARCH_KEYS = ("simulations", "exploration", "length_penalty", "random_child", "max_skip", "repeat",
               "max_length_factor", "early_stop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    search = actions.add_parser("search", help="search the examples of one shard (resumable)")
    settings.add_path_argument(search, "model", "base model folder (HF format)")
    settings.add_path_argument(search, "data_dir", "normalized data: <task>/train.jsonl")
    settings.add_setting(search, "mcts.tasks")
    settings.add_setting(search, "mcts.examples")
    search.add_argument("--shard", type=int, default=0, help="this shard's index, 0-based")
    search.add_argument("--shards", type=int, default=1, help="number of shards the examples are split into")
    settings.add_path_argument(search, "out", "the shard's labels (jsonl, written when complete)")
    search.add_argument("--progress", type=Path, default=None, help="checkpoint file (default: <out>.progress.jsonl)")
    settings.add_setting(search, "mcts.checkpoint_every")
    group = search.add_argument_group("search (Dr.LLM defaults)")
    for name in (*SEARCH_KEYS, "max_new_tokens"):
        settings.add_setting(group, f"mcts.{name}")
    settings.add_threads_argument(search)
    settings.add_device_argument(search, "mcts.device")
    settings.add_common_arguments(search)

    gather = actions.add_parser("gather", help="merge shard labels into labels.jsonl, stats.json and a plot")
    gather.add_argument("shard_files", nargs="+", type=Path, help="the shards' jsonl files")
    gather.add_argument("--out-dir", type=Path, required=True, help="where labels.jsonl, stats.json, the plot go")
    settings.add_setting(gather, "mcts.improved_share")
    settings.add_common_arguments(gather)


def main(args: argparse.Namespace) -> int:
    return run_search(args) if args.action == "search" else run_gather(args)


# ---------------------------------------------------------------------------------------------
# Which examples


def select_examples(data_dir: Path, tasks: list[str], examples: int, seed: int) -> list[dict]:
    """`examples` rows per task from <data_dir>/<task>/train.jsonl, drawn with the seed, in file order."""
    selected = []
    for task in tasks:
        path = data_dir / task / "train.jsonl"
        if not path.is_file():
            raise RadialError(f"mcts needs {path} (run the data stage for task {task!r})")
        rows = read_jsonl(path)
        if not rows:
            raise RadialError(f"{path}: no rows")
        for line, row in enumerate(rows, 1):
            if "id" not in row or "question" not in row:
                raise RadialError(f"{path}:{line}: a row needs 'id' and 'question'")
        chosen = sorted(random.Random(f"radial-mcts/{seed}/{task}").sample(range(len(rows)), min(examples, len(rows))))
        selected += [rows[i] | {"task": rows[i].get("task", task)} for i in chosen]
    return selected


def shard_examples(rows: list[dict], shard: int, shards: int) -> list[dict]:
    """Round robin, so every shard gets a similar mix of tasks and levels."""
    return rows[shard::shards]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def fingerprint(args: argparse.Namespace, settings: Any, rows: list[dict]) -> str:
    """Hash of everything a shard's labels depend on; progress is only resumed under the same one."""
    model_files = {}
    for path in sorted(Path(args.model).glob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            stat = path.stat()
            model_files[path.name] = [stat.st_size, stat.st_mtime_ns]
    identity = {
        "model": str(Path(args.model).resolve()),
        "model_files": model_files,
        "settings": asdict(settings),
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "examples": rows,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def load_progress(path: Path, expected_fingerprint: str, example_ids: list[str]) -> list[dict]:
    """Labels already checkpointed for this shard (in order); drops a torn last line, or stale progress."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # a line without its newline was cut off by a kill
    lines = complete.decode().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
        rows = [json.loads(line) for line in lines[1:]]
    except json.JSONDecodeError:
        print(f"{path}: unreadable progress, starting this shard over")
        return []
    if header.get("fingerprint") != expected_fingerprint:
        print(f"{path}: progress of another configuration, starting this shard over")
        return []
    if [row.get("id") for row in rows] != example_ids[: len(rows)]:
        print(f"{path}: progress does not match this shard's examples, starting this shard over")
        return []
    if len(complete) != len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return rows


class ProgressWriter:
    """Appends finished labels to the progress file, fsynced every `every` examples."""

    def __init__(self, path: Path, fingerprint_: str, resume: bool, every: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({"fingerprint": fingerprint_}) + "\n")
        self.file = open(path, "a")
        self.every = every
        self.pending: list[dict] = []

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        # Taken first: a write interrupted (Ctrl-C) leaves at most a cut line, which loading drops; the
        # `close` that follows must not append the same rows after it.
        rows, self.pending = self.pending, []
        if not rows:
            return
        self.file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.flush()
        self.file.close()


# ---------------------------------------------------------------------------------------------
# search


def settings_from(args: argparse.Namespace):
    from radial.path_search import SearchSettings

    return SearchSettings(**{name: getattr(args, name) for name in SEARCH_KEYS})


def load_routed(model_dir: Path, device: str):
    import torch
    from transformers import AutoTokenizer

    from radial.routing import RoutedForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise RadialError(f"model folder {model_dir} not found or has no config.json")
    routed = RoutedForCausalLM.from_base(str(model_dir), dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return routed, tokenizer


def label_example(
    routed, tokenizer, row: dict, settings, *, seed: int, max_new_tokens: int, share_prefixes: bool = True
) -> dict:
    """Search one example; its label row (the contract router training reads)."""
    from radial.path_eval import build_scorer
    from radial.path_search import search

    task = row["task"]
    prompt, scorer = build_scorer(
        routed, tokenizer, task, row, max_new_tokens=max_new_tokens, share_prefixes=share_prefixes
    )
    rng = random.Random(f"radial-mcts/{seed}/{row['id']}")
    start = time.perf_counter()
    result = search(routed.num_layers, settings, lambda path: scorer(path).correct, rng)
    seconds = time.perf_counter() - start
    evaluator = scorer.evaluator
    block_evaluations, naive_block_evaluations = evaluator.block_evaluations, evaluator.naive_block_evaluations
    layer_tokens = evaluator.layer_tokens
    label = {
        "id": row["id"],
        "task": task,
        "question": row["question"],
        "prompt": prompt,
        "answer": row.get("answer"),
        "path": list(result.path),
        "layer_labels": result.layer_labels,
        "reward": 1.0 if result.correct else 0.0,
        "default_correct": result.default_correct,
        "simulations": result.simulations,
        "layers_saved": result.layers_saved,
        "num_layers": result.num_layers,
        "prediction": scorer(result.path).answer,  # (after the cost was read: naive mode recomputes it)
        "paths_evaluated": result.paths_evaluated,
        "block_evaluations": block_evaluations,
        "naive_block_evaluations": naive_block_evaluations,
        "layer_tokens": layer_tokens,
        "search_seconds": round(seconds, 4),
    }
    if "level" in row:
        label["level"] = row["level"]
    return label


def run_search(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from radial import tracking

    if args.shards < 1:
        raise RadialError(f"--shards must be at least 1 (got {args.shards})")
    if not 0 <= args.shard < args.shards:
        raise RadialError(f"--shard must be in 0..{args.shards - 1} (got {args.shard})")
    settings = settings_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    rows = shard_examples(select_examples(args.data_dir, args.tasks, args.examples, args.seed), args.shard, args.shards)
    example_ids = [row["id"] for row in rows]
    progress_path = args.progress or args.out.with_name(args.out.name + ".progress.jsonl")
    key = fingerprint(args, settings, rows)
    done = load_progress(progress_path, key, example_ids)
    if done:
        print(f"resuming shard {args.shard + 1}/{args.shards} after {len(done)} of {len(rows)} examples")
    routed, tokenizer = load_routed(args.model, args.device)

    config = {"settings": asdict(settings), "shard_examples": len(rows), "num_layers": routed.num_layers}
    with tracking.stage_run("mcts", args, config=config) as run:
        writer = ProgressWriter(progress_path, key, resume=bool(done), every=args.checkpoint_every)
        labels = list(done)
        try:
            bar = tqdm(rows, desc=f"mcts shard {args.shard + 1}/{args.shards}", unit="example", initial=len(done))
            for row in rows[len(done) :]:
                label = label_example(
                    routed, tokenizer, row, settings, seed=args.seed, max_new_tokens=args.max_new_tokens
                )
                writer.add(label)
                labels.append(label)
                run.log({k: label[k] for k in ("simulations", "layers_saved", "reward", "block_evaluations")})
                bar.update(1)
                bar.set_postfix(saved=f"{sum(x['layers_saved'] for x in labels) / len(labels):.2f}")
            bar.close()
        finally:
            writer.close()
        write_jsonl(args.out, labels)
        summary = summarize(labels)
        run.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    print(
        f"shard {args.shard + 1}/{args.shards}: {len(labels)} examples, mean layers saved "
        f"{summary['mean_layers_saved']:.2f}, improved {summary['fraction_improved']:.0%} -> {args.out}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# gather


def group_name(label: dict) -> str:
    return f"{label['task']} L{label['level']}" if label.get("level") is not None else label["task"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def improved(label: dict) -> bool:
    """The search found a correct path better than the default: shorter, or correct where it was wrong."""
    if not label["reward"]:
        return False
    return not label["default_correct"] or len(label["path"]) < label["num_layers"]


def select_label_set(labels: list[dict], improved_share: float, seed: int) -> tuple[list[dict], dict]:
    """The examples the routers train on (in the given order), and a record of what was dropped and why."""
    solved = [x for x in labels if x["reward"]]
    num_improved = sum(map(improved, solved))
    unimproved = [i for i, x in enumerate(solved) if not improved(x)]
    dropped: set[int] = set()
    if solved and num_improved < improved_share * len(solved):
        # Keep every improved example and as many others as the share allows.
        allowed = math.floor(num_improved * (1 - improved_share) / improved_share)
        rng = random.Random(f"radial-mcts-label-set/{seed}")
        dropped = set(rng.sample(unimproved, len(unimproved) - allowed))
    kept = [x for i, x in enumerate(solved) if i not in dropped]
    record = {
        "searched": len(labels),
        "kept": len(kept),
        "dropped_no_correct_path": len(labels) - len(solved),
        "dropped_for_enrichment": len(dropped),
        "improved_share_target": improved_share,
        "improved_share_searched": num_improved / len(labels) if labels else 0.0,
        "improved_share_kept": num_improved / len(kept) if kept else 0.0,
        "mean_layers_saved_kept": _mean([x["layers_saved"] for x in kept]),
        "class_counts_kept": summarize(kept)["class_counts"] if kept else {},
    }
    return kept, record


def summarize(labels: list[dict]) -> dict:
    """Class counts, fraction improved, layers saved (overall and per task/level group)."""
    if not labels:
        return {"examples": 0, "mean_layers_saved": 0.0, "fraction_improved": 0.0}
    num_layers = labels[0]["num_layers"]
    per_layer = [[0, 0, 0] for _ in range(num_layers)]
    for label in labels:
        for layer, value in enumerate(label["layer_labels"]):
            per_layer[layer][value] += 1

    def figures(group: list[dict]) -> dict:
        return {
            "examples": len(group),
            "default_accuracy": _mean([float(x["default_correct"]) for x in group]),
            "label_accuracy": _mean([x["reward"] for x in group]),
            "fraction_improved": _mean([float(improved(x)) for x in group]),
            "mean_layers_saved": _mean([x["layers_saved"] for x in group]),
            "mean_path_length": _mean([len(x["path"]) for x in group]),
            "mean_simulations": _mean([x["simulations"] for x in group]),
        }

    groups: dict[str, list[dict]] = defaultdict(list)
    for label in labels:
        groups[group_name(label)].append(label)
    totals = Counter()
    for counts in per_layer:
        for value, count in enumerate(counts):
            totals[LABEL_NAMES[value]] += count
    return {
        **figures(labels),
        "num_layers": num_layers,
        "class_counts": {name: totals[name] for name in LABEL_NAMES},
        "class_counts_per_layer": [dict(zip(LABEL_NAMES, counts)) for counts in per_layer],
        **prefix_sharing(labels),
        "by_group": {name: figures(groups[name]) for name in sorted(groups, key=_group_order)},
    }


def prefix_sharing(labels: list[dict]) -> dict:
    """Block evaluations spent, and what evaluating every path from scratch would have spent."""
    cached = sum(x.get("block_evaluations", 0) for x in labels)
    naive = sum(x.get("naive_block_evaluations", 0) for x in labels)
    return {
        "block_evaluations": cached,
        "naive_block_evaluations": naive,
        "eval_reduction": round(naive / cached, 3) if cached and naive else None,
    }


def _group_order(name: str) -> tuple:
    task, _, level = name.partition(" L")
    return (task, int(level) if level.isdigit() else -1)


def plot_summary(path: Path, stats: dict, labels: list[dict]) -> None:
    """Left: layers saved per difficulty level (task/level); right: label shares per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(stats["by_group"])
    saved = {name: [x["layers_saved"] for x in labels if group_name(x) == name] for name in groups}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    means = [np.mean(saved[name]) for name in groups]
    errors = [np.std(saved[name]) / max(1, np.sqrt(len(saved[name]))) for name in groups]
    positions = np.arange(len(groups))
    left.bar(positions, means, yerr=errors, capsize=3, color="C0", alpha=0.8)
    for x, name in zip(positions, groups):
        left.scatter(np.full(len(saved[name]), x) + np.linspace(-0.25, 0.25, len(saved[name])), saved[name],
                     s=6, color="k", alpha=0.35, zorder=3)
        left.text(
            x, 0.98, f"n={len(saved[name])}", transform=left.get_xaxis_transform(), ha="center", va="top", fontsize=8
        )
    left.axhline(0, color="gray", lw=0.8)
    left.set_xticks(positions, groups, rotation=30, ha="right")
    left.set_ylabel("layers saved (L − len(path))")
    left.set_title("layers saved per difficulty level (mean ± s.e.)")

    per_layer = stats["class_counts_per_layer"]
    layers = np.arange(len(per_layer))
    bottom = np.zeros(len(per_layer))
    total = np.array([sum(c.values()) for c in per_layer], dtype=float)
    for name, color in zip(LABEL_NAMES, ("C3", "C7", "C2")):
        share = np.array([c[name] for c in per_layer]) / np.maximum(total, 1)
        right.bar(layers, share, bottom=bottom, color=color, label=name)
        bottom += share
    right.set_xlabel("layer")
    right.set_ylabel("share of examples")
    right.set_title("per-layer labels")
    right.legend(fontsize=8, loc="lower right")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"MCTS labels: {stats['examples']} examples, {stats['num_layers']} layers, "
                 f"improved {stats['fraction_improved']:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gather_labels(shard_files: list[Path]) -> list[dict]:
    """All shards' labels in the examples' original order (shards are given in shard order)."""
    shards: list[list[dict]] = []
    seen: dict[str, Path] = {}
    for path in shard_files:
        if not path.is_file():
            raise RadialError(f"shard labels not found: {path}")
        rows = read_jsonl(path)
        for row in rows:
            if row["id"] in seen:
                raise RadialError(f"example {row['id']} is in both {seen[row['id']]} and {path}")
            seen[row["id"]] = path
        shards.append(rows)
    if not seen:
        raise RadialError("the shards hold no labels")
    # Shard s holds examples s, s + S, s + 2S, ... (round robin), so interleave them back.
    return [row for group in itertools.zip_longest(*shards) for row in group if row is not None]


def run_gather(args: argparse.Namespace) -> int:
    from radial import tracking

    labels = gather_labels(args.shard_files)
    kept, label_set = select_label_set(labels, args.improved_share, args.seed)
    if not kept:
        raise RadialError(
            f"no example of {len(labels)} searched has a correct path: nothing to train routers on "
            "(more examples, more simulations, or an easier task)"
        )
    stats = summarize(labels) | {"label_set": label_set}
    with tracking.stage_run("mcts", args, config={"shards": len(args.shard_files)}) as run:
        # One file at a time (each atomically): the folder also holds the shards and progress files.
        write_jsonl(args.out_dir / "labels.jsonl", kept)
        write_json(args.out_dir / "stats.json", stats)
        with atomic_path(args.out_dir / PLOT_NAME) as tmp:
            plot_summary(tmp, stats, labels)
        import wandb

        run.summary.update({k: v for k, v in stats.items() if not isinstance(v, (dict, list))})
        run.summary.update({f"label_set/{k}": v for k, v in label_set.items() if not isinstance(v, dict)})
        run.log({f"class_counts/{k}": v for k, v in stats["class_counts"].items()})
        columns = ["id", "task", "level", "path", "reward", "default_correct", "simulations", "layers_saved"]
        run.log({"labels": wandb.Table(columns=columns, data=[[str(x.get(c)) for c in columns] for x in labels])})
        tracking.log_image(run, "layers_saved", args.out_dir / PLOT_NAME)
        outputs = [args.out_dir / "labels.jsonl", args.out_dir / "stats.json", args.out_dir / PLOT_NAME]
        tracking.log_artifact(run, f"{args.run_name}-mcts", "labels", outputs)
    print(
        f"{stats['examples']} examples searched: mean layers saved {stats['mean_layers_saved']:.2f}, "
        f"improved {stats['fraction_improved']:.0%}, prefix sharing eval_reduction={stats['eval_reduction']}; "
        f"label set {label_set['kept']} kept ({label_set['dropped_no_correct_path']} without a correct path "
        f"and {label_set['dropped_for_enrichment']} for enrichment dropped), classes {label_set['class_counts_kept']} "
        f"-> {args.out_dir}"
    )
    return 0
