"""Models and adapters on the Hugging Face Hub, for users who are online (and from its cache when offline).

A spec ``owner/name``, ``owner/name@revision`` or ``owner/name/sub/folder[@revision]`` that is neither a
bundled alias nor an existing local folder names a Hub repository (``sub/folder`` inside it). It resolves
through ``huggingface_hub.snapshot_download``: from the local cache when the process is offline
(``HF_HUB_OFFLINE=1``, as the Makefile, CI and the tests set it), downloading otherwise. Only safetensors
weights and small text files are fetched: pickle weights are never downloaded or loaded.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import OrthomergeError

REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?P<sub>(/[\w.\-]+)*)(@(?P<rev>[\w.\-/]+))?$")
CONFIG_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]   # config and tokenizer
MODEL_FILES = [*CONFIG_FILES, "*.safetensors"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "*.json", "*.txt", "*.model"]


@dataclass(frozen=True)
class HubSpec:
    repo: str
    subfolder: str = ""
    revision: str | None = None


def parse_hub_spec(spec: str) -> HubSpec | None:
    """``owner/name[/sub][@rev]`` as a :class:`HubSpec`; ``None`` for anything else (a path, an alias)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return None
    match = REPO_SPEC.match(spec)
    if not match:
        return None
    return HubSpec(match["repo"], match["sub"].strip("/"), match["rev"])


def offline() -> bool:
    """Whether the process is offline for the Hub (read now, not at import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(spec: str, files: list[str]) -> Path | None:
    """The local folder of Hub spec ``spec`` (its subfolder, if named), or ``None`` if ``spec`` is no Hub spec.

    Offline, only the cache is read and a repository not in it is a one-line error; online, missing files
    are downloaded. ``files`` are the glob patterns fetched (inside the subfolder).
    """
    hub = parse_hub_spec(spec)
    if hub is None:
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{hub.subfolder}/{p}" if hub.subfolder else p for p in files]
    is_offline = offline()
    try:
        folder = Path(snapshot_download(hub.repo, revision=hub.revision, allow_patterns=patterns,
                                        cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                        local_files_only=is_offline))
    except LocalEntryNotFoundError:
        where = "the process is offline (HF_HUB_OFFLINE=1)" if is_offline else "it could not be downloaded"
        raise OrthomergeError(f"{spec}: no such local folder, and as a Hub repo it is not in the local Hugging "
                              f"Face cache while {where}") from None
    except (HFValidationError, HfHubHTTPError, OSError) as err:
        raise OrthomergeError(f"{spec}: cannot resolve on the Hugging Face Hub ({str(err).splitlines()[0]})") from None
    folder = folder / hub.subfolder if hub.subfolder else folder
    if not folder.is_dir():
        raise OrthomergeError(f"{spec}: no folder {hub.subfolder!r} in {hub.repo}")
    return folder
