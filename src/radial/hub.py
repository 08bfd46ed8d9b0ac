"""Can the Hugging Face Hub serve a model or dataset right now? Asked before loading from it.

Offline, or behind an endpoint that is not the Hub (a proxy, a wrong HF_ENDPOINT), the libraries
retry or wait on their own timeouts before failing with a traceback. These checks answer in
seconds, so a stage can stop with a message that names the config key to set instead:

    unreachable_reason(timeout)               offline mode is set, or no TCP connection in time
    unavailable_reason(kind, repo_id, timeout)  the above, or the endpoint did not serve the repo's metadata
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from radial.utils import RadialError

DEFAULT_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def offline_reason(variables: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> str | None:
    """Which offline switch is on in the environment, or None."""
    for variable in variables:
        if os.environ.get(variable, "").strip().lower() not in {"", "0", "false", "no", "off"}:
            return f"{variable}={os.environ[variable]} is set"
    return None


def unreachable_reason(timeout: float, variables: tuple[str, ...] = ("HF_HUB_OFFLINE",)) -> str | None:
    """Why the Hub cannot be used (an offline switch, no TCP connection within `timeout` s), or None."""
    reason = offline_reason(variables)
    if reason:
        return reason
    parsed = urlparse(endpoint())
    host, port = parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)
    failure: list[str] = ["no answer"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            failure.clear()
        except OSError as err:
            failure[:] = [str(err) or type(err).__name__]

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.is_alive() or failure:
        return f"no TCP connection to {host}:{port} within {timeout:g} s: {failure[0] if failure else 'no answer'}"
    return None


def unavailable_reason(
    kind: str, repo_id: str, timeout: float, variables: tuple[str, ...] = ("HF_HUB_OFFLINE",)
) -> str | None:
    """Why the Hub cannot serve the model or dataset `repo_id` now (kind "model" or "dataset"), or None."""
    from huggingface_hub import HfApi

    reason = unreachable_reason(timeout, variables)
    if reason:
        return reason
    api = HfApi(endpoint=endpoint())
    info = api.model_info if kind == "model" else api.dataset_info
    try:
        info(repo_id, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - any failure means the Hub cannot serve it
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{endpoint()} did not serve {repo_id} ({why})"
    return None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


SHARED_RESULTS = ("data", "sweep")  # results/data and results/sweep serve every model


def model_slug(name_or_path: str | None) -> str:
    """The folder under results/ (and logs/, benchmarks/) that holds one model's results.

    "embedded" for the embedded model; else the configured Hub id or folder as written, its path
    parts joined by "--" (meta-llama/Llama-3.2-3B -> meta-llama--Llama-3.2-3B, ../models/llama ->
    models--llama). Taken as written, not resolved, so that a moved project keeps its folder names.
    """
    if not name_or_path:
        return "embedded"
    parts = (re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-") for part in re.split(r"[/\\]+", name_or_path))
    slug = "--".join(part for part in parts if part not in ("", ".", "..", "~")) or "model"
    return f"model-{slug}" if slug in (*SHARED_RESULTS, "embedded") else slug


def check_results_model(results: Path, name_or_path: str | None, base: Path) -> None:
    """Stop before a configured model would overwrite another model's results in `results`.

    Each model writes under results/<model_slug>/, so this only stops two sources whose slugs
    coincide (../ckpt and ckpt). Its models/dense/radial_base.json names the source it was made
    from: "embedded", a Hub id or a folder (as given, relative to the working directory then).
    The embedded recipe's settings are not compared: changing them re-trains the same embedded model.
    """
    summary_file = results / "models" / "dense" / "radial_base.json"
    if not summary_file.is_file():
        return
    try:
        recorded = json.loads(summary_file.read_text()).get("source")
    except (json.JSONDecodeError, AttributeError):
        return  # a damaged summary: the base-model stage re-makes it like any broken output
    configured = name_or_path or "embedded"
    if recorded is None or _same_source(recorded, configured, base):
        return
    raise RadialError(
        f"model.name_or_path: {results}/ holds the results of model {recorded!r} ({summary_file}); this config "
        f"names {configured!r}, whose results would go to the same folder and overwrite them. Keep them by "
        f"moving {results}/ aside, e.g. `mv {results} {results}-previous`, or give the model's folder another name"
    )


def _same_source(recorded: str, configured: str, base: Path) -> bool:
    if recorded == configured:
        return True
    if "embedded" in (recorded, configured):
        return False
    recorded_folder = _as_folder(recorded, Path.cwd()).resolve()  # the stage got it relative to the working dir
    return recorded_folder == _as_folder(configured, base).resolve() and recorded_folder.exists()


def _as_folder(name_or_path: str, base: Path) -> Path:
    """Where `name_or_path` would be as a local folder: ~ expanded, relative ones under `base`."""
    folder = Path(os.path.expanduser(name_or_path))
    return folder if folder.is_absolute() else base / folder


def check_model_source(key: str, name_or_path: str | None, base: Path, embedded_layers: int | None = None) -> int | None:
    """Check a configured model before anything runs; return its decoder layers where known, else None.

    None (the embedded model) has `embedded_layers`. A value that names a folder — it exists there, or
    it is written as a path (absolute, ./, ../, ~, or more than one /) — must be a folder holding a
    config.json; anything else is taken as a Hub id (checked by the base-model stage, which can wait
    on the network).
    """
    if not name_or_path:
        return embedded_layers
    folder = _as_folder(name_or_path, base)
    looks_like_path = not HUB_ID.match(name_or_path) or name_or_path.startswith(".")
    if not folder.exists():
        if looks_like_path:
            raise RadialError(f"{key}: {name_or_path!r} is not a folder ({folder} does not exist) nor a Hub id")
        return None
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise RadialError(f"{key}: {folder} holds no model (no config.json there)")
    try:
        model_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise RadialError(f"{config_file}:{error.lineno}: not valid JSON ({error.msg})") from None
    text_config = model_config.get("text_config") or model_config
    return next((int(text_config[name]) for name in LAYER_COUNT_KEYS if isinstance(text_config.get(name), int)), None)
