"""SoFT evaluation variants over the one sorted-fine-tuned model (see radial.stages.baselines.soft).

    python -m radial soft-exit --model results/embedded/models/soft --depth 6 --out results/embedded/models/soft-exit6
    python -m radial soft-exit --model results/embedded/models/soft --threshold 0.9 \\
        --out results/embedded/models/soft-conf0.9

--depth n: the sub-model of the first n layers, through the shared final norm and LM head (a
routed model with the static path [0, ..., n-1]).
--threshold t: confidence-threshold early exit at the model's trained exits below L (a routed
model with a ConfidenceExitRouter; see radial.routing.early_exit for the rule and its KV cache).
Both folders are a few kilobytes: they reference the SoFT weights, never copy them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from radial import settings, tracking
from radial.variant_folders import VARIANT_INFO, num_layers_of, write_variant_folder
from radial.settings import add_common_arguments
from radial.utils import RadialError, seed_everything


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_path_argument(parser, "model", "the SoFT model folder (radial soft output)")
    which = parser.add_mutually_exclusive_group(required=True)
    settings.add_setting(
        which, "baselines.soft.exits", flag="--depth", nargs=None, default=None,
        help="exit after this many layers (a fixed sub-model; one value of baselines.soft.exits)",
    )
    settings.add_setting(
        which, "baselines.soft.thresholds", flag="--threshold", nargs=None, default=None,
        help="exit at the first trained exit with max softmax >= threshold (one value of baselines.soft.thresholds)",
    )
    settings.add_path_argument(parser, "out", "routed model folder to write (atomically)")
    add_common_arguments(parser)


def trained_exits(soft_dir: Path) -> list[int]:
    path = Path(soft_dir) / VARIANT_INFO
    if not path.is_file():
        raise RadialError(f"{path} not found: {soft_dir} is not a SoFT model folder (run `radial soft` first)")
    info = json.loads(path.read_text())
    if info.get("method") != "soft" or not info.get("exits"):
        raise RadialError(f"{path}: not a SoFT model (method {info.get('method')!r}, exits {info.get('exits')})")
    return [int(n) for n in info["exits"]]


def main(args: argparse.Namespace) -> int:
    import torch

    from radial.routing import ConfidenceExitRouter, RoutedForCausalLM

    seed_everything(args.seed)
    exits = trained_exits(args.model)
    num_layers = num_layers_of(args.model)
    info = {"base_model": str(args.model), "num_layers": num_layers, "trained_exits": exits}
    if args.depth is not None:
        if not 1 <= args.depth <= num_layers:
            raise RadialError(f"--depth must be in 1..{num_layers}, got {args.depth}")
        if args.depth not in exits:
            print(f"warning: depth {args.depth} was not one of the trained exits {exits}")
        routed = RoutedForCausalLM.from_base(str(args.model), paths=list(range(args.depth)), dtype=torch.float32)
        info |= {
            "method": "soft-exit",
            "depth": args.depth,
            "description": f"SoFT sub-model: the first {args.depth} of {num_layers} layers, shared norm and head",
        }
        name = f"soft-exit{args.depth}"
    else:
        early_exits = [n for n in exits if n < num_layers]
        if not early_exits:
            raise RadialError(f"{args.model} was trained with no exit below the full depth {num_layers}")
        router = ConfidenceExitRouter(num_layers, early_exits, args.threshold)
        routed = RoutedForCausalLM.from_base(str(args.model), router=router, dtype=torch.float32)
        info |= {
            "method": "soft-conf",
            "threshold": args.threshold,
            "exits": early_exits,
            "description": f"SoFT confidence exit: stop at the first of exits {early_exits} whose next-token "
            f"max softmax is >= {args.threshold} (decided per example at prefill)",
        }
        name = f"soft-conf{args.threshold:g}"

    with tracking.stage_run("soft_exit", args, config=info) as run:
        write_variant_folder(routed, args.model, args.out, info)
        tracking.log_artifact(run, f"{args.run_name}-{name}", "model", [args.out])
    print(f"{name}: {info['description']} -> {args.out}")
    return 0
