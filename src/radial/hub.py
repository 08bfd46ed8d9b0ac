"""Can the Hugging Face Hub serve a model or dataset right now? Asked before loading from it.

Offline, or behind an endpoint that is not the Hub (a proxy, a wrong HF_ENDPOINT), the libraries
retry or wait on their own timeouts before failing with a traceback. These checks answer in
seconds, so a stage can stop with a message that names the config key to set instead:

    unreachable_reason(timeout)               offline mode is set, or no TCP connection in time
    unavailable_reason(kind, repo_id, timeout)  the above, or the endpoint did not serve the repo's metadata
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

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
