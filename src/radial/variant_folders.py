"""Variant folders: what every model-making stage writes, and what evaluation and the report read.

Every variant is a model folder that `AutoModelForCausalLM.from_pretrained` loads (after
`import radial.routing`), with its tokenizer and a `radial_variant.json` (VARIANT_INFO) saying what
it is; the evaluation stage treats it like the dense model. The variant names are radial.variants'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from radial.utils import RadialError, atomic_path

VARIANT_INFO = "radial_variant.json"


def write_variant_folder(routed, tokenizer_source: str | Path, out: Path, info: dict[str, Any], extra=None) -> None:
    """Save a routed model, the tokenizer from `tokenizer_source` and `radial_variant.json`, atomically.

    The routed folder holds the routing config (and router weights); the base weights stay where
    they are, referenced relative to `out` (see RoutedForCausalLM.save_pretrained). `extra(tmp_dir)`
    may add more files before the folder appears under its final name.
    """
    from transformers import AutoTokenizer

    with atomic_path(out) as tmp:
        tmp.mkdir()
        if extra is not None:
            extra(tmp)
        routed.save_pretrained(tmp)
        _point_base_reference_at_final_location(tmp, Path(out))
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
        (tmp / VARIANT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _point_base_reference_at_final_location(tmp: Path, out: Path) -> None:
    """Make config.json's base reference right for `out`, where `tmp` is about to be renamed to.

    save_pretrained computes the relative path from the folder it writes (the temporary one); a base
    inside that folder (a fine-tuned copy) moves along with it.
    """
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_absolute():
        return
    base, tmp, final = Path(base), tmp.resolve(), out.resolve()
    if base == tmp or tmp in base.parents:
        base = final / base.relative_to(tmp)
    config["base_model_name_or_path"] = str(base)
    config["base_model_relative_path"] = os.path.relpath(base, final)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def num_layers_of(model_dir: str | Path) -> int:
    """Decoder layers of a saved HF model, read from its config.json."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise RadialError(f"model folder {path} not found or has no config.json")
    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "text_config", None) or config
    if not getattr(config, "num_hidden_layers", None):
        raise RadialError(f"{path}/config.json has no num_hidden_layers")
    return int(config.num_hidden_layers)
