"""Where this process stands: its rank among the data-parallel processes, its device, its rows."""

from __future__ import annotations

import os
import socket

import torch

from radial.utils import RadialError


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
