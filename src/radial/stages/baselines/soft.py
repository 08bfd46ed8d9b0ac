"""Sorted fine-tuning (SoFT; Kavehzadeh et al. 2023, arXiv 2309.08968): one model, nested sub-models.

    python -m radial soft --model results/embedded/models/dense --data-dir results/data --exits 3 6 9 12 \\
        --out results/embedded/models/soft

Sub-model n is the first n decoder layers followed by the model's own final norm and LM head, so
all sub-models share every weight they have in common and there is no extra head. Fine-tuning
minimises the mean of the sub-models' next-token losses,

    loss = 1/|E| · Σ_{n ∈ E} CE(lm_head(norm(h_n)), next tokens)       h_n: output of layer n,

with one forward pass: hooks keep the hidden states after each exit's last layer. The exits E
default to every L/8 layers; the full depth L is always one of them (SoFT's largest sub-model is
the model itself). The result is a plain Hugging Face model folder (save_pretrained) with the
exits in `radial_variant.json`; `radial soft-exit` makes the evaluation variants from it.
Training runs on the shared DeepSpeed harness (radial.training).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from radial import settings, tracking, training
from radial.variant_folders import VARIANT_INFO
from radial.corpus import FinetuneBatches
from radial.finetuning import add_finetune_arguments, causal_lm_loss, load_for_finetuning, training_summary
from radial.layers import find_decoder_layers
from radial.routing.backbone import Backbone
from radial.settings import add_common_arguments
from radial.utils import RadialError, atomic_path, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_finetune_arguments(parser)
    settings.add_setting(parser, "baselines.soft.exits")
    add_common_arguments(parser)


def resolve_exits(exits: Sequence[int] | None, num_layers: int) -> list[int]:
    """Sorted, unique exit depths in 1..L, always including L; None means every L/8 layers (rounded up)."""
    if exits is None:
        exits = [math.ceil(num_layers * i / 8) for i in range(1, 9)]
    bad = [n for n in exits if not 1 <= n <= num_layers]
    if bad:
        raise RadialError(f"exit {bad[0]} is outside 1..{num_layers} (the model has {num_layers} layers)")
    return sorted({*exits, num_layers})


class ExitOutputs:
    """Forward hooks that keep the hidden state leaving layer n-1 (the first n layers) for each exit n."""

    def __init__(self, model: nn.Module, exits: Sequence[int]) -> None:
        self.model = model
        self.exits = list(exits)
        self.hidden: dict[int, torch.Tensor] = {}
        self.backbone = Backbone.of(model)
        layers = find_decoder_layers(model)
        self._handles = [layers[n - 1].register_forward_hook(self._keep(n)) for n in self.exits]

    def _keep(self, exit_depth: int):
        def hook(module, args, output):
            self.hidden[exit_depth] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def logits(self, exit_depth: int) -> torch.Tensor:
        """Sub-model `exit_depth`'s logits: the shared final norm and LM head on its hidden state."""
        return self.backbone.head(self.hidden[exit_depth])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def sorted_loss(model_call, batch: dict, exit_outputs: ExitOutputs) -> tuple[torch.Tensor, dict[str, float]]:
    """SoFT's loss (mean over exits of the sub-model losses) and each exit's loss as a metric.

    `model_call` is the model itself or the DeepSpeed engine wrapping it (the hooks sit on the
    model's layers either way).
    """
    exit_outputs.hidden.clear()
    # The model's own logits are not needed (every exit, the top one too, is read from the hooks).
    model_call(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False, logits_to_keep=1)
    losses = {n: causal_lm_loss(exit_outputs.logits(n), batch["labels"]) for n in exit_outputs.exits}
    loss = torch.stack(list(losses.values())).mean()
    return loss, {f"loss_exit{n}": value.item() for n, value in losses.items()}


def main(args: argparse.Namespace) -> int:
    cfg = training.start_stage(args)
    model, tokenizer = load_for_finetuning(args.model)
    num_layers = len(find_decoder_layers(model))
    exits = resolve_exits(args.exits, num_layers)
    batches = FinetuneBatches.from_args(tokenizer, args)
    exit_outputs = ExitOutputs(model, exits)
    checkpoint_dir = training.checkpoint_dir_for(args)

    with tracking.stage_run("soft", args, config={"num_layers": num_layers, "exits": exits}) as run:
        result = training.train(
            model,
            None,
            batches,
            lambda engine, batch: sorted_loss(engine, batch, exit_outputs),
            cfg,
            checkpoint_dir,
            run=run,
            desc="soft",
            fingerprint=training.run_fingerprint(args, "exits"),
        )
        exit_outputs.remove()
        trained = training.unwrapped_copy(result.engine, model).eval()
        loss_keys = ["loss"] + [f"loss_exit{n}" for n in exits]
        summary = training_summary(result.history, loss_keys)
        info = {
            "method": "soft",
            "description": f"SoFT: fine-tuned for {cfg.steps} steps on the mean loss of sub-models at depths "
            + ", ".join(map(str, exits)),
            "base_model": str(args.model),
            "num_layers": num_layers,
            "exits": exits,
            "train": summary | {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "lr": cfg.lr,
                                "seq_len": args.seq_len, "zero_stage": cfg.zero_stage},
            "train_texts": batches.num_texts,
        }
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            trained.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / VARIANT_INFO, info)
            training.plot_history(result.history, tmp / "training.png", keys=loss_keys, title="SoFT fine-tuning")
        run.summary.update({f"final/{k}": v for k, v in summary["last"].items()})
        tracking.log_image(run, "training", args.out / "training.png")
        tracking.log_artifact(run, f"{args.run_name}-soft", "model", [args.out])
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is complete; a later run must not resume it
    last = ", ".join(f"{k} {v:.3f}" for k, v in summary["last"].items())
    print(f"SoFT: exits {exits}, {cfg.steps} steps ({last}) -> {args.out}")
    return 0
