"""Hugging Face Hub ids ("Qwen/Qwen3-8B") where a directory is expected, resolved through the local Hub cache.

Owns: telling a Hub id from a path, the cache directory and offline flag as the environment says *now*
(HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME, HF_HUB_OFFLINE; huggingface_hub reads them once at import, so they
are read here at call time and passed explicitly), resolving a model or dataset id to its snapshot directory
(`snapshot_download`, cache only when offline), and the one-line error for an id that is not there.
An existing path always wins: plain directories work as before, and nothing here is called for them.
"""
from __future__ import annotations

import os
import re
from typing import Optional

# org/name (the Hub's repo-id charset); a leading ./, / or ~ or a ".." component is a path, never an id.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "on", "yes", "true"}
# What an online model download fetches: configs, tokenizer files, safetensors weights (no .bin / .pth copies).
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def is_hub_id(value: str) -> bool:
    """True for "org/name" strings that are not an existing path."""
    return bool(_REPO_ID.match(value)) and ".." not in value.split("/") and not os.path.exists(value)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> str:
    """The huggingface_hub cache directory the environment names now (HF_HUB_CACHE > HF_HOME/hub > default)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def snapshot_dir(repo_id: str, key: str, repo_type: str = "model", revision: Optional[str] = None,
                 allow_patterns: Optional[list] = None) -> str:
    """The local snapshot directory of a Hub repo: from the cache (offline) or downloaded into it (online).

    A repo missing from the cache while HF_HUB_OFFLINE is set is a one-line ValueError naming `key`.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache, offline = hub_cache_dir(), hub_offline()
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache,
                                 local_files_only=offline, allow_patterns=None if offline else allow_patterns)
    except LocalEntryNotFoundError:
        if offline:
            raise ValueError(f"{key}: {repo_id!r} is not a directory, and the Hugging Face {repo_type} "
                             f"{repo_id!r} is not in the cache {cache} (HF_HUB_OFFLINE is set, so nothing is "
                             f"downloaded; fetch it with `huggingface-cli download"
                             f"{' --repo-type dataset' if repo_type == 'dataset' else ''} {repo_id}` or point HF_HOME "
                             f"at a cache that has it)") from None
        raise
    except Exception as exc:  # network / auth / missing repo while online: say which key and id
        raise ValueError(f"{key}: cannot fetch the Hugging Face {repo_type} {repo_id!r} into {cache}: "
                         f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def resolve_model_dir(value: str, key: str = "model.hf_dir") -> str:
    """A model directory for `value`: itself when it is a path (or not an id), else the id's cached snapshot."""
    if not value or not is_hub_id(value):
        return value
    return snapshot_dir(value, key, repo_type="model", allow_patterns=MODEL_PATTERNS)
