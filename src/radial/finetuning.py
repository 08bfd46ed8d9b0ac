"""What SoFT and DLO fine-tuning share with the radial distillation: flags, model loading, loss, summary.

All three fine-tune on the examples the embedded base model was pre-trained on, batched the same
way (radial.corpus.FinetuneBatches); SoFT and DLO get the same training budget in the workflow
(config key baselines.finetune).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from radial import settings, training
from radial.corpus import BENCHMARK_SPLITS, add_batching_arguments
from radial.utils import RadialError


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags SoFT and DLO share: model, data, output, batching and training (baselines.finetune)."""
    settings.add_path_argument(parser, "model", "model folder to fine-tune (HF format, with tokenizer)")
    settings.add_path_argument(
        parser,
        "data_dir",
        "normalized data: synthetic/train.jsonl and the benchmark train splits ("
        + ", ".join(f"{task}/{split}.jsonl" for task, split in BENCHMARK_SPLITS.items())
        + ")",
    )
    settings.add_path_argument(parser, "out", "output model folder (written atomically)")
    add_batching_arguments(parser, "baselines.finetune")
    settings.add_threads_argument(parser)
    training.add_train_arguments(parser, "baselines.finetune")


def load_for_finetuning(model_dir: Path):
    """The model (float32, train mode) and tokenizer to fine-tune."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise RadialError(f"model folder {model_dir} not found or has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.train(), tokenizer


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (labels -100 are ignored), in float32."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def training_summary(history: list[dict], keys: list[str]) -> dict:
    """First and last values (mean over the last tenth of the steps) of the given history keys."""
    tail = history[-max(1, len(history) // 10) :]
    return {
        "steps": len(history),
        "first": {k: history[0].get(k) for k in keys} if history else {},
        "last": {k: sum(row[k] for row in tail) / len(tail) for k in keys if all(k in row for row in tail)},
        "seconds": round(sum(row.get("seconds", 0.0) for row in history), 1),
    }
