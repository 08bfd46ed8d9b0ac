"""ShortGPT static pruning (Men et al. 2024, arXiv 2403.03853): remove the k least influential layers.

    python -m radial shortgpt --model results/embedded/models/dense --profile results/embedded/profile --k 4 \\
        --out results/embedded/models/shortgpt-k4

Block Influence is BI_i = 1 − E_tokens[cos(x_i, x_{i+1})], layer i's input against its output,
averaged over the calibration tokens; the profile stage has it per layer (summary.json,
`metrics.block_influence.mean`). The k layers with the lowest BI go; ties go to the lower index.

The pruned model is a routed model folder with one static path (the kept layers, in order) over
the dense weights rather than a copy of the model with layers deleted: the folder is a few
kilobytes however large the model (a sweep over k would otherwise copy the weights once per k),
the kept layers run through the same driver as every other routed variant (so wall times differ
by depth, not by code path), and no layer has to be renumbered for the KV cache. It loads with
`AutoModelForCausalLM.from_pretrained` after `import radial.routing`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from radial import settings, tracking
from radial.variant_folders import num_layers_of, write_variant_folder
from radial.settings import add_common_arguments
from radial.utils import RadialError, seed_everything


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_path_argument(parser, "model", "dense model folder (HF format, with tokenizer)")
    parser.add_argument("--profile", required=True, type=Path, help="profile stage output folder (summary.json)")
    settings.add_setting(
        parser, "baselines.shortgpt.k", nargs=None, default=None, required=True,
        help="number of layers to remove (one value of the config's sweep)",
    )
    settings.add_path_argument(parser, "out", "routed model folder to write (atomically)")
    add_common_arguments(parser)


def block_influence(profile_dir: Path) -> list[float]:
    """Per-layer Block Influence (mean over calibration tokens) from the profile's summary.json."""
    path = Path(profile_dir) / "summary.json"
    if not path.is_file():
        raise RadialError(f"{path} not found (run the profile stage first)")
    summary = json.loads(path.read_text())
    try:
        values = summary["metrics"]["block_influence"]["mean"]
    except (KeyError, TypeError):
        raise RadialError(f"{path}: no metrics.block_influence.mean") from None
    if not values or any(v is None for v in values):
        raise RadialError(f"{path}: metrics.block_influence.mean has missing layers: {values}")
    return [float(v) for v in values]


def layers_to_remove(influence: Sequence[float], k: int) -> list[int]:
    """Indices (ascending) of the k layers with the lowest Block Influence; ties go to the lower index."""
    if not 1 <= k < len(influence):
        raise RadialError(f"k must be between 1 and {len(influence) - 1} (the model has {len(influence)} layers), got {k}")
    ranked = sorted(range(len(influence)), key=lambda layer: (influence[layer], layer))
    return sorted(ranked[:k])


def kept_path(num_layers: int, removed: Sequence[int]) -> list[int]:
    removed = set(removed)
    return [layer for layer in range(num_layers) if layer not in removed]


def plot_influence(path: Path, influence: Sequence[float], removed: Sequence[int], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["C3" if layer in set(removed) else "C0" for layer in range(len(influence))]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(influence) + 2), 3.5))
    ax.bar(range(len(influence)), influence, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("Block Influence 1 − cos(x, y)")
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color="C3"), plt.Rectangle((0, 0), 1, 1, color="C0")],
        labels=["removed", "kept"],
        fontsize=8,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    import torch

    from radial.routing import RoutedForCausalLM

    seed_everything(args.seed)
    influence = block_influence(args.profile)
    num_layers = num_layers_of(args.model)
    if len(influence) != num_layers:
        raise RadialError(
            f"{args.profile}/summary.json profiles {len(influence)} layers but {args.model} has {num_layers}"
        )
    removed = layers_to_remove(influence, args.k)
    path = kept_path(num_layers, removed)

    with tracking.stage_run("shortgpt", args, config={"num_layers": num_layers}) as run:
        routed = RoutedForCausalLM.from_base(str(args.model), paths=path, dtype=torch.float32)
        info = {
            "method": "shortgpt",
            "description": f"ShortGPT: the {args.k} layers of lowest Block Influence removed ({', '.join(map(str, removed))})",
            "base_model": str(args.model),
            "k": args.k,
            "num_layers": num_layers,
            "removed_layers": removed,
            "path": path,
            "block_influence": influence,
            "profile": str(args.profile),
        }
        title = f"ShortGPT k={args.k}: Block Influence per layer (removed in red)"
        write_variant_folder(
            routed, args.model, args.out, info, extra=lambda tmp: plot_influence(tmp / "block_influence.png", influence, removed, title)
        )
        run.summary.update({"k": args.k, "removed_layers": removed, "executed_layers": len(path)})
        tracking.log_image(run, "block_influence", args.out / "block_influence.png")
        tracking.log_artifact(run, f"{args.run_name}-shortgpt-k{args.k}", "model", [args.out])
    print(f"ShortGPT k={args.k}: removed layers {removed}, {len(path)} of {num_layers} kept -> {args.out}")
    return 0
