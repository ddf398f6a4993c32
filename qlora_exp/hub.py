"""Whether the Hugging Face hub can be reached, asked once before any work: without it, transformers and datasets
retry each request for about half a minute and then fail in a traceback. A connect to the hub's endpoint (3 s at
most) says it at once; `HF_HUB_OFFLINE=1` (the libraries' own switch: the local cache only) skips the question.
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig


@functools.cache
def unreachable() -> str | None:
    """Why the hub cannot be reached from this machine, or None (it can, or HF_HUB_OFFLINE asks for the cache)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{host}: {e.strerror or type(e).__name__}"
    return None


def hub_sources(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, hub id) of what this trial would fetch from the hub: a hub dataset, a model that is not a local folder."""
    out = []
    if cfg.data.get("source") == "hub":
        out.append(("data.hub_name", str(cfg.data.hub_name)))
    m = cfg.model
    if not m.get("random_init") and m.get("name_or_path") and not Path(str(m.name_or_path)).expanduser().exists():
        out.append(("model.name_or_path", str(m.name_or_path)))
    return out


def check_reachable(cfg: DictConfig) -> None:
    """ConfigError naming the first hub source when the hub cannot be reached."""
    from qlora_exp.errors import ConfigError

    sources = hub_sources(cfg)
    why = unreachable() if sources else None
    if why:
        key, name = sources[0]
        raise ConfigError(key, name, f"a local path, or HF_HUB_OFFLINE=1 if it is in the Hugging Face cache: this "
                          f"machine cannot reach the hub ({why}), which {name} is fetched from")
