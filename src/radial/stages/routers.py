"""Routers stage: train Dr.LLM routers (arXiv 2510.12773) on MCTS path labels, the base model frozen.

    python -m radial routers --model results/embedded/models/dense --labels results/embedded/mcts/labels.jsonl \\
        --data-dir results/data --out results/embedded/models/routers

One router per layer, Linear(d, 128) -> GELU -> Linear(128, 3), over the hidden states entering
the layer mean-pooled in 8 windows of the prompt, window logits averaged (`DrLLMRouter`).
Training is teacher-forced on the labelled path: the router of layer i sees the hidden states
that the *labelled* path produces before layer i, never its own earlier decisions. Since the base
is frozen, those pooled states are a fixed function of (prompt, label path): they are computed
once, by the routed model itself (a recording router that replays the labels during prefill, so
the states are exactly those inference routes on), and the routers train on them.

Loss: focal loss (gamma 2) with class weights from the effective number of samples
(Cui et al. 2019, beta 0.999), w_c = (1 - beta) / (1 - beta^n_c) normalised to sum to the number
of classes seen, where n_c counts class c among *this run's* training labels (Dr.LLM hard-codes
weights fitted to its own label distribution). A class absent from the labels gets weight 0, and a
skip or repeat class with less than `--min-class-share` of the labels is learned as execute (in
training and validation labels alike): with ~1/share the weight of the others it made the routers
choose it where no label did (on the embedded default: 53 repeat labels of 11,916, validation F1 0
for repeat, 22 of 957 execute decisions turned into repeats; synthetic accuracy 0.79 at 10.5 layers,
0.82 at 10.3 with repeats suppressed).
AdamW, cosine schedule with warm-up, gradient accumulation, DeepSpeed ZeRO: radial.training.

Validation (a held-out share of the labelled examples): per-class and macro F1 of the teacher-forced
decisions, and the average layers executed when the routers drive the model themselves.

Output: a routed model folder (RoutedForCausalLM + DrLLMRouter; base referenced, not copied) that
loads with `AutoModelForCausalLM.from_pretrained` after `import radial.routing`, plus
`training.json` (metrics, class counts and weights, history), `curves.png` and `confusion.png`.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from radial import settings, training
from radial.utils import RadialError, read_jsonl, seed_everything

ACTIONS = ("skip", "execute", "repeat")
NUM_ACTIONS = len(ACTIONS)
INFO_FILE = "training.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_path_argument(parser, "model", "base model folder (frozen)")
    parser.add_argument("--labels", required=True, type=Path, help="MCTS labels jsonl (id, task, path, layer_labels)")
    settings.add_path_argument(
        parser, "data_dir", "normalized data, to look prompts up by id when a label row has none", required=False
    )
    settings.add_path_argument(parser, "out", "routed model folder to write (atomically)")
    for name in ("bottleneck", "windows", "focal_gamma", "class_beta", "min_class_share", "val_fraction", "max_length"):
        settings.add_setting(parser, f"routers.{name}")
    parser.add_argument("--feature-batch-size", type=int, default=32, help="prompts per teacher-forced forward")
    settings.add_device_argument(parser)
    settings.add_threads_argument(parser)
    training.add_train_arguments(parser, "routers")
    settings.add_common_arguments(parser)


# ---------------------------------------------------------------------------------------------
# Labels


@dataclass
class LabelledExample:
    id: str
    task: str
    prompt: str
    labels: list[int]
    level: int | None = None


def load_labels(path: Path, num_layers: int, data_dir: Path | None) -> list[LabelledExample]:
    """Read and check the label rows; take each prompt from the row or from the data by id.

    A row whose search found no correct path (reward 0) is no supervision: the MCTS gather drops
    those, and rows of label files written otherwise are skipped here too.
    """
    if not Path(path).is_file():
        raise RadialError(f"labels not found: {path}")
    rows = read_jsonl(path)
    if not rows:
        raise RadialError(f"{path}: no label rows")
    lookup: dict[str, dict] = {}
    examples = []
    for line, row in enumerate(rows, 1):
        for key in ("id", "task", "layer_labels"):
            if key not in row:
                raise RadialError(f"{path}:{line}: missing key '{key}'")
        labels = row["layer_labels"]
        if not isinstance(labels, list) or len(labels) != num_layers or any(v not in (0, 1, 2) for v in labels):
            raise RadialError(
                f"{path}:{line}: layer_labels must be {num_layers} values in 0 (skip), 1 (execute), 2 (repeat); got {labels}"
            )
        if not row.get("reward", 1.0):
            continue
        prompt = row.get("prompt")
        if prompt is None:
            prompt = _prompt_from_data(row, data_dir, lookup, f"{path}:{line}")
        examples.append(LabelledExample(str(row["id"]), str(row["task"]), str(prompt), [int(v) for v in labels], row.get("level")))
    if not examples:
        raise RadialError(f"{path}: no label row has a correct path (reward > 0)")
    return examples


def _prompt_from_data(row: dict, data_dir: Path | None, lookup: dict[str, dict], where: str) -> str:
    """The task's lm-eval prompt (doc_to_text) of the data row with the label's id."""
    from radial.path_eval import render_prompt

    if data_dir is None:
        raise RadialError(f"{where}: the row has no 'prompt'; pass --data-dir to look it up by id")
    task = str(row["task"])
    if not any(key.startswith(f"{task}\0") for key in lookup):
        files = sorted((Path(data_dir) / task).glob("*.jsonl"))
        if not files:
            raise RadialError(f"{where}: no data files under {Path(data_dir) / task}")
        for file in files:
            for data_row in read_jsonl(file):
                lookup[f"{task}\0{data_row['id']}"] = data_row
    data_row = lookup.get(f"{task}\0{row['id']}")
    if data_row is None:
        raise RadialError(f"{where}: id {row['id']!r} not found in {Path(data_dir) / task}/*.jsonl")
    return render_prompt(task, data_row)


def rare_classes(counts: list[int], min_share: float) -> list[int]:
    """The skip / repeat classes with fewer than `min_share` of all labels (execute never)."""
    total = sum(counts)
    return [c for c in (0, 2) if 0 < counts[c] < min_share * total]


def relabel_as_execute(examples: list[LabelledExample], classes: list[int]) -> list[LabelledExample]:
    """The examples with the labels of `classes` replaced by execute (1)."""
    if not classes:
        return examples
    return [replace(e, labels=[1 if value in classes else value for value in e.labels]) for e in examples]


def split_validation(examples: list[LabelledExample], fraction: float, seed: int) -> tuple[list, list]:
    """A fixed share of examples held out, chosen by a hash of (seed, id): stable as labels grow."""
    if not 0 <= fraction < 1:
        raise RadialError(f"--val-fraction must be in [0, 1), got {fraction}")
    held = [e for e in examples if zlib.crc32(f"{seed}:{e.id}".encode()) % 10_000 < fraction * 10_000]
    train = [e for e in examples if e not in held]
    if not train:
        raise RadialError("no training examples left after the validation split")
    return train, held


# ---------------------------------------------------------------------------------------------
# Loss and metrics


def class_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Effective-number class weights (1 - beta) / (1 - beta^n), normalised to sum to the classes seen."""
    if not 0 <= beta < 1:
        raise RadialError(f"class beta must be in [0, 1), got {beta}")
    n = torch.tensor(counts, dtype=torch.float64)
    present = n > 0
    if not present.any():
        raise RadialError("no labels to weight")
    weights = torch.zeros_like(n)
    weights[present] = (1.0 - beta) / (1.0 - beta ** n[present])
    weights = weights / weights.sum() * present.sum()
    return weights.float()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over samples of -w_y (1 - p_y)^gamma log p_y (logits [n, C], targets [n])."""
    log_p = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (-weights.to(log_p.device)[targets] * (1.0 - log_p.exp()) ** gamma * log_p).mean()


def f1_scores(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per-class F1 (NaN for a class neither predicted nor present), macro-F1 over the others, accuracy."""
    scores = {}
    for c, name in enumerate(ACTIONS):
        tp = int(((predicted == c) & (target == c)).sum())
        fp = int(((predicted == c) & (target != c)).sum())
        fn = int(((predicted != c) & (target == c)).sum())
        scores[f"f1_{name}"] = float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    defined = [v for v in scores.values() if v == v]
    scores["macro_f1"] = sum(defined) / len(defined)
    scores["accuracy"] = float((predicted == target).float().mean())
    return scores


def confusion(predicted: torch.Tensor, target: torch.Tensor) -> list[list[int]]:
    """counts[true][predicted]."""
    return [[int(((target == t) & (predicted == p)).sum()) for p in range(NUM_ACTIONS)] for t in range(NUM_ACTIONS)]


# ---------------------------------------------------------------------------------------------
# Teacher-forced features


@torch.no_grad()
def teacher_forced_features(routed, tokenizer, examples, windows: int, batch_size: int, max_length: int):
    """Pooled hidden states entering every layer along each example's labelled path.

    Returns pooled [n, L, windows, d] (float32, CPU) and nonempty [n, L, windows]. The routed model
    runs its own prefill with a router that replays the labels (one-hot logits) and records what
    it is shown, so padding, masks and paths are exactly as at inference.
    """
    from radial.routing import FunctionRouter, RouterBudget, windowed_mean_pool

    num_layers = routed.num_layers
    device = routed.parts.lm_head.weight.device
    pooled_all, nonempty_all = [], []
    tokenizer.padding_side = "left"
    for start in tqdm(range(0, len(examples), batch_size), desc="teacher-forced states", mininterval=2.0):
        chunk = examples[start : start + batch_size]
        encoded = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True)
        ids, mask = encoded["input_ids"][:, -max_length:].to(device), encoded["attention_mask"][:, -max_length:].to(device)
        labels = torch.tensor([e.labels for e in chunk], device=device)
        pooled = torch.zeros(len(chunk), num_layers, windows, routed.text_config.hidden_size)
        nonempty = torch.zeros(len(chunk), num_layers, windows, dtype=torch.bool)

        def replay(layer, hidden, attention_mask):
            p, ne = windowed_mean_pool(hidden.float(), attention_mask, windows)
            pooled[:, layer], nonempty[:, layer] = p.cpu(), ne.cpu()
            return nn.functional.one_hot(labels[:, layer], NUM_ACTIONS).float()

        routed.set_router(FunctionRouter(num_layers, replay), RouterBudget())
        routed(ids, attention_mask=mask, use_cache=False)
        pooled_all.append(pooled)
        nonempty_all.append(nonempty)
    routed.reset_layer_counter()
    return torch.cat(pooled_all), torch.cat(nonempty_all)


class TeacherForcedRouter(nn.Module):
    """Training view of a DrLLMRouter: all layers' logits from precomputed pooled states."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router

    def forward(self, pooled: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """pooled [b, L, windows, d], nonempty [b, L, windows] -> logits [b, L, 3]."""
        return torch.stack(
            [self.router.pooled_logits(i, pooled[:, i], nonempty[:, i]) for i in range(pooled.shape[1])], dim=1
        )


# ---------------------------------------------------------------------------------------------
# The stage


def main(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from radial import tracking
    from radial.variant_folders import write_variant_folder
    from radial.routing import DrLLMRouter, RoutedForCausalLM, RouterBudget

    cfg = training.start_stage(args)
    checkpoint_dir = training.checkpoint_dir_for(args)
    device = training.default_device() if args.device == "auto" else args.device
    if not (args.model / "config.json").is_file():
        raise RadialError(f"base model folder {args.model} not found or has no config.json")
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    routed = RoutedForCausalLM.from_base(base)
    routed.config.base_model_name_or_path = str(args.model)
    routed.requires_grad_(False)
    num_layers, hidden_size = routed.num_layers, routed.text_config.hidden_size

    examples = load_labels(args.labels, num_layers, args.data_dir)
    train_examples, val_examples = split_validation(examples, args.val_fraction, args.seed)
    label_counts = Counter(value for e in train_examples for value in e.labels)
    rare = rare_classes([label_counts[c] for c in range(NUM_ACTIONS)], args.min_class_share)
    train_examples, val_examples = (relabel_as_execute(subset, rare) for subset in (train_examples, val_examples))
    train_labels = torch.tensor([e.labels for e in train_examples])
    counts = [int((train_labels == c).sum()) for c in range(NUM_ACTIONS)]
    weights = class_weights(counts, args.class_beta)
    print(
        f"routers: {len(train_examples)} train / {len(val_examples)} validation examples, {num_layers} layers; "
        f"label counts {dict(zip(ACTIONS, counts))}"
        + (f" ({', '.join(f'{label_counts[c]} {ACTIONS[c]}' for c in rare)} learned as execute: under "
           f"{args.min_class_share:.1%} of the labels)" if rare else "")
        + f", class weights {[round(w, 4) for w in weights.tolist()]}",
        flush=True,
    )

    features = {}
    for name, subset in (("train", train_examples), ("val", val_examples)):
        if subset:
            features[name] = teacher_forced_features(
                routed, tokenizer, subset, args.windows, args.feature_batch_size, args.max_length
            )
    train_pooled, train_nonempty = features["train"]

    def batch_for_step(micro_step: int) -> dict:
        rows = training.rank_batch_indices(len(train_examples), cfg.batch_size, micro_step, cfg.seed)
        return {"pooled": train_pooled[rows], "nonempty": train_nonempty[rows], "labels": train_labels[rows]}

    def loss_fn(engine, batch):
        logits = engine(batch["pooled"], batch["nonempty"]).float()
        loss = focal_loss(logits.reshape(-1, NUM_ACTIONS), batch["labels"].reshape(-1), weights, args.focal_gamma)
        predicted = logits.argmax(-1)
        return loss, {
            "accuracy": float((predicted == batch["labels"]).float().mean()),
            "executed_layers": float(predicted.sum(-1).float().mean()),
        }

    def evaluate(engine) -> dict[str, float]:
        metrics, _ = validation_metrics(engine, engine.device, features.get("val"), val_examples, weights, args.focal_gamma)
        return metrics

    seed_everything(args.seed)
    router = DrLLMRouter(num_layers, hidden_size, bottleneck=args.bottleneck, num_windows=args.windows)
    model = TeacherForcedRouter(router)
    config = {"train_config": vars(cfg), "label_counts": counts, "class_weights": weights.tolist(), "num_layers": num_layers}
    with tracking.stage_run("routers", args, config=config) as run:
        result = training.train(
            model, None, batch_for_step, loss_fn, cfg, checkpoint_dir, run=run, desc="routers",
            eval_fn=evaluate if val_examples else None,
            fingerprint=run_fingerprint(args),
        )
        template = TeacherForcedRouter(DrLLMRouter(num_layers, hidden_size, args.bottleneck, args.windows))
        trained = training.unwrapped_copy(result.engine, template).router
        if training.rank() != 0:
            return 0
        trained.to(device).eval()
        val_metrics, val_confusion = validation_metrics(
            TeacherForcedRouter(trained), device, features.get("val"), val_examples, weights, args.focal_gamma
        )
        routed.set_router(trained, RouterBudget())
        free_running = free_running_layers(routed, tokenizer, val_examples or train_examples, args)
        summary = {
            "examples": {"train": len(train_examples), "validation": len(val_examples)},
            "label_counts": dict(zip(ACTIONS, counts)),
            "learned_as_execute": {ACTIONS[c]: label_counts[c] for c in rare},
            "class_weights": dict(zip(ACTIONS, weights.tolist())),
            "label_executed_layers": float(train_labels.sum(-1).float().mean()),
            "validation": val_metrics,
            "validation_confusion": val_confusion,
            "free_running": free_running,
            "final_train_loss": result.history[-1]["loss"],
            "resumed_from_step": result.resumed_from,
            "train_config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
            "router": {"bottleneck": args.bottleneck, "windows": args.windows},
            "loss": {"focal_gamma": args.focal_gamma, "class_beta": args.class_beta},
            "history": result.history,
        }
        info = {
            "method": "routers",
            "description": "Dr.LLM routers (per-layer skip/execute/repeat per example) trained on MCTS labels",
            "base_model": str(args.model),
            "num_layers": num_layers,
        }

        def extra(tmp: Path) -> None:
            (tmp / INFO_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            training.plot_history(result.history, tmp / "curves.png", title="Dr.LLM routers")
            plot_confusion(val_confusion, tmp / "confusion.png")

        write_variant_folder(routed, args.model, args.out, info, extra=extra)
        run.summary.update(
            {
                **{f"val/{k}": v for k, v in val_metrics.items()},
                **{f"free_running/{k}": v for k, v in free_running.items()},
            }
        )
        tracking.log_image(run, "routers/curves", args.out / "curves.png")
        tracking.log_image(run, "routers/confusion", args.out / "confusion.png")
        tracking.log_artifact(run, f"{args.run_name}-routers", "model", [args.out])
    training.discard_checkpoints(checkpoint_dir)
    print(
        f"routers: validation macro-F1 {val_metrics.get('macro_f1', float('nan')):.3f}, "
        f"free-running average layers {free_running['executed_layers']:.2f} of {num_layers} "
        f"(labels {summary['label_executed_layers']:.2f}) -> {args.out}"
    )
    return 0


def run_fingerprint(args: argparse.Namespace) -> dict:
    """Stage settings and inputs: checkpoints of a run with other ones are not resumed."""
    flags = ("bottleneck", "windows", "focal_gamma", "class_beta", "min_class_share", "val_fraction", "max_length")
    return {
        **{key: getattr(args, key) for key in flags},
        "labels": training.file_fingerprint(args.labels),
        "model": training.file_fingerprint(args.model),
    }


@torch.no_grad()
def validation_metrics(model, device, features, examples, weights, gamma) -> tuple[dict[str, float], list[list[int]]]:
    """Teacher-forced validation: focal loss, per-class / macro F1, accuracy, predicted average layers.

    `model` maps (pooled, nonempty) to logits [b, L, 3]: the engine while training, the router after.
    """
    if not examples:
        return {}, confusion(torch.zeros(0), torch.zeros(0))
    pooled, nonempty = features
    logits = torch.cat(
        [
            model(pooled[i : i + 256].to(device), nonempty[i : i + 256].to(device)).float().cpu()
            for i in range(0, len(pooled), 256)
        ]
    )
    target = torch.tensor([e.labels for e in examples])
    predicted = logits.argmax(-1)
    metrics = {
        "loss": float(focal_loss(logits.reshape(-1, NUM_ACTIONS), target.reshape(-1), weights, gamma)),
        **f1_scores(predicted.reshape(-1), target.reshape(-1)),
        "executed_layers": float(predicted.sum(-1).float().mean()),
        "label_executed_layers": float(target.sum(-1).float().mean()),
    }
    return metrics, confusion(predicted.reshape(-1), target.reshape(-1))


@torch.no_grad()
def free_running_layers(routed, tokenizer, examples, args) -> dict[str, float]:
    """Average layers executed and exact path agreement when the routers decide (no teacher forcing)."""
    from radial.routing import path_to_counts

    routed.eval()
    routed.reset_layer_counter()
    device = routed.parts.lm_head.weight.device
    agree = 0
    tokenizer.padding_side = "left"
    for start in range(0, len(examples), args.feature_batch_size):
        chunk = examples[start : start + args.feature_batch_size]
        encoded = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True)
        ids = encoded["input_ids"][:, -args.max_length :].to(device)
        mask = encoded["attention_mask"][:, -args.max_length :].to(device)
        out = routed(ids, attention_mask=mask, use_cache=True)
        for example, path in zip(chunk, out.past_key_values.paths):
            agree += path_to_counts(path, routed.num_layers) == example.labels
    return {"executed_layers": routed.radial_executed_layers(), "path_match": agree / len(examples)}


def plot_confusion(counts: list[list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(counts, cmap="Blues")
    for t in range(NUM_ACTIONS):
        for p in range(NUM_ACTIONS):
            ax.text(p, t, str(counts[t][p]), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(NUM_ACTIONS), ACTIONS)
    ax.set_yticks(range(NUM_ACTIONS), ACTIONS)
    ax.set_xlabel("router decision")
    ax.set_ylabel("MCTS label")
    ax.set_title("validation, teacher-forced", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
