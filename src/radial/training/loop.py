"""The training loop: AdamW with warm-up and cosine decay under `deepspeed.initialize`, resumable."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from radial.training import checkpoints
from radial.training.config import TrainConfig
from radial.training.deepspeed_setup import deepspeed_config
from radial.training.distributed import ensure_distributed_env, rank, world_size
from radial.utils import RadialError


@dataclass
class TrainResult:
    history: list[dict]
    engine: Any
    resumed_from: int | None = None
    extras: dict = field(default_factory=dict)


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: nn.Module, params: list | None, lr: float) -> list[dict]:
    """[{"params", "lr"}] of what trains; everything else in `model` is frozen."""
    if params is None:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    elif all(isinstance(g, dict) for g in params):
        groups = [{"params": list(g["params"]), "lr": float(g.get("lr", lr))} for g in params]
    else:
        groups = [{"params": list(params), "lr": lr}]
    chosen = {id(p) for g in groups for p in g["params"]}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    if not chosen:
        raise RadialError("nothing to train (no parameter requires grad)")
    return groups


def _optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases, norms, gates' scalars)."""
    split = []
    for group in groups:
        for decayed in (True, False):
            chosen = [p for p in group["params"] if (p.ndim >= 2) == decayed]
            if chosen:
                split.append({"params": chosen, "lr": group["lr"], "weight_decay": cfg.weight_decay if decayed else 0.0})
    return torch.optim.AdamW(split, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def train(
    model: nn.Module,
    params: list[nn.Parameter] | None,
    batch_for_step: Callable[[int], dict],
    loss_fn: Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]],
    cfg: TrainConfig,
    checkpoint_dir: Path,
    run: Any = None,
    desc: str = "train",
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    fingerprint: dict | None = None,
) -> TrainResult:
    """Train `params` of `model` with DeepSpeed; see the module docstring."""
    ensure_distributed_env()
    import deepspeed

    # DeepSpeed's ZeRO calls these torch.distributed functions every step; their rename warning would fill the log.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    groups = _param_groups(model, params, cfg.lr)
    torch.manual_seed(cfg.seed)
    optimizer = _optimizer(groups, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
        dist_init_required=True,
    )
    checkpoints.discard_foreign_checkpoints(checkpoint_dir, cfg, fingerprint, desc)
    start_step, resumed_from = 0, None
    history_path = checkpoint_dir / checkpoints.HISTORY_FILE
    if (checkpoint_dir / "latest").is_file():
        load_path, client_state = engine.load_checkpoint(str(checkpoint_dir))
        if load_path is None:
            raise RadialError(f"{checkpoint_dir}: could not load the latest checkpoint")
        start_step = resumed_from = int(client_state["step"])
        print(f"{desc}: resumed from {load_path} (step {start_step} of {cfg.steps})", flush=True)
    history = [row for row in checkpoints.read_history(history_path) if row["step"] <= start_step]
    checkpoints.write_history(history_path, history)  # drop rows a killed run wrote after its last checkpoint
    if run is not None:
        for row in history:
            run.log(_wandb_row(desc, row), step=row["step"])

    progress = tqdm(total=cfg.steps, initial=start_step, desc=desc, disable=rank() != 0, mininterval=2.0)
    for step in range(start_step + 1, cfg.steps + 1):
        engine.train()
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        started = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(batch_for_step((step - 1) * cfg.grad_accum + micro), engine.device)
            loss, metrics = loss_fn(engine, batch)
            engine.backward(loss)
            engine.step()
            for key, value in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / cfg.grad_accum
        totals = _mean_over_ranks(totals, engine.device)
        row = {"step": step, **totals, "lr": lr, "seconds": time.perf_counter() - started}
        if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            engine.eval()
            with torch.no_grad():
                row.update({f"val_{k}": float(v) for k, v in eval_fn(engine).items()})
        history.append(row)
        checkpoints.append_history(history_path, row)
        if run is not None:
            run.log(_wandb_row(desc, row), step=step)
        progress.update(1)
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            checkpoints.save_checkpoint(engine, checkpoint_dir, step, cfg.keep_checkpoints)
    progress.close()
    return TrainResult(history=history, engine=engine, resumed_from=resumed_from)


def _mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Data-parallel ranks each see their share of the batch: the history holds the global means."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, (values / world_size()).tolist()))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _wandb_row(desc: str, row: dict) -> dict:
    return {f"{desc}/{k}": v for k, v in row.items() if k != "step"}
