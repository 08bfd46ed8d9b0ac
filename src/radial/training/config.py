"""What a training run is told: `TrainConfig`, and the command-line flags every training stage shares.

The settings' types, limits and descriptions are defined once, under `$defs.training` of the config
schema; each config section (routers, distill, baselines.finetune) gives its own defaults, which
become its stage's flag defaults (radial.settings).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from radial import settings

@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
    weight_decay: float
    zero_stage: int
    checkpoint_every: int
    seed: int
    bf16: str = settings.default_of("$defs.training.bf16")
    deepspeed_config: Path | None = None
    grad_clip: float = settings.default_of("$defs.training.grad_clip")
    eval_every: int = settings.default_of("$defs.training.eval_every")
    keep_checkpoints: int = settings.default_of("$defs.training.keep_checkpoints")

    def __post_init__(self) -> None:
        self.bf16 = str(self.bf16).lower()
        settings.check_fields(self, "$defs.training", "training setting")
        if self.deepspeed_config is not None:
            self.deepspeed_config = Path(self.deepspeed_config)


def add_train_arguments(parser: argparse.ArgumentParser, section: str) -> None:
    """The training flags, with the defaults of config section `section` (e.g. "distill")."""
    group = parser.add_argument_group("training (DeepSpeed)")
    own = {key.rsplit(".", 1)[-1] for key in settings.section_keys(section)}
    for shared in settings.section_keys("$defs.training"):
        name = shared.rsplit(".", 1)[-1]
        if name == "seed":  # every stage's --seed (settings.add_common_arguments)
            continue
        # The section's own default where it sets the key (routers.steps), else the harness default.
        settings.add_setting(group, f"{section}.{name}" if name in own else shared, flag=settings.flag_name(name))
    group.add_argument(
        "--deepspeed-config",
        type=Path,
        default=None,
        help="DeepSpeed JSON; default: radial/resources/deepspeed/zero<N>.json of --zero-stage",
    )
    group.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="training checkpoints (resumed from when present); default: <out>.checkpoints",
    )


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    from radial.training.deepspeed_setup import zero_config_file

    names = [spec.name for spec in fields(TrainConfig) if spec.name != "deepspeed_config"]
    return TrainConfig(
        **{name: getattr(args, name) for name in names},
        deepspeed_config=args.deepspeed_config or zero_config_file(args.zero_stage),
    )


def start_stage(args: argparse.Namespace) -> TrainConfig:
    """What every training stage does first: torch threads, wandb on rank 0 only, seed; its TrainConfig."""
    from radial.training.distributed import rank
    from radial.utils import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    if rank() != 0:  # one wandb run per stage, from rank 0
        os.environ["WANDB_MODE"] = "disabled"
    seed_everything(args.seed)
    return train_config_from_args(args)


def checkpoint_dir_for(args: argparse.Namespace) -> Path:
    """--checkpoint-dir, else a sibling of --out (outside the declared output, so it survives a kill)."""
    if args.checkpoint_dir is not None:
        return Path(args.checkpoint_dir)
    out = Path(args.out)
    return out.parent / f"{out.name}.checkpoints"
