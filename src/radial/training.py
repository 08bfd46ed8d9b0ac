"""The shared training harness: one DeepSpeed ZeRO loop for every training stage.

API (stages add to it, never break it):

    @dataclass
    class TrainConfig:                      # every field comes from config.yaml / the CLI
        steps: int                          # optimizer steps
        batch_size: int                     # examples per micro-batch (per GPU)
        grad_accum: int                     # micro-batches per optimizer step
        lr: float                           # peak AdamW learning rate (cosine decay to 0 after warm-up)
        warmup_steps: int                   # linear warm-up steps
        weight_decay: float                 # AdamW weight decay (matrices only; biases and norms get none)
        zero_stage: int                     # DeepSpeed ZeRO stage 0..3 (overrides the JSON's stage)
        checkpoint_every: int               # engine.save_checkpoint every N steps (0: only at the end)
        seed: int
        bf16: str = "auto"                  # auto = bf16 where the hardware has it (CUDA with bf16), "true", "false"
        deepspeed_config: Path | None = None  # workflow/resources/deepspeed/zero{1,2,3}.json; None = built in
        grad_clip: float = 1.0              # gradient-norm clipping (0 turns it off)
        eval_every: int = 0                 # call eval_fn every N steps (0: only at the end)
        keep_checkpoints: int = 2           # newest checkpoints kept on disk

    train(model, params, batch_for_step, loss_fn, cfg, checkpoint_dir, run=None, desc="train",
          eval_fn=None, fingerprint=None) -> TrainResult(history: list[dict], engine, resumed_from: int | None)
        model           the nn.Module to train; DeepSpeed wraps it (and under ZeRO-3 partitions it).
        params          the parameters to train; every other parameter of `model` is frozen
                        (requires_grad=False). None: whatever already requires grad. Also a list of
                        groups {"params": [...], "lr": peak_lr} when parts train at different rates.
        batch_for_step  micro_step -> batch dict; micro_step = step * grad_accum + k (k < grad_accum).
                        It must be a pure function of its argument: that is what makes resume exact.
                        Tensors in it are moved to the engine's device.
        loss_fn         (engine, batch) -> (loss, metrics); `engine` is called like the model, the
                        model itself is `engine.module`. Loss and metrics are averaged over the
                        micro-batches of a step and over the data-parallel ranks, and land in the history.
        eval_fn         (engine) -> metrics, run without gradients every cfg.eval_every steps and at
                        the end; merged into that step's history row.
        checkpoint_dir  engine.save_checkpoint every cfg.checkpoint_every steps and at the end; a
                        restart resumes from the newest one (engine.load_checkpoint) and goes on from
                        the step after it. history.jsonl there holds one row per step.
        fingerprint     what else identifies the run (stage settings, input hashes: file_fingerprint);
                        checkpoints written under other settings or inputs are discarded, not resumed.
        run             a wandb run (radial.tracking.stage_run): every history row is logged to it.
    gathered_state_dict(engine) -> dict[str, Tensor]   full weights on CPU, also under ZeRO-3
    unwrapped_copy(engine, template) -> nn.Module      a CPU float32 copy of `template` with those weights
    discard_checkpoints(checkpoint_dir)                 once the stage's output is written
    file_fingerprint(path) -> dict                      content hashes of an input file or folder
    rank_batch_indices(n, batch_size, micro_step, seed) -> rows: seeded epoch shuffles, this rank's share
    plot_history(history, path, keys=None, title=None)  training curves PNG
    default_device() / rank() / world_size()            this process's device and place among the ranks
    add_train_arguments(parser, **defaults) / train_config_from_args(args)   the shared CLI flags

Without a launcher (`python -m radial <stage>`) the harness sets RANK/WORLD_SIZE/MASTER_* itself
and runs as a single process (on CPU over gloo); under the `deepspeed` launcher or torchrun the
processes are already set up and each trains its data-parallel share (`batch_for_step` is then
called with the micro-step and should give every rank its own rows: see `rank_batch_indices`).

Every step reseeds torch from (seed, step), so random ops inside a step are the same whether or
not the run was interrupted; a resumed run retraces the uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from radial.utils import RadialError

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "workflow" / "resources" / "deepspeed"
HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"  # the settings and inputs the checkpoints belong to
_TAG_PREFIX = "step"


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
    bf16: str = "auto"
    deepspeed_config: Path | None = None
    grad_clip: float = 1.0
    eval_every: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "zero_stage": self.zero_stage in (0, 1, 2, 3),
            "checkpoint_every": self.checkpoint_every >= 0,
            "bf16": str(self.bf16).lower() in ("auto", "true", "false"),
            "grad_clip": self.grad_clip >= 0,
            "eval_every": self.eval_every >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise RadialError(f"invalid training setting {bad[0]}={getattr(self, bad[0])!r}")
        self.bf16 = str(self.bf16).lower()
        if self.deepspeed_config is not None:
            self.deepspeed_config = Path(self.deepspeed_config)


@dataclass
class TrainResult:
    history: list[dict]
    engine: Any
    resumed_from: int | None = None
    extras: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# CLI


def add_train_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The flags every training stage shares (config keys map one-to-one: train.grad_accum -> --grad-accum)."""
    values = {
        "steps": 200,
        "batch_size": 16,
        "grad_accum": 1,
        "lr": 1e-3,
        "warmup_steps": 10,
        "weight_decay": 0.0,
        "zero_stage": 2,
        "checkpoint_every": 50,
        "bf16": "auto",
        "grad_clip": 1.0,
        "eval_every": 0,
        "keep_checkpoints": 2,
    }
    values.update(defaults)
    group = parser.add_argument_group("training (DeepSpeed)")
    group.add_argument("--steps", type=int, default=values["steps"], help="optimizer steps")
    group.add_argument("--batch-size", type=int, default=values["batch_size"], help="examples per micro-batch per GPU")
    group.add_argument("--grad-accum", type=int, default=values["grad_accum"], help="micro-batches per optimizer step")
    group.add_argument("--lr", type=float, default=values["lr"], help="peak AdamW learning rate (cosine after warm-up)")
    group.add_argument("--warmup-steps", type=int, default=values["warmup_steps"], help="linear warm-up steps")
    group.add_argument("--weight-decay", type=float, default=values["weight_decay"], help="AdamW weight decay")
    group.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=values["zero_stage"], help="ZeRO stage")
    group.add_argument(
        "--deepspeed-config",
        type=Path,
        default=None,
        help="DeepSpeed JSON (workflow/resources/deepspeed/zero{1,2,3}.json); default: the one of --zero-stage",
    )
    group.add_argument("--bf16", choices=["auto", "true", "false"], default=values["bf16"], help="bf16 training")
    group.add_argument("--grad-clip", type=float, default=values["grad_clip"], help="gradient-norm clip (0: off)")
    group.add_argument(
        "--checkpoint-every", type=int, default=values["checkpoint_every"], help="checkpoint every N steps (0: at the end)"
    )
    group.add_argument("--keep-checkpoints", type=int, default=values["keep_checkpoints"], help="checkpoints kept")
    group.add_argument("--eval-every", type=int, default=values["eval_every"], help="validate every N steps (0: at the end)")
    group.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="training checkpoints (resumed from when present); default: <out>.checkpoints",
    )


def start_stage(args: argparse.Namespace) -> TrainConfig:
    """What every training stage does first: torch threads, wandb on rank 0 only, seed; its TrainConfig."""
    from radial.utils import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    if rank() != 0:  # one wandb run per stage, from rank 0
        os.environ["WANDB_MODE"] = "disabled"
    seed_everything(args.seed)
    return train_config_from_args(args)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    deepspeed_config = args.deepspeed_config
    if deepspeed_config is None:
        candidate = DEEPSPEED_CONFIG_DIR / f"zero{max(args.zero_stage, 1)}.json"
        deepspeed_config = candidate if candidate.is_file() else None
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        zero_stage=args.zero_stage,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        bf16=args.bf16,
        deepspeed_config=deepspeed_config,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        keep_checkpoints=args.keep_checkpoints,
    )


def checkpoint_dir_for(args: argparse.Namespace) -> Path:
    """--checkpoint-dir, else a sibling of --out (outside the declared output, so it survives a kill)."""
    if args.checkpoint_dir is not None:
        return Path(args.checkpoint_dir)
    out = Path(args.out)
    return out.parent / f"{out.name}.checkpoints"


# ---------------------------------------------------------------------------------------------
# DeepSpeed setup


def ensure_distributed_env() -> None:
    """Single-process defaults for torch.distributed when no launcher set the environment."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def default_device() -> str:
    """This process's GPU (LOCAL_RANK under a launcher) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def use_bf16(setting: str) -> bool:
    if setting == "true":
        return True
    if setting == "false":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config: the JSON file (if any) with its "auto" values filled from `cfg`."""
    if cfg.deepspeed_config is not None:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise RadialError(f"DeepSpeed config not found: {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RadialError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    else:
        config = {}
    bf16 = use_bf16(cfg.bf16)
    filled = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size(),
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 10**9,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    config.setdefault("bf16", {})
    if config["bf16"].get("enabled", "auto") == "auto":
        config["bf16"]["enabled"] = bf16
    config.setdefault("zero_optimization", {})["stage"] = cfg.zero_stage
    config["zero_allow_untested_optimizer"] = True
    if cfg.zero_stage == 3:
        config["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    leftover = _auto_keys(config)
    if leftover:
        raise RadialError(f"{cfg.deepspeed_config}: no value for 'auto' key {leftover[0]}")
    return config


def _auto_keys(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [k for key, v in config.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if config == "auto" else []


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


# ---------------------------------------------------------------------------------------------
# The loop


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
    _discard_foreign_checkpoints(checkpoint_dir, cfg, fingerprint, desc)
    start_step, resumed_from = 0, None
    history_path = checkpoint_dir / HISTORY_FILE
    if (checkpoint_dir / "latest").is_file():
        load_path, client_state = engine.load_checkpoint(str(checkpoint_dir))
        if load_path is None:
            raise RadialError(f"{checkpoint_dir}: could not load the latest checkpoint")
        start_step = resumed_from = int(client_state["step"])
        print(f"{desc}: resumed from {load_path} (step {start_step} of {cfg.steps})", flush=True)
    history = [row for row in _read_history(history_path) if row["step"] <= start_step]
    _write_history(history_path, history)  # drop rows a killed run wrote after its last checkpoint
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
        _append_history(history_path, row)
        if run is not None:
            run.log(_wandb_row(desc, row), step=step)
        progress.update(1)
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            _save_checkpoint(engine, checkpoint_dir, step, cfg.keep_checkpoints)
    progress.close()
    return TrainResult(history=history, engine=engine, resumed_from=resumed_from)


def _discard_foreign_checkpoints(checkpoint_dir: Path, cfg: TrainConfig, fingerprint: dict | None, desc: str) -> None:
    """Checkpoints of a run with other settings or inputs are removed: resuming them would mix two runs."""
    ignored = ("checkpoint_every", "keep_checkpoints", "eval_every")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items() if k not in ignored}
    current = json.loads(json.dumps({"train_config": settings, "run": fingerprint or {}}, default=str))
    marker = checkpoint_dir / RUN_FILE
    if rank() == 0:
        previous = json.loads(marker.read_text()) if marker.is_file() else None
        if previous != current:
            if previous is not None or (checkpoint_dir / "latest").exists():
                print(f"{desc}: {checkpoint_dir} holds checkpoints of other settings or inputs; starting afresh", flush=True)
            for entry in checkpoint_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            marker.write_text(json.dumps(current, indent=2) + "\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def file_fingerprint(path: str | os.PathLike) -> dict:
    """What identifies an input: a content hash for files up to 64 MiB, else size and mtime (per file of a folder)."""
    import hashlib

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    described = {}
    for file in files:
        stat = file.stat()
        key = str(file.relative_to(path)) if path.is_dir() else file.name
        if stat.st_size <= 64 * 2**20:
            described[key] = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        else:
            described[key] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return described


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


def _save_checkpoint(engine: Any, checkpoint_dir: Path, step: int, keep: int) -> None:
    engine.save_checkpoint(str(checkpoint_dir), tag=f"{_TAG_PREFIX}{step}", client_state={"step": step})
    if rank() != 0:
        return
    tags = sorted(
        (p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(_TAG_PREFIX) and p.name[4:].isdigit()),
        key=lambda p: int(p.name[len(_TAG_PREFIX):]),
    )
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


def _write_history(path: Path, rows: list[dict]) -> None:
    if rank() != 0:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def _append_history(path: Path, row: dict) -> None:
    if rank() != 0:
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# After training


def discard_checkpoints(checkpoint_dir: Path) -> None:
    """Once the stage's output is complete its checkpoints only take disk space (rank 0 removes them)."""
    if rank() == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def gathered_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The model's full state dict on CPU (float32 copies), also when ZeRO-3 has partitioned it."""
    module = engine.module
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}


def unwrapped_copy(engine: Any, template: nn.Module) -> nn.Module:
    """A float32 CPU copy of `template` holding the engine's trained weights (for save_pretrained).

    `template` is a freshly built model of the same shape, not `engine.module`, whose parameters
    ZeRO-3 has partitioned away. Under ZeRO-3 every rank must call this (the gathering is collective).
    """
    if template is engine.module and getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        raise RadialError("unwrapped_copy needs a freshly built template; ZeRO-3 has partitioned engine.module")
    state = gathered_state_dict(engine)
    model = copy.deepcopy(template).to("cpu", torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RadialError(f"trained weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def rank_batch_indices(num_examples: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Rows of one micro-batch: epoch-wise shuffles of range(num_examples), this rank's share.

    A pure function of its arguments, so resumed runs see the same batches; every rank takes its
    own `batch_size` rows of the global micro-batch.
    """
    if num_examples < 1:
        raise RadialError("no training examples")
    global_batch = batch_size * world_size()
    start = micro_step * global_batch + rank() * batch_size
    rows = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_examples)
        generator = torch.Generator().manual_seed(seed * 7919 + epoch)
        rows.append(int(torch.randperm(num_examples, generator=generator)[offset]))
    return rows


def plot_history(history: list[dict], path: Path, keys: list[str] | None = None, title: str | None = None) -> None:
    """Training curves: one panel per metric (default: every numeric key but step/lr/seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if keys is None:
        keys = [k for k in history[0] if k not in ("step", "lr", "seconds") and not k.startswith("val_")] if history else []
        keys += sorted({k for row in history for k in row if k.startswith("val_") and isinstance(row[k], (int, float))})
    keys = keys or ["loss"]
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(row["step"], row[key]) for row in history if isinstance(row.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
