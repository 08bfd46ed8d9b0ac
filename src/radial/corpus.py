"""The text every training stage learns from, and how it is batched.

The embedded base model pre-trains on it, and SoFT, DLO and the radial distillation fine-tune on
the same examples batched the same way: synthetic questions one per row, learning the answers
only, or benchmark train text packed into sequences. Packed questions would be a context the model
never saw: fine-tuned on them, the embedded model fell from 96 % to 27 % on the synthetic task with
every layer kept.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Iterator

import torch

from radial import settings
from radial.training import distributed
from radial.utils import RadialError, read_jsonl

SYNTHETIC_TASK = "synthetic"
# Benchmark train splits mixed into pre-training so the tokenizer and model have seen English.
# Only train-like splits: the evaluation splits stay unseen.
BENCHMARK_SPLITS = {"arc_easy": "train", "arc_challenge": "train", "gsm8k": "train", "mmlu": "dev"}


def corpus_files(data_dir: Path) -> tuple[Path, list[Path]]:
    """The files pre-training (and fine-tuning on its batches) reads: the synthetic train split, and
    the benchmark train splits that are present."""
    benchmark = [data_dir / task / f"{split}.jsonl" for task, split in BENCHMARK_SPLITS.items()]
    return data_dir / SYNTHETIC_TASK / "train.jsonl", [path for path in benchmark if path.is_file()]


def load_corpus(data_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Pre-training data: synthetic (question, answer line) pairs and benchmark train examples as text."""
    synthetic_file, benchmark_files = corpus_files(data_dir)
    synthetic_pairs = [synthetic_pair(row, synthetic_file) for row in read_jsonl(synthetic_file)]
    benchmark_texts = [benchmark_text(row) for path in benchmark_files for row in read_jsonl(path)]
    return synthetic_pairs, benchmark_texts


def synthetic_pair(row: dict, path: Path) -> tuple[str, str]:
    """The line the model learns from, as (prompt, target): the question, then answer and newline
    (generation stops at "\\n")."""
    try:
        return row["question"], f"{row['answer']}\n"
    except KeyError as err:
        raise RadialError(f"{path}: row {row.get('id', '?')} has no {err.args[0]!r} field") from None


def benchmark_text(row: dict) -> str:
    """A benchmark example as plain English: question, then the correct answer (or GSM8K's solution)."""
    if row.get("choices"):
        answer = row["choices"][row["answer"]]
    else:
        answer = row.get("solution", row["answer"])
    return f"Question: {row['question']}\nAnswer: {answer}\n"


# A training example: token ids and the labels learned from them (-100 where nothing is learned).
Example = tuple[list[int], list[int]]


def pretraining_examples(tokenizer, data_dir: Path) -> tuple[list[Example], list[Example]]:
    """The embedded model's training data from <data-dir>, tokenized: (synthetic, benchmark) examples."""
    synthetic_pairs, benchmark_texts = load_corpus(data_dir)
    return prompt_target_examples(tokenizer, synthetic_pairs), text_examples(tokenizer, benchmark_texts)


def text_examples(tokenizer, texts: list[str]) -> list[Example]:
    """Plain language modelling: every token is learned."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [(tokens, list(tokens)) for tokens in ids]


def prompt_target_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[Example]:
    """Prompt tokens are context only; the loss is on the target (answer and newline).

    The synthetic operands are uniformly random digits: predicting them teaches nothing, and with
    their loss in the mix a small model learned the sums far more slowly (13 % vs 58 % exact on
    level 1 after 600 steps of the embedded default).
    """
    if not pairs:
        return []
    prompts = tokenizer([prompt for prompt, _ in pairs], add_special_tokens=False)["input_ids"]
    fulls = tokenizer([prompt + target for prompt, target in pairs], add_special_tokens=False)["input_ids"]
    examples = []
    for (prompt, _), prompt_ids, full_ids in zip(pairs, prompts, fulls):
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise RadialError(f"the tokenizer merges the end of the prompt {prompt!r} with its answer")
        examples.append((full_ids, [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]))
    return examples


def pack_examples(examples: list[Example], seq_len: int, rng: random.Random) -> Iterator[Example]:
    """Endless sequences of whole examples in shuffled order (reshuffled every epoch).

    Every sequence starts at an example boundary, because evaluation prompts come at position 0 with
    no BOS token before them. An example that no longer fits starts the next sequence; one longer
    than `seq_len` is cut.
    """
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        ids: list[int] = []
        labels: list[int] = []
        for index in order:
            example_ids, example_labels = (part[:seq_len] for part in examples[index])
            if len(ids) + len(example_ids) > seq_len:
                yield ids, labels
                ids, labels = [], []
            ids += example_ids
            labels += example_labels
        if ids:
            yield ids, labels


def add_batching_arguments(parser, section: str) -> None:
    """The flags of `pretraining_batches` (--seq-len, --synthetic-batch-size, --benchmark-fraction), with
    the defaults of config section `section`: model.embedded, baselines.finetune or distill."""
    for name in ("seq_len", "synthetic_batch_size", "benchmark_fraction"):
        settings.add_setting(parser, f"{section}.{name}")


def pretraining_batches(
    synthetic: list[Example],
    benchmark: list[Example],
    benchmark_fraction: float,
    synthetic_batch_size: int,
    batch_size: int,
    seq_len: int,
    pad_id: int,
    rng: random.Random,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, labels) batches for pre-training the embedded model.

    A step trains either on `synthetic_batch_size` synthetic questions, one per row starting at
    position 0 (the way they are evaluated: zero-shot, no BOS), or, with `benchmark_fraction`, on
    `batch_size` sequences of benchmark text packed to `seq_len`.

    Why the questions are not packed: behind unrelated questions the model must first learn where
    its own question starts. Packed, seed 0 of the embedded recipe stayed near chance after 1000
    steps (7-16 % per level); one question per row, the same seed reached 97 % on level 1 in 1500.
    Padding sits at the end of a row, so pre-training needs no attention mask (causal attention
    never lets a real token see it).
    """
    question_stream = shuffled_forever(synthetic, random.Random(rng.random()))
    benchmark_stream = pack_examples(benchmark, seq_len, random.Random(rng.random())) if benchmark else None
    while True:
        if benchmark_stream and rng.random() < benchmark_fraction:
            sequences = [next(benchmark_stream) for _ in range(batch_size)]
        else:
            sequences = [next(question_stream) for _ in range(synthetic_batch_size)]
        yield right_padded(sequences, pad_id)


def shuffled_forever(examples: list[Example], rng: random.Random) -> Iterator[Example]:
    """Every example once per epoch, in a new random order each epoch."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for index in order:
            yield examples[index]


def right_padded(sequences: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) tensors, right-padded to the longest sequence; padding is labelled -100."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (sequence_ids, sequence_labels) in enumerate(sequences):
        input_ids[row, : len(sequence_ids)] = torch.tensor(sequence_ids)
        labels[row, : len(sequence_labels)] = torch.tensor(sequence_labels)
    return input_ids, labels


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
                synthetic_batch_size=self.synthetic_batch_size * distributed.world_size(),
                batch_size=self.batch_size * distributed.world_size(),
                seq_len=self.seq_len,
                pad_id=self.pad_id,
                rng=random.Random(self.seed),
            )
            self._next = 0
        while self._next <= micro_step:
            input_ids, labels = next(self._stream)
            self._next += 1
        per_rank = len(input_ids) // distributed.world_size()
        rows = slice(distributed.rank() * per_rank, (distributed.rank() + 1) * per_rank)
        input_ids, labels = input_ids[rows], labels[rows]
        # Prompt tokens carry label -100 too (only answers are learned), so the mask comes from padding.
        return {"input_ids": input_ids, "labels": labels, "attention_mask": (input_ids != self.pad_id).long()}
