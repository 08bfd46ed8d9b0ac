"""What SoFT and DLO fine-tuning share: the data, the CLI flags and how a training run is summarised.

Both fine-tune on the same examples the embedded base model was pre-trained on
(radial.base_model.pretraining_examples), batched the same way (radial.base_model.pretraining_batches):
synthetic questions one per row, learning the answers only, or benchmark train text packed into
sequences. Packed questions would be a context the model never saw: fine-tuned on them, the
embedded model fell from 96 % to 27 % on the synthetic task with every layer kept. The two
baselines get the same data and, in the workflow, the same training budget (config key
baselines.finetune); the radial distillation uses these batches too.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Iterator

import torch

from radial import training
from radial.base_model import (
    BENCHMARK_SPLITS,
    SYNTHETIC_TASK,
    add_batching_arguments,
    corpus_files,
    pretraining_batches,
    pretraining_examples,
)
from radial.utils import RadialError


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model folder to fine-tune (HF format, with tokenizer)")
    parser.add_argument(
        "--data-dir",
        required=True,
        type=Path,
        help="normalized data: synthetic/train.jsonl and the benchmark train splits ("
        + ", ".join(f"{task}/{split}.jsonl" for task, split in BENCHMARK_SPLITS.items())
        + ")",
    )
    parser.add_argument("--out", required=True, type=Path, help="output model folder (written atomically)")
    add_batching_arguments(parser, seq_len=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    training.add_train_arguments(parser, steps=150, lr=1e-3, warmup_steps=10, checkpoint_every=50)


def run_fingerprint(args: argparse.Namespace, *method_flags: str) -> dict:
    """What a fine-tuning run depends on besides its TrainConfig: the batching and method flags, the
    model and the data files FinetuneBatches reads. Checkpoints are resumed only under the same
    fingerprint (training.train), so an interrupted run is not continued with other settings."""
    synthetic_file, benchmark_files = corpus_files(Path(args.data_dir))
    files = [synthetic_file, *benchmark_files]
    flags = ("seq_len", "synthetic_batch_size", "benchmark_fraction", *method_flags)
    return {
        **{flag: getattr(args, flag) for flag in flags},
        "model": training.file_fingerprint(args.model),
        "data": {f"{file.parent.name}/{file.name}": training.file_fingerprint(file) for file in files if file.is_file()},
    }


class FinetuneBatches:
    """`batch_for_step` for the training harness: micro-step -> {input_ids, labels, attention_mask}.

    A pure function of the micro-step (the stream is rebuilt from the seed when asked to go back),
    so a resumed run sees the same batches. Each of W data-parallel ranks takes its own rows of a
    global batch of W x batch_size benchmark sequences or W x synthetic_batch_size questions.
    """

    def __init__(
        self,
        tokenizer,
        data_dir: Path,
        batch_size: int,
        seq_len: int,
        benchmark_fraction: float,
        seed: int,
        *,
        synthetic_batch_size: int,
    ):
        train_file = Path(data_dir) / SYNTHETIC_TASK / "train.jsonl"
        if not train_file.is_file():
            raise RadialError(f"{train_file}: synthetic train split not found (run the data stage first)")
        self.synthetic, self.benchmark = pretraining_examples(tokenizer, Path(data_dir))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size, self.synthetic_batch_size, self.seq_len = batch_size, synthetic_batch_size, seq_len
        self.benchmark_fraction, self.seed = benchmark_fraction, seed
        self.num_texts = len(self.synthetic) + len(self.benchmark)
        self._stream: Iterator | None = None
        self._next = 0

    @classmethod
    def from_args(cls, tokenizer, args: argparse.Namespace) -> "FinetuneBatches":
        """The batches a stage's parsed flags ask for (add_finetune_arguments, or distill's)."""
        return cls(
            tokenizer, args.data_dir, args.batch_size, args.seq_len, args.benchmark_fraction, args.seed,
            synthetic_batch_size=args.synthetic_batch_size,
        )

    def __call__(self, micro_step: int) -> dict[str, torch.Tensor]:
        if self._stream is None or micro_step < self._next:
            self._stream = pretraining_batches(
                synthetic=self.synthetic,
                benchmark=self.benchmark,
                benchmark_fraction=self.benchmark_fraction,
                synthetic_batch_size=self.synthetic_batch_size * training.world_size(),
                batch_size=self.batch_size * training.world_size(),
                seq_len=self.seq_len,
                pad_id=self.pad_id,
                rng=random.Random(self.seed),
            )
            self._next = 0
        while self._next <= micro_step:
            input_ids, labels = next(self._stream)
            self._next += 1
        per_rank = len(input_ids) // training.world_size()
        rows = slice(training.rank() * per_rank, (training.rank() + 1) * per_rank)
        input_ids, labels = input_ids[rows], labels[rows]
        # Prompt tokens carry label -100 too (only answers are learned), so the mask comes from padding.
        return {"input_ids": input_ids, "labels": labels, "attention_mask": (input_ids != self.pad_id).long()}


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
