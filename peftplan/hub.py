"""config.json of Hugging Face hub repos that are not in the bundled catalog.

`fetch_config(hub_id)` downloads (or finds in the local HF cache) the repo's `config.json` and nothing else:
no weights, no tokenizer, no remote code (peftplan never runs a repo's code; it reads the JSON).
`huggingface_hub` is imported only when a hub id is actually fetched.

Online: `hf_hub_download(repo_id, "config.json")`, which also fills the local cache. Offline (HF_HUB_OFFLINE=1,
or TRANSFORMERS_OFFLINE=1), or when the online call fails: the same call with `local_files_only=True`, which
reads the cache at HF_HUB_CACHE (default: $HF_HOME/hub, ~/.cache/huggingface/hub).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from urllib.parse import urlparse
from pathlib import Path
from typing import Any

__all__ = ["HubError", "fetch_config", "hub_cache_dir", "is_offline", "looks_like_hub_id"]

CONFIG_FILE = "config.json"
_TRUE = {"1", "ON", "YES", "TRUE"}
# huggingface_hub's repo-id rule (utils/_validators.py): [org/]name, letters, digits, - _ . ; at most 96 chars
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


class HubError(ValueError):
    """A hub config that could not be had (one line, for the user)."""


def hub_cache_dir() -> str:
    """The HF hub cache huggingface_hub uses, resolved from the environment now (not at import time)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to 1/ON/YES/TRUE (read now, as huggingface_hub reads at import)."""
    return any(os.environ.get(var, "").strip().upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(name: str) -> bool:
    """`org/name` (or `name`) as the hub accepts it, and not a path that exists on disk."""
    return (bool(_REPO_ID.match(name)) and len(name) <= 96 and ".." not in name and "--" not in name
            and not name.endswith(".json") and not Path(name).exists())


def fetch_config(hub_id: str, revision: str | None = None) -> dict[str, Any]:
    """The config.json dict of a hub repo, without downloading anything else.

    Tries the hub unless offline, then the local HF cache; raises HubError (one line) when neither has it.
    """
    hub_id = hub_id.strip()
    if not looks_like_hub_id(hub_id):
        raise HubError(f"{hub_id!r} is not a hub repo id (org/name): pass a catalog name, a hub id or a path "
                       "to a config.json")
    cache = hub_cache_dir()
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of this feature
        raise HubError(f"{hub_id} is not in the catalog and huggingface_hub is not installed "
                       "(pip install huggingface_hub): pass a path to its config.json") from None

    online_problem = "is not used (offline: HF_HUB_OFFLINE=1)" if is_offline() else None
    if online_problem is None and not _endpoint_reachable():
        online_problem = "could not be reached"
    path: str | None = None
    with _quiet_hub_logs():
        if online_problem is None:
            try:
                path = hf_hub_download(hub_id, CONFIG_FILE, revision=revision, cache_dir=cache)
            except Exception as exc:  # noqa: BLE001 - any failure falls back to the cache, reported below
                online_problem = _describe_online_failure(exc)
        if path is None:
            try:
                path = hf_hub_download(hub_id, CONFIG_FILE, revision=revision, cache_dir=cache,
                                       local_files_only=True)
            except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not in the cache
                path = None
    if path is None:
        raise HubError(f"{hub_id} is not in the catalog, not in the local HF cache (HF_HUB_CACHE={cache}), and "
                       f"the hub {online_problem}: pass a path to its config.json")
    return _read_config(hub_id, Path(path))


def _endpoint_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint opens (skipped behind a proxy, where only the proxy can tell).

    Without it, huggingface_hub retries a dead network five times with backoff (about 25 s) before failing.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname
    if not host:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_hub_logs():  # type: ignore[no-untyped-def]
    """huggingface_hub logs every retry as a warning; the one-line HubError says what matters."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _describe_online_failure(exc: Exception) -> str:
    name = type(exc).__name__
    if name == "GatedRepoError":
        return "says the repo is gated (accept its license and log in with `hf auth login`)"
    if name == "RepositoryNotFoundError":
        return "has no such repo (or it is private: log in with `hf auth login`)"
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return "repo has no config.json"
    if name == "RevisionNotFoundError":
        return "repo has no such revision"
    if name == "OfflineModeIsEnabled":
        return "is disabled (offline mode)"
    if name == "HFValidationError":
        return "rejected the repo id"
    return "could not be reached"


def _read_config(hub_id: str, path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise HubError(f"{hub_id}: cannot read the cached config.json at {path} ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise HubError(f"{hub_id}: config.json at {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise HubError(f"{hub_id}: config.json at {path} does not hold a JSON object")
    return cfg
