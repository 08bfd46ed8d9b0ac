"""wandb logging shared by every stage.

One wandb run per stage execution: project `radial`, group = the workflow's run name,
job_type = the stage. Offline by default so no key or network is needed; `wandb sync` uploads
later. Precedence for the mode: $WANDB_MODE, then the stage's `--wandb-mode`, then offline.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

PROJECT = "radial"


def resolve_mode(mode: str | None) -> str:
    return os.environ.get("WANDB_MODE") or mode or "offline"


@contextlib.contextmanager
def stage_run(stage: str, args: Any, config: dict | None = None) -> Iterator[Any]:
    """Open a wandb run for `stage` configured from the parsed CLI `args` (+ extra `config`)."""
    import wandb

    run_config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    run_config.update(config or {})
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", PROJECT),
        group=args.run_name,
        job_type=stage,
        name=f"{args.run_name}-{stage}-{os.getpid()}",
        config=_jsonable(run_config),
        mode=resolve_mode(args.wandb_mode),
        dir=os.environ.get("WANDB_DIR"),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


def log_artifact(run: Any, name: str, artifact_type: str, paths: list[str | os.PathLike]) -> None:
    """Log stage outputs as an artifact *by reference* (file:// URIs; nothing is copied)."""
    import wandb

    if run.disabled if hasattr(run, "disabled") else False:
        return
    artifact = wandb.Artifact(name=_artifact_name(name), type=artifact_type)
    for path in paths:
        path = Path(path).resolve()
        artifact.add_reference(path.as_uri(), name=path.name)
    run.log_artifact(artifact)


def log_image(run: Any, key: str, path: str | os.PathLike) -> None:
    import wandb

    run.log({key: wandb.Image(str(path))})


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
