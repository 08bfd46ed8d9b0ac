"""The DeepSpeed config of a training run: a ZeRO JSON shipped with radial, its "auto" values filled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from radial.settings import DEEPSPEED_CONFIG_DIR
from radial.training.config import TrainConfig
from radial.training.distributed import use_bf16, world_size
from radial.utils import RadialError


def zero_config_file(zero_stage: int) -> Path:
    """radial/resources/deepspeed/zero{1,2,3}.json (stage 0 uses the stage-1 file with ZeRO off)."""
    return DEEPSPEED_CONFIG_DIR / f"zero{max(zero_stage, 1)}.json"


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
