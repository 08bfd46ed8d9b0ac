"""Config validation messages: one line naming the offending key."""

from __future__ import annotations

from typing import Any


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
