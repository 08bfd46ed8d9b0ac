"""Profile stage: how much does each decoder layer change the residual stream?

Per layer ℓ and per (non-pad) token, with x the hidden state entering the block, a the attention
output, h = x + a the MLP's residual input, m the MLP output and y = h + m the block output:

    residual_ratio  = ‖y − x‖ / ‖y‖           the block's share of its output (Radial Networks)
    attn_ratio      = ‖a‖ / ‖x + a‖           the same for the attention sub-block
    mlp_ratio       = ‖m‖ / ‖h + m‖           the same for the MLP sub-block
    cosine          = cos(x, y)               (DLO)
    block_influence = 1 − cos(x, y)           (ShortGPT BI)

The statistics come from forward hooks on the stock Hugging Face layers (no forked modeling
code), computed in float32 on the tokens the attention mask marks as real.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from radial import settings, tracking
from radial.layers import find_decoder_layers, layer_parts
from radial.utils import RadialError, atomic_path, read_jsonl, seed_everything

METRICS = ("residual_ratio", "attn_ratio", "mlp_ratio", "block_influence", "cosine")
METRIC_LABELS = {
    "residual_ratio": "block ‖f(x)‖ / ‖x+f(x)‖",
    "attn_ratio": "attention ‖a‖ / ‖x+a‖",
    "mlp_ratio": "MLP ‖m‖ / ‖h+m‖",
    "block_influence": "block influence 1 − cos(x, y)",
    "cosine": "cos(x, y)",
}
SUMMARY_STATS = ("median", "q1", "q3", "mean")
_EPS = 1e-12  # keeps a ratio finite when a hidden state is exactly zero


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model folder (or Hub id when online)")
    parser.add_argument("--data", type=Path, required=True, help="calibration jsonl in the shared schema")
    settings.add_path_argument(parser, "out", "output folder (written atomically)")
    for name in ("max_examples", "max_length", "batch_size"):
        settings.add_setting(parser, f"profile.{name}")
    settings.add_device_argument(parser)
    settings.add_common_arguments(parser)


# ---------------------------------------------------------------------------------------------
# Calibration text


def calibration_text(row: dict) -> str:
    """The text one calibration row contributes: question, then choices (MC), then the answer.

    Synthetic rows are `question + answer`, exactly the pre-training line; GSM8K uses the full
    worked solution when the row has one.
    """
    question = str(row["question"])
    choices = row.get("choices") or []
    if choices:
        labels = row.get("labels") or [chr(ord("A") + i) for i in range(len(choices))]
        lines = [question] + [f"{label}. {choice}" for label, choice in zip(labels, choices)]
        answer = row.get("answer")
        if isinstance(answer, int) and 0 <= answer < len(choices):
            lines.append(f"Answer: {labels[answer]}. {choices[answer]}")
        return "\n".join(lines)
    if row.get("task") == "synthetic":
        return question + str(row.get("answer", ""))
    return question + "\n" + str(row.get("solution") or row.get("answer", ""))


def load_calibration_rows(path: Path, max_examples: int, seed: int) -> tuple[list[int], list[str]]:
    """Sample up to `max_examples` rows with `seed`; return their line indices (in file order) and texts."""
    if not path.is_file():
        raise RadialError(f"calibration data not found: {path}")
    rows = read_jsonl(path)
    if not rows:
        raise RadialError(f"{path}: no rows")
    chosen = sorted(random.Random(seed).sample(range(len(rows)), min(max_examples, len(rows))))
    texts = []
    for index in chosen:
        if "question" not in rows[index]:
            raise RadialError(f"{path}: row {index + 1} has no 'question' key")
        texts.append(calibration_text(rows[index]))
    return chosen, texts


# ---------------------------------------------------------------------------------------------
# Statistics from forward hooks


def _ratio(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    return part.norm(dim=-1) / whole.norm(dim=-1).clamp_min(_EPS)


def _first(output):
    """Attention modules return (output, weights); decoder layers return a tensor (transformers 5)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect_statistics(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass; per metric a float32 [num_layers, num_tokens] tensor over the non-pad tokens.

    Tokens are ordered row by row, then by position. Also returns `position` (index of each token
    in its sequence) and `example` (its row in the batch). Sub-block metrics are NaN for a layer
    whose attention or MLP module cannot be found.
    """
    layers = find_decoder_layers(model)
    keep = attention_mask.bool()
    stats = {name: torch.full((len(layers), int(keep.sum())), math.nan, device=keep.device) for name in METRICS}
    captured: dict[str, torch.Tensor] = {}

    def tokens(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().float()[keep]  # [num_tokens, hidden]

    def save_attention(module, args, output):
        captured["attn"] = tokens(_first(output))

    def save_mlp(module, args, output):
        captured["mlp"] = tokens(_first(output))

    def make_layer_hook(index: int):
        def layer_hook(module, args, kwargs, output):
            x = tokens(args[0] if args else kwargs["hidden_states"])
            y = tokens(_first(output))
            cosine = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            stats["residual_ratio"][index] = _ratio(y - x, y)
            stats["cosine"][index] = cosine
            stats["block_influence"][index] = 1.0 - cosine
            attn, mlp = captured.pop("attn", None), captured.pop("mlp", None)
            if attn is not None:
                stats["attn_ratio"][index] = _ratio(attn, x + attn)
            if attn is not None and mlp is not None:
                h = x + attn  # the MLP's residual input in a pre-norm block
                stats["mlp_ratio"][index] = _ratio(mlp, h + mlp)

        return layer_hook

    handles = []
    try:
        for index, layer in enumerate(layers):
            attention, mlp = layer_parts(layer)
            if attention is not None:
                handles.append(attention.register_forward_hook(save_attention))
            if mlp is not None:
                handles.append(mlp.register_forward_hook(save_mlp))
            handles.append(layer.register_forward_hook(make_layer_hook(index), with_kwargs=True))
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    rows, positions = keep.nonzero(as_tuple=True)
    stats["position"] = positions
    stats["example"] = rows
    return {name: values.cpu() for name, values in stats.items()}


def summarize(stats: dict[str, torch.Tensor | np.ndarray]) -> dict[str, dict[str, list[float | None]]]:
    """Per metric, per statistic (median, q1, q3, mean): one value per layer; None where all NaN."""
    summary = {}
    for name in METRICS:
        values = np.asarray(stats[name], dtype=np.float64)
        per_stat: dict[str, list[float | None]] = {stat: [] for stat in SUMMARY_STATS}
        for layer_values in values:
            layer_values = layer_values[~np.isnan(layer_values)]
            if layer_values.size == 0:
                for stat in SUMMARY_STATS:
                    per_stat[stat].append(None)
                continue
            q1, median, q3 = np.percentile(layer_values, [25, 50, 75])
            per_stat["median"].append(float(median))
            per_stat["q1"].append(float(q1))
            per_stat["q3"].append(float(q3))
            per_stat["mean"].append(float(layer_values.mean()))
        summary[name] = per_stat
    return summary


def per_layer_rows(summary: dict[str, dict[str, list[float | None]]]) -> list[dict]:
    """One row per layer: layer, then <metric>_<stat> for every metric and statistic."""
    num_layers = len(summary[METRICS[0]]["median"])
    return [
        {"layer": layer} | {f"{m}_{s}": summary[m][s][layer] for m in METRICS for s in SUMMARY_STATS}
        for layer in range(num_layers)
    ]


# ---------------------------------------------------------------------------------------------
# Model loading and the profiling loop


def load_model_and_tokenizer(model_path: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        where = "a local folder that exists" if Path(model_path).exists() else "no such local folder"
        raise RadialError(f"cannot load model {model_path!r} ({where}): {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return model.to(device).eval(), tokenizer


def profile_texts(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> dict[str, np.ndarray]:
    """Statistics over all texts: metric arrays [L, N], `position` [N] and `example` (index into texts) [N]."""
    device = next(model.parameters()).device
    parts: list[dict[str, torch.Tensor]] = []
    for start in tqdm(range(0, len(texts), batch_size), desc="profile", unit="batch"):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        stats = collect_statistics(model, batch["input_ids"], batch["attention_mask"])
        stats["example"] = stats["example"] + start
        parts.append(stats)
    return {
        key: torch.cat([p[key] for p in parts], dim=-1).numpy()
        for key in (*METRICS, "position", "example")
    }


# ---------------------------------------------------------------------------------------------
# Outputs


def write_per_layer_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_heatmap(path: Path, residual_ratio: np.ndarray, positions: np.ndarray, max_length: int, title: str) -> None:
    """Mean block residual ratio per (layer, token position); positions no example reaches stay blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers = residual_ratio.shape[0]
    width = min(max_length, int(positions.max()) + 1)
    counts = np.bincount(positions, minlength=width)[:width]
    sums = np.stack([np.bincount(positions, weights=row, minlength=width)[:width] for row in residual_ratio])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)

    # A few cells (the first token in early layers, the attention sink) can dwarf the rest; clip the
    # colour scale at the 99th percentile so the bulk stays readable, and say so with an arrow.
    low, high = np.nanpercentile(mean, [0, 99])
    fig, ax = plt.subplots(figsize=(min(14, 5 + width / 12), min(10, 2 + 0.35 * num_layers) + 1))
    image = ax.imshow(
        mean,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap="viridis",
        vmin=low,
        vmax=high,
        extent=(-0.5, width - 0.5, -0.5, num_layers - 0.5),
    )
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title)
    extend = "max" if np.nanmax(mean) > high else "neither"
    fig.colorbar(image, ax=ax, extend=extend, label="mean residual ratio ‖f(x)‖ / ‖x+f(x)‖")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layers(path: Path, summary: dict[str, dict[str, list[float | None]]], title: str) -> None:
    """Per-layer median with the interquartile band: ratios on the left, cosine-based metrics on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = [["residual_ratio", "block_influence"], ["attn_ratio", "cosine"], ["mlp_ratio", None]]
    num_layers = len(summary["residual_ratio"]["median"])
    layer_index = np.arange(num_layers)
    fig, axes = plt.subplots(3, 2, figsize=(11, 8.5), sharex=True)

    def series(metric: str, stat: str) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in summary[metric][stat]], dtype=float)

    for row, names in enumerate(layout):
        for col, name in enumerate(names):
            ax = axes[row, col]
            if name is None:  # the free panel compares the three ratios' medians
                for metric, color in (("residual_ratio", "C0"), ("attn_ratio", "C1"), ("mlp_ratio", "C2")):
                    ax.plot(layer_index, series(metric, "median"), marker="o", ms=3, color=color, label=metric)
                ax.set_title("median ratios compared", fontsize=10)
                ax.legend(fontsize=8)
            else:
                median = series(name, "median")
                ax.fill_between(layer_index, series(name, "q1"), series(name, "q3"), alpha=0.25, label="IQR (q1–q3)")
                ax.plot(layer_index, median, marker="o", ms=3, label="median")
                ax.plot(layer_index, series(name, "mean"), ls="--", lw=1, color="gray", label="mean")
                ax.set_title(METRIC_LABELS[name], fontsize=10)
                if np.isnan(median).all():
                    ax.text(0.5, 0.5, "not available for these layers", ha="center", va="center", transform=ax.transAxes)
                if row == 0 and col == 0:
                    ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            if row == len(layout) - 1:
                ax.set_xlabel("layer")
    axes[0, 0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(args: argparse.Namespace) -> int:
    for flag in ("max_examples", "max_length", "batch_size"):
        if getattr(args, flag) < 1:
            raise RadialError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    seed_everything(args.seed)
    example_rows, texts = load_calibration_rows(args.data, args.max_examples, args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, _resolve_device(args.device))
    num_layers = len(find_decoder_layers(model))

    with tracking.stage_run("profile", args, config={"num_layers": num_layers}) as run:
        stats = profile_texts(model, tokenizer, texts, args.max_length, args.batch_size)
        stats["example"] = np.asarray(example_rows)[stats["example"]]  # row index in the data file
        summary = summarize(stats)
        rows = per_layer_rows(summary)
        info = {
            "model": str(args.model),
            "data": str(args.data),
            "num_layers": num_layers,
            "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
            "n_examples": len(texts),
            "n_tokens": int(stats["position"].size),
            "max_length": args.max_length,
            "seed": args.seed,
            "metrics": summary,
        }
        title = f"{Path(str(args.model)).name}: {len(texts)} examples, {info['n_tokens']} tokens"

        with atomic_path(args.out) as out:
            out.mkdir()
            (out / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
            write_per_layer_csv(out / "per_layer.csv", rows)
            np.savez_compressed(
                out / "per_token.npz",
                **{name: stats[name].astype(np.float32) for name in METRICS},
                position=stats["position"].astype(np.int32),
                example=stats["example"].astype(np.int32),
            )
            plot_heatmap(out / "heatmap.png", stats["residual_ratio"], stats["position"], args.max_length, title)
            plot_layers(out / "layers.png", summary, title)

        import wandb

        run.summary.update({k: v for k, v in info.items() if k != "metrics"})
        run.define_metric("layer")
        run.define_metric("per_layer/*", step_metric="layer")
        for row in rows:
            values = {f"per_layer/{k}": v for k, v in row.items() if k != "layer" and v is not None}
            run.log({"layer": row["layer"]} | values)
        run.log({"per_layer_table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        tracking.log_image(run, "heatmap", args.out / "heatmap.png")
        tracking.log_image(run, "layers", args.out / "layers.png")
        tracking.log_artifact(run, f"{args.run_name}-profile", "profile", [args.out])

    print(f"profiled {len(texts)} examples ({info['n_tokens']} tokens, {num_layers} layers) -> {args.out}")
    return 0
