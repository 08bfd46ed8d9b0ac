"""Every setting is defined once: in the config schema, `radial/resources/config.schema.yaml`.

The workflow validates `config.yaml` against that schema (workflow/rules/common.smk), and each
stage builds its command-line flags from it: a flag linked to config key `distill.steps` takes
that key's type, default, allowed values and description, and a value given on the command line is
checked against the same schema (`check_arguments`). So `python -m radial distill` without flags
trains exactly as the workflow's defaults do, and a bad value is refused once, in one wording.

The flags every stage shares (--model, --data-dir, --out, --threads, --device, --seed, --run-name,
--wandb-mode) are defined here too (`add_common_arguments`, `add_path_argument`, ...).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any, Iterable

from radial.utils import RadialError

RESOURCES = Path(__file__).resolve().parent / "resources"
SCHEMA_PATH = RESOURCES / "config.schema.yaml"
DEEPSPEED_CONFIG_DIR = RESOURCES / "deepspeed"

_PYTHON_TYPES = {"integer": int, "number": float, "string": str}


@functools.cache
def schema() -> dict:
    import yaml

    return yaml.safe_load(SCHEMA_PATH.read_text())


def key_schema(key: str) -> dict:
    """The schema of one config key, e.g. key_schema("distill.steps"), its `$ref` resolved.

    "$defs.training.bf16" names a shared definition that no config key carries (the harness-only
    training settings).
    """
    node = schema()
    for part in key.split("."):
        if part in node.get("properties", {}):
            node = node["properties"][part]
        elif part.startswith("$") or (part in node and isinstance(node[part], dict) and "properties" in node[part]):
            node = node[part]
        else:
            raise KeyError(f"config key {key} is not in {SCHEMA_PATH.name}")
    return _resolved(node)


def _resolved(node: dict) -> dict:
    """A key's schema with its `$ref` (to "#/$defs/...") merged in; the key's own entries win."""
    if "$ref" not in node:
        return node
    target: dict = schema()
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def default(key: str) -> Any:
    """The one default of a config key."""
    return key_schema(key).get("default")


def section_keys(section: str) -> list[str]:
    """The leaf keys (not sub-sections) of a config section, in schema order: section_keys("distill")."""
    properties = key_schema(section).get("properties", {})
    return [f"{section}.{name}" for name, spec in properties.items() if _resolved(spec).get("type") != "object"]


def flag_name(key: str) -> str:
    """distill.warmup_steps -> --warmup-steps (the last part of the key)."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


# ---------------------------------------------------------------------------------------------
# Flags built from the schema


def add_setting(parser: Any, key: str, *, flag: str | None = None, help: str | None = None, **overrides: Any):
    """Add the flag of config key `key` (type, default, choices and help from the schema).

    The returned argparse action remembers its key (`action.setting`), which `check_arguments`
    and the tests read. `overrides` are argparse keywords for the rare flag that takes its key's
    value differently (e.g. one value of a sweep list).
    """
    spec = key_schema(key)
    kwargs: dict[str, Any] = {"default": spec.get("default"), "help": help or _help(spec)}
    types = spec.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    if "enum" in spec:
        kwargs["choices"] = spec["enum"]
        kwargs["type"] = type(spec["enum"][0])
    elif "boolean" in types:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "array" in types:
        items = spec.get("items", {})
        kwargs["nargs"] = "+"
        if "enum" in items:
            kwargs["choices"] = items["enum"]
        else:
            kwargs["type"] = _PYTHON_TYPES.get(items.get("type"), str)
    else:
        kwargs["type"] = next((_PYTHON_TYPES[t] for t in types if t in _PYTHON_TYPES), str)
    kwargs.update(overrides)
    if kwargs.get("action") is not None:
        kwargs.pop("type", None)
    action = parser.add_argument(flag or flag_name(key), **kwargs)
    action.setting = key
    return action


def add_settings(parser: Any, section: str, *, exclude: Iterable[str] = ()) -> None:
    """The flags of every leaf key of `section`, except the keys named in `exclude` (last parts)."""
    excluded = set(exclude)
    for key in section_keys(section):
        if key.rsplit(".", 1)[-1] not in excluded:
            add_setting(parser, key)


def _help(spec: dict) -> str:
    text = " ".join(str(spec.get("description", "")).split())
    return f"{text} (default: {spec.get('default')})".replace("%", "%%")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate every flag linked to a config key against that key's schema: the one validation."""
    for action in parser._actions:
        key = getattr(action, "setting", None)
        if key is None or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None and action.default is None:
            continue
        spec = key_schema(key)
        types = str(spec.get("type"))
        if isinstance(value, list) and "array" not in types:
            values, rule = value, spec  # several values of a scalar key
        elif not isinstance(value, list) and "array" in types:
            values, rule = [value], spec.get("items", {})  # one value of a sweep list
        else:
            values, rule = [value], spec
        for item in values:
            message = _violation(rule, str(item) if isinstance(item, Path) else item)
            if message is not None:
                shown = " ".join(map(str, value)) if isinstance(value, list) else value
                raise RadialError(f"{action.option_strings[0]} {shown}: {message} (config key {key})")


def invalid(key: str, value: Any) -> str | None:
    """Why `value` is not allowed for config key `key`, or None when it is."""
    return _violation(key_schema(key), value)


def _violation(rule: dict, value: Any) -> str | None:
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(rule).iter_errors(value))
    return None if error is None else error.message


def check_fields(obj: Any, section: str, what: str) -> None:
    """Validate a settings dataclass whose fields are keys of `section` against the schema."""
    from dataclasses import fields

    for spec in fields(obj):
        key = f"{section}.{spec.name}"
        try:
            message = invalid(key, getattr(obj, spec.name))
        except KeyError:
            continue  # a field that is no config key
        if message is not None:
            raise RadialError(f"invalid {what} {spec.name}={getattr(obj, spec.name)!r}: {message}")


def default_of(key: str):
    """A dataclass field whose default is config key `key`'s: `steps: int = default_of("mcts.simulations")`."""
    from dataclasses import field

    return field(default_factory=lambda: default(key))


# ---------------------------------------------------------------------------------------------
# Flags every stage shares

_PATH_FLAGS = {
    "model": "model folder (HF format, with tokenizer)",
    "data_dir": "normalized data folder (the data stage's output: <task>/<split>.jsonl)",
    "out": "output (written atomically: it appears only when complete)",
}


def add_path_argument(parser: Any, name: str, help: str | None = None, *, required: bool = True) -> None:
    """--model, --data-dir or --out: a path, required unless said otherwise."""
    parser.add_argument(
        "--" + name.replace("_", "-"), type=Path, required=required, metavar="PATH", help=help or _PATH_FLAGS[name]
    )


def add_threads_argument(parser: Any) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_device_argument(parser: Any, key: str | None = None) -> None:
    """--device: the default of config key `key` (e.g. evaluate.device), else "auto"."""
    if key is not None:
        add_setting(parser, key)
        return
    parser.add_argument(
        "--device", default="auto", help="torch device: auto = this process's GPU when there is one, else cpu"
    )


def add_common_arguments(parser: Any) -> None:
    """Flags every stage takes: seed, wandb run naming and mode."""
    add_setting(parser, "seed")
    add_setting(parser, "run_name")
    add_setting(parser, "wandb.mode", flag="--wandb-mode", help="wandb mode; $WANDB_MODE overrides (default: offline)")


# ---------------------------------------------------------------------------------------------
# Config validation messages (the workflow's)


def describe_validation_error(error: Any) -> str:
    """Turn a jsonschema ValidationError into 'config key a.b: what is wrong'."""
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - allowed)
        keys = ", ".join(f"'{'.'.join(filter(None, [path, k]))}'" for k in unknown)
        return f"unknown config key {keys} (allowed here: {', '.join(sorted(allowed))})"
    return f"invalid config key '{path or '<top level>'}': {error.message}"


def find_validation_error(exc: BaseException) -> Any | None:
    """The jsonschema ValidationError carried by `exc` (snakemake wraps it in a WorkflowError)."""
    from jsonschema import ValidationError

    if isinstance(exc, ValidationError):
        return exc
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, ValidationError):
            return arg
    cause = exc.__cause__ or exc.__context__
    return find_validation_error(cause) if cause is not None else None
