"""Evaluation variants: the config's method families expanded over their sweeps into variant names.

`evaluate.variants` lists families; each becomes one variant per value of its sweep lists, and a
variant name is also its model folder under results/<model>/models/ and its wildcard:

    dense      dense                                    the base model
    shortgpt   shortgpt-k{k}        baselines.shortgpt.k        ShortGPT, k lowest-BI layers removed
    soft       soft-exit{n}         baselines.soft.exits        SoFT sub-model of the first n layers
               soft-conf{t}         baselines.soft.thresholds   SoFT confidence early exit
    dlo        dlo-c{capacity}      baselines.dlo.capacity      DLO-style token skipping
    routers    routers                                          Dr.LLM routers on the MCTS labels
               routers-b{bias}      evaluate.skip_biases.routers   the same routers, skip logit + bias
    radial     radial                                           the distilled token-routed student
               radial-b{bias}       evaluate.skip_biases.radial    the same student, gate threshold + bias
    radial_reuse radial-reuse       distill.reuse_layers        the student with routing between layers and reuse

Adding a value to a sweep list adds one variant: only its model folder, its evaluations and the
report are (re)made. Numbers print with `:g` (0.9 -> "0.9", 1.0 -> "1").
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from radial.utils import RadialError

BASELINE_VARIANT = re.compile(r"^(shortgpt-k\d+|soft-exit\d+|soft-conf\d+(\.\d+)?|dlo-c0?\.\d+)$")
KNOB_VARIANT = re.compile(r"^(routers|radial)-b(-?\d+(?:\.\d+)?(?:e-?\d+)?)$")


def number(value: float) -> str:
    return f"{value:g}"


def soft_exits(config: dict[str, Any]) -> list[int]:
    """The SoFT sub-models evaluated: baselines.soft.exits, or every L/8 layers when null.

    null is resolved only for the embedded model (whose L the config knows). The soft stage always
    trains the full depth L as well; list L here to evaluate the full-depth SoFT model too.
    """
    exits = config["baselines"]["soft"]["exits"]
    if config["model"].get("name_or_path"):
        if exits is None:
            raise RadialError(
                "config key baselines.soft.exits: list the exit depths for a model.name_or_path model "
                "(null means every L/8 layers, which is known here only for the embedded model)"
            )
        return sorted(set(exits))
    num_layers = config["model"]["embedded"]["layers"]
    if exits is None:
        exits = [math.ceil(num_layers * i / 8) for i in range(1, 9)]
    bad = [n for n in exits if n > num_layers]
    if bad:
        raise RadialError(f"config key baselines.soft.exits: exit {bad[0]} exceeds the model's {num_layers} layers")
    return sorted(set(exits))


FAMILIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "dense": lambda config: ["dense"],
    "shortgpt": lambda config: [f"shortgpt-k{k}" for k in config["baselines"]["shortgpt"]["k"]],
    "soft": lambda config: [f"soft-exit{n}" for n in soft_exits(config)]
    + [f"soft-conf{number(t)}" for t in config["baselines"]["soft"]["thresholds"]],
    "dlo": lambda config: [f"dlo-c{number(c)}" for c in config["baselines"]["dlo"]["capacity"]],
    "routers": lambda config: ["routers"] + knob_variants(config, "routers"),
    "radial": lambda config: ["radial"] + knob_variants(config, "radial"),
    "radial_reuse": lambda config: ["radial-reuse"],
}


def knob_variants(config: dict[str, Any], family: str) -> list[str]:
    """<family>-b<bias> for each of evaluate.skip_biases.<family> (bias 0 is the family's own variant)."""
    biases = config["evaluate"].get("skip_biases", {}).get(family, [])
    return [f"{family}-b{number(bias)}" for bias in biases if bias != 0]


def knob_setting(variant: str) -> tuple[str, float] | None:
    """("routers", 1.0) for "routers-b1": the trained variant evaluated and its skip-bias shift; None otherwise."""
    match = KNOB_VARIANT.match(variant)
    return None if match is None else (match.group(1), float(match.group(2)))


def evaluation_variants(config: dict[str, Any]) -> list[str]:
    """Every variant the evaluate stage runs, in the order of evaluate.variants."""
    variants = []
    for family in config["evaluate"]["variants"]:
        if family not in FAMILIES:
            raise RadialError(f"config key evaluate.variants: unknown family {family!r} (known: {', '.join(FAMILIES)})")
        variants += [v for v in FAMILIES[family](config) if v not in variants]
    return variants


def is_baseline_variant(variant: str) -> bool:
    """True for the baseline stages' variants, whose model folder is results/<model>/models/<variant>."""
    return bool(BASELINE_VARIANT.match(variant))
