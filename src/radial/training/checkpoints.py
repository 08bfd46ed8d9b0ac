"""Resumable training: DeepSpeed checkpoints, the run they belong to, the step history beside them."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radial.training.config import TrainConfig
from radial.training.distributed import rank
from radial.utils import RadialError

HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"  # the settings and inputs the checkpoints belong to
_TAG_PREFIX = "step"


def discard_foreign_checkpoints(checkpoint_dir: Path, cfg: TrainConfig, fingerprint: dict | None, desc: str) -> None:
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


def save_checkpoint(engine: Any, checkpoint_dir: Path, step: int, keep: int) -> None:
    engine.save_checkpoint(str(checkpoint_dir), tag=f"{_TAG_PREFIX}{step}", client_state={"step": step})
    if rank() != 0:
        return
    tags = sorted(
        (p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(_TAG_PREFIX) and p.name[4:].isdigit()),
        key=lambda p: int(p.name[len(_TAG_PREFIX):]),
    )
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


def write_history(path: Path, rows: list[dict]) -> None:
    if rank() != 0:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def append_history(path: Path, row: dict) -> None:
    if rank() != 0:
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


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


def run_fingerprint(args: argparse.Namespace, *method_flags: str) -> dict:
    """What a fine-tuning run depends on besides its TrainConfig: the batching and method flags, the
    model and the data files FinetuneBatches reads. Checkpoints are resumed only under the same
    fingerprint (training.train), so an interrupted run is not continued with other settings."""
    from radial.corpus import corpus_files

    synthetic_file, benchmark_files = corpus_files(Path(args.data_dir))
    files = [synthetic_file, *benchmark_files]
    flags = ("seq_len", "synthetic_batch_size", "benchmark_fraction", *method_flags)
    return {
        **{flag: getattr(args, flag) for flag in flags},
        "model": file_fingerprint(args.model),
        "data": {f"{file.parent.name}/{file.name}": file_fingerprint(file) for file in files if file.is_file()},
    }
