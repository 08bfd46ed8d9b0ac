"""Small shared helpers: errors, atomic writes, JSONL, seeding, common CLI flags."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class RadialError(Exception):
    """A user-facing error: bad input, missing file, invalid config. Printed without a traceback."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to `path` (file or directory).

    On failure the temporary is removed and `path` is left as it was, so nothing half-written
    ever looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RadialError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every stage takes: seed, wandb run naming and mode."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--run-name", default="default", help="wandb group: one name per workflow run")
    parser.add_argument(
        "--wandb-mode",
        default=None,
        choices=["online", "offline", "disabled"],
        help="wandb mode; default: $WANDB_MODE, else offline",
    )


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file cannot be whole (cut short, a broken header), or None. Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"{path}: truncated ({size} bytes, not even the 8-byte header length)"
        header_size = int.from_bytes(prefix, "little")
        if 8 + header_size > size:
            return f"{path}: truncated ({size} bytes; its header alone needs {8 + header_size})"
        try:
            header = json.loads(f.read(header_size))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as err:
            return f"{path}: not a safetensors file (its header does not parse: {type(err).__name__})"
    if 8 + header_size + end != size:
        return f"{path}: truncated ({size} bytes of the {8 + header_size + end} its header describes); copy or build it again"
    return None


def model_folder_problem(folder: str | os.PathLike) -> str | None:
    """The first broken weights file of a model folder, or of the base folder a routed folder references."""
    folder = Path(folder)
    folders = [folder]
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            return f"{config_file}:{err.lineno}: not valid JSON ({err.msg})"
        relative = config.get("base_model_relative_path") if isinstance(config, dict) else None
        if relative and (folder / relative).is_dir():
            folders.append(folder / relative)
    for candidate in folders:
        for weights in sorted(candidate.glob("*.safetensors")) + sorted(candidate.glob("base/*.safetensors")):
            problem = safetensors_problem(weights)
            if problem:
                return problem
    return None
