"""`python -m radial <stage> ...`: every workflow stage runs without Snakemake.

Each stage module (radial/stages/, one per workflow/rules/*.smk) exposes `add_arguments(parser)`
and `main(args)`. Only the chosen stage is imported, so `--help` is fast and a stage pays only for
its own heavy imports. Flags linked to config keys are checked against the config schema before
the stage starts (radial.settings).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from radial import __version__, settings
from radial.utils import RadialError, model_folder_problem

STAGES = {
    "data": ("radial.stages.data", "normalize benchmark files (ARC, GSM8K, MMLU) and build the synthetic task"),
    "base-model": ("radial.stages.base_model", "build and pre-train the embedded tiny model, or fetch a Hub/local model"),
    "profile": ("radial.stages.profile", "residual profiling: residual ratio, block influence, cosine per layer and token"),
    "mcts": ("radial.stages.mcts", "MCTS layer-path search: per-example skip/execute/repeat labels for router training"),
    "routers": ("radial.stages.routers", "Dr.LLM routers trained on MCTS layer labels, base frozen (DeepSpeed ZeRO)"),
    "distill": ("radial.stages.distill", "distil the dense model into a token-routed radial student (DeepSpeed ZeRO)"),
    "shortgpt": ("radial.stages.baselines.shortgpt", "ShortGPT baseline: prune the k layers of lowest Block Influence"),
    "soft": ("radial.stages.baselines.soft", "SoFT baseline: sorted fine-tuning of nested sub-models (shared norm and head)"),
    "soft-exit": ("radial.stages.baselines.soft_exit", "SoFT variants: a fixed exit depth or a confidence-threshold early exit"),
    "dlo": ("radial.stages.baselines.dlo", "DLO-style baseline: per-layer token skip routers trained during fine-tuning"),
    "evaluate": ("radial.stages.evaluate", "evaluate one model variant on one or more tasks with the stock lm-evaluation-harness"),
    "depth-trend": ("radial.stages.depth_trend", "the residual contribution of several profiled models against their depth and size"),
    "report": ("radial.stages.report", "collect evaluations and profiling plots into report.md and table.csv"),
    "wandb-report": ("radial.stages.wandb_report", "a wandb Report of one run's tables, Pareto plot and training curves"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radial", description="radial: pipeline for dynamic-depth LLMs.")
    parser.add_argument("--version", action="version", version=f"radial {__version__}")
    stages = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for stage, (_, help_text) in STAGES.items():
        stages.add_parser(stage, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        _top_level_parser().parse_args(argv)  # prints help, version or a usage error, then exits
        return 2
    stage, rest = argv[0], argv[1:]
    module_name, help_text = STAGES[stage]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"radial {stage}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        settings.check_arguments(parser, args)
        check_model_folders(args)
        return int(module.main(args) or 0)
    except RadialError as err:
        print(f"radial {stage}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are written atomically and training / MCTS resume from their checkpoints: say so, no traceback
        # (on a line of its own: a progress bar was most likely being drawn).
        print(f"\nradial {stage}: interrupted; no output was completed (run it again to resume where it can)", file=sys.stderr)
        return 130


def check_model_folders(args: argparse.Namespace) -> None:
    """Every model folder a stage was given (and the base folder a routed one references) has whole
    weights files: a file cut short stops the stage naming it, before a loader fails without a name."""
    for value in vars(args).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, Path)) and Path(item).is_dir() and (Path(item) / "config.json").is_file():
                problem = model_folder_problem(item)
                if problem:
                    raise RadialError(problem)


if __name__ == "__main__":
    sys.exit(main())
