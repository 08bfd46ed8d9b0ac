"""Base model stage: fetch a Hugging Face model, or build and pre-train the embedded tiny Llama.

Either way the stage writes one HF-format folder (config, safetensors weights, tokenizer) plus
`radial_base.json`, so every later stage reads the same kind of thing:

    python -m radial base-model --name-or-path meta-llama/Llama-3.2-3B \\
        --out results/meta-llama--Llama-3.2-3B/models/dense
    python -m radial base-model --out results/embedded/models/dense --data-dir results/data    # embedded default

The embedded default is a deep, narrow Llama trained from scratch on CPU in minutes: a byte-level
BPE tokenizer trained on the corpus (radial.corpus), then a plain AdamW loop (cosine schedule with
warmup, betas 0.9/0.95) over synthetic arithmetic questions, one per row, with steps of packed
benchmark English mixed in. With `--layer-drop p` each step leaves layer l out with probability
p·l/(L−1) (LayerDrop with LayerSkip's depth schedule): pretrained LLMs have redundant late layers,
which a small model trained briefly does not grow on its own, and layer routing has nothing to
save without them. Afterwards the model answers the synthetic test questions greedily,
the way lm-eval's `generate_until` will, and the per-level accuracy goes into `radial_base.json`.

That loop (`pretrain`) is deliberately not the DeepSpeed harness the fine-tuning stages share
(radial.training): `bench/pretrain_loop.py` measured the harness at the same cost per step (0.230
against 0.226 s, initialize 0.6 s), so speed is no reason either way, but the harness's optimizer
and schedule (betas 0.9/0.999, its warm-up formula) would change a recipe whose results are
seed-sensitive (level-5 accuracy 49-94 % over seeds). It stays a short loop of its own.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from radial import settings
from radial.corpus import (
    SYNTHETIC_TASK,
    load_corpus,
    pretraining_batches,
    prompt_target_examples,
    text_examples,
)
from radial.utils import RadialError, atomic_path, read_jsonl, seed_everything, write_json

MAX_POSITION_EMBEDDINGS = 512
HUB_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write an HF-format model folder: a Hub model or local folder copied with save_pretrained, or "
        "(without --name-or-path) the embedded tiny Llama pre-trained from scratch on CPU."
    )
    settings.add_path_argument(parser, "out", "output folder (written atomically)")
    settings.add_setting(
        parser, "model.name_or_path", metavar="ID_OR_DIR",
        help="config key model.name_or_path: a Hub model id or a local HF folder; without it, build the embedded model",
    )
    settings.add_path_argument(
        parser,
        "data_dir",
        "normalized data (<task>/<split>.jsonl): the embedded model pre-trains on synthetic/train.jsonl "
        "and benchmark train splits; synthetic/test.jsonl is evaluated",
        required=False,
    )
    embedded = parser.add_argument_group("embedded model (used without --name-or-path; config section model.embedded)")
    settings.add_settings(embedded, "model.embedded")
    settings.add_threads_argument(parser)
    settings.add_common_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from radial.tracking import log_artifact, stage_run

    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    with stage_run("base_model", args) as run:
        with atomic_path(args.out) as out_dir:
            out_dir.mkdir()
            if args.name_or_path:
                model, tokenizer = load_pretrained(args.name_or_path)
                train_summary = None
            else:
                model, tokenizer, train_summary = build_embedded_model(args, out_dir, run)
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)

            accuracy, chance = evaluate_synthetic(model, tokenizer, args)
            run.log({f"synthetic_accuracy/level_{level}": value for level, value in accuracy.items()})
            summary = {
                "source": args.name_or_path or "embedded",
                "num_layers": model.config.num_hidden_layers,
                "num_parameters": model.num_parameters(),
                "train": train_summary,
                "synthetic_accuracy": accuracy,
                "chance": chance,
                "config": embedded_config(args),
            }
            write_json(out_dir / "radial_base.json", summary)
        run.summary.update({"num_parameters": summary["num_parameters"], "synthetic_accuracy": accuracy})
        log_artifact(run, f"{args.run_name}-base_model", "model", [args.out])

    levels = ", ".join(f"L{level} {value:.0%}" for level, value in accuracy.items()) or "not evaluated"
    print(f"wrote {summary['source']} model ({summary['num_parameters']:,} parameters) to {args.out}; "
          f"synthetic accuracy: {levels}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Fail before anything is opened or written when the inputs cannot work."""
    if args.name_or_path is None:
        if args.data_dir is None:
            raise RadialError("the embedded model is pre-trained on <data-dir>/synthetic/train.jsonl: pass --data-dir")
        train_file = args.data_dir / SYNTHETIC_TASK / "train.jsonl"
        if not train_file.is_file():
            raise RadialError(f"{train_file}: synthetic train split not found (run the data stage first)")
        if args.seq_len > MAX_POSITION_EMBEDDINGS:
            raise RadialError(f"--seq-len {args.seq_len} exceeds max_position_embeddings {MAX_POSITION_EMBEDDINGS}")
        if args.hidden_size % args.heads or args.heads % args.kv_heads:
            raise RadialError(
                f"--hidden-size {args.hidden_size} must be divisible by --heads {args.heads}, "
                f"and --heads by --kv-heads {args.kv_heads}"
            )
    elif is_local_path(args.name_or_path) and not Path(args.name_or_path).expanduser().exists():
        raise RadialError(f"model.name_or_path: local model folder {args.name_or_path} does not exist")


def embedded_config(args: argparse.Namespace) -> dict:
    """The flags that define the embedded model and its pre-training: config section model.embedded,
    threads and seed."""
    keys = [key.rsplit(".", 1)[-1] for key in settings.section_keys("model.embedded")] + ["threads", "seed"]
    return {key: getattr(args, key) for key in keys}


# ---------------------------------------------------------------------------------------------
# A Hub model or a local folder


def is_local_path(name_or_path: str) -> bool:
    """True for anything that can only be a path; "org/name" and "name" may be Hub ids."""
    return (
        Path(name_or_path).expanduser().exists()
        or name_or_path.startswith(("/", "./", "../", "~"))
        or name_or_path.count("/") > 1
    )


def load_pretrained(name_or_path: str):
    """Load a causal LM and its tokenizer from a local folder or the Hub, never hanging offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from radial import hub

    # When the Hub cannot serve the model, one already in the local HF cache still loads; else a clear error.
    unavailable = None if is_local_path(name_or_path) else hub.unavailable_reason("model", name_or_path, HUB_TIMEOUT_S)
    local_files_only = unavailable is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto", local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        why = f"the Hugging Face Hub cannot serve it ({unavailable}) and it is not cached" if unavailable else err
        raise RadialError(f"model.name_or_path: cannot load {name_or_path!r}: {why}") from None
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# The embedded model: corpus, tokenizer, model, pre-training


def build_embedded_model(args: argparse.Namespace, out_dir: Path, run):
    """Train the tokenizer, build the Llama and pre-train it; returns (model, tokenizer, train summary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from radial.tokenizer import train_tokenizer

    synthetic_pairs, benchmark_texts = load_corpus(args.data_dir)
    tokenizer = train_tokenizer([prompt + target for prompt, target in synthetic_pairs] + benchmark_texts, args.vocab_size)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)

    batches = pretraining_batches(
        synthetic=prompt_target_examples(tokenizer, synthetic_pairs),
        benchmark=text_examples(tokenizer, benchmark_texts),
        benchmark_fraction=args.benchmark_fraction,
        synthetic_batch_size=args.synthetic_batch_size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        pad_id=tokenizer.pad_token_id,
        rng=random.Random(args.seed),
    )
    train_summary = pretrain(model, batches, args, run)
    plot_loss(train_summary.pop("losses"), out_dir / "loss.png")
    from radial.tracking import log_image

    log_image(run, "train/loss_curve", out_dir / "loss.png")
    return model, tokenizer, train_summary


def pretrain(model, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], args: argparse.Namespace, run) -> dict:
    """AdamW with linear warmup then cosine decay; weight decay on matrices only (nanoGPT recipe)."""
    from transformers import get_cosine_schedule_with_warmup

    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)

    model.train()
    losses: list[float] = []
    tokens_seen = 0
    layers_run = 0
    all_layers = model.model.layers
    drop_rates = layer_drop_rates(len(all_layers), args.layer_drop)
    drops = random.Random(f"radial-layer-drop/{args.seed}")
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc="pre-training", unit="step")
    for step in progress:
        input_ids, labels = next(batches)
        kept = [layer for layer, rate in zip(all_layers, drop_rates) if drops.random() >= rate]
        layers_run += len(kept)
        model.model.layers = torch.nn.ModuleList(kept)  # this step's stack (attention is uncached)
        try:
            loss = model(input_ids=input_ids, labels=labels).loss
        finally:
            model.model.layers = all_layers
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(loss.item())
        tokens_seen += int((labels != -100).sum())
        run.log({"train/loss": losses[-1], "train/lr": scheduler.get_last_lr()[0], "train/tokens": tokens_seen}, step=step)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()

    tail = losses[-max(1, min(20, len(losses) // 10)) :]  # smooth over the last steps
    return {
        "steps": args.steps,
        "tokens_seen": tokens_seen,
        "layer_drop": args.layer_drop,
        "mean_layers_per_step": layers_run / max(1, args.steps),
        "initial_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "losses": losses,
    }


def layer_drop_rates(num_layers: int, layer_drop: float) -> list[float]:
    """LayerSkip's schedule: 0 for the first layer, rising linearly to `layer_drop` for the last."""
    return [layer_drop * layer / max(1, num_layers - 1) for layer in range(num_layers)]


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy, nats/token)")
    ax.set_title("Embedded model pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Synthetic accuracy, read the way lm-eval's generate_until reads it


def evaluate_synthetic(model, tokenizer, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Greedy exact-match accuracy per level on <data-dir>/synthetic/test.jsonl, and chance per level.

    Chance is the best constant guess: the share of the level's most common answer among the
    evaluated questions. Without the test file: ({}, {}).
    """
    if args.data_dir is None or not (args.data_dir / SYNTHETIC_TASK / "test.jsonl").is_file():
        return {}, {}
    rows_by_level: dict[int, list[dict]] = defaultdict(list)
    for row in read_jsonl(args.data_dir / SYNTHETIC_TASK / "test.jsonl"):
        if len(rows_by_level[row["level"]]) < args.eval_examples_per_level:
            rows_by_level[row["level"]].append(row)

    # One token per answer character at most, plus the "\n" that ends it.
    max_new_tokens = max(len(str(row["answer"])) for rows in rows_by_level.values() for row in rows) + 1
    accuracy = {}
    for level in tqdm(sorted(rows_by_level), desc="synthetic accuracy", unit="level"):
        rows = rows_by_level[level]
        answers = greedy_answers(model, tokenizer, [row["question"] for row in rows], max_new_tokens)
        correct = sum(answer == str(row["answer"]).strip() for answer, row in zip(answers, rows))
        accuracy[str(level)] = correct / len(rows)
    chance = {}
    for level, rows in sorted(rows_by_level.items()):
        answer_counts = Counter(str(row["answer"]).strip() for row in rows)
        chance[str(level)] = max(answer_counts.values()) / len(rows)
    return accuracy, chance


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Left-padded batched greedy generation; each answer is the text before the first "\\n", stripped.

    Mirrors lm-eval's HFLM: the tokenizer's own special-token handling (no BOS for our tokenizer),
    pad on the left, decode the new tokens without special tokens, cut at the stop string.
    """
    if tokenizer.pad_token is None:  # e.g. Llama 3; lm-eval pads with EOS too
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], padding=True, padding_side="left", return_tensors="pt")
        generated = model.generate(
            **encoded.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            answers.append(text.split("\n")[0].strip())
    return answers
