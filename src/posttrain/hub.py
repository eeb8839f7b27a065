"""Where a model comes from: a local directory or a hub id, checked before anything slow is imported.

A missing directory must fail at once with "no such directory", never as minutes of hub retries: this module
imports only the standard library (huggingface_hub only for a hub id), so the CLI calls it first.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from .errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `name` or `org/name`


def resolve_model_path(name: str) -> str:
    """The local directory (with ~ expanded), or the name as a hub id. A missing directory fails at once:
    a name that looks like a path (it starts with . / ~, has a backslash or more than one /, or its first
    part is a local directory, as in out/sftt) never goes to the hub, and a hub id is looked up in the cache
    first, then (unless offline) with one request, without the hub client's retries."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"model directory {name} has no config.json")
        return str(path)
    first = Path(name.split("/", 1)[0]).expanduser()
    if (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or not HUB_ID.fullmatch(name)
            or ("/" in name and first.is_dir())):
        raise ConfigError(f"model not found: {name}: no such directory{_similar_directory(path)} (give a model "
                          f"directory or a hub id such as Qwen/Qwen2.5-0.5B, or create one with "
                          f"`posttrain init-model`)")
    _check_hub_id(name)
    return name


def _similar_directory(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        siblings = [p.name for p in parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
    return f"; did you mean {parent / close[0]}?" if close else ""


def _check_hub_id(name: str) -> None:
    """A hub id must be in the local cache, or (online) answer one request; else a one-line ConfigError."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if is_offline_mode():
        raise ConfigError(f"model not found: {name}: no such directory, and not in the hub cache "
                          f"({constants.HF_HUB_CACHE}); offline mode (HF_HUB_OFFLINE=1) does not download")
    try:  # one request: the hub client itself retries a failed look-up 5 times over about 30 s
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise ConfigError(f"model not found: {name}: no such directory, and no model of that name on the hub "
                          f"(a private one needs `hf auth login`)") from None
    except GatedRepoError:
        return  # transformers explains how to get access
    except Exception as exc:  # noqa: BLE001 - no network, DNS, TLS, timeouts
        raise ConfigError(f"model not found: {name}: no such directory, and the hub could not be reached "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); give a local "
                          f"directory, or set HF_HUB_OFFLINE=1 to use only models already in the cache") from None
