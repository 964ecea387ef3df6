"""Checkpoint files from a local path or the Hugging Face Hub (`huggingface_hub`, which transformers brings).

`ckpt_path` / `ae_path` take a local file, `"org/repo:file.safetensors"`, or a repo id with the file named by the
original's `repo_flow` / `repo_ae` keys (and a missing path with `repo_id` set means that repo). Downloads go to
the Hugging Face cache with a progress bar and use `HF_TOKEN` when it is set; `HF_HUB_OFFLINE=1` reads the cache
only. A gated, missing or unreachable file is one `ConfigError` line that names the repo and what to do.
"""

import os
import re
from pathlib import Path

from huggingface_hub import errors as hub_errors
from huggingface_hub import hf_hub_download
from loguru import logger

from errors import ConfigError

HUB_REF = re.compile(r"^[\w.-]+/[\w.-]+:[^:]+$")  # org/repo:path/in/repo.safetensors
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LOCAL_SUFFIXES = (".safetensors", ".sft")


def is_reference(value: str | None) -> bool:
    """Whether `value` names a hub file (or a repo) rather than a local file (a path ending in a checkpoint's
    extension is a local file, even when it is missing)."""
    if not value or Path(value).expanduser().exists():
        return False
    return bool(HUB_REF.match(value) or (REPO_ID.match(value) and not value.endswith(LOCAL_SUFFIXES)))


def split(value: str | None, repo_id: str | None, filename: str | None) -> tuple[str, str] | None:
    """(repo, file) that `value` (with the repo keys) names on the hub, or None for a local path."""
    if value and HUB_REF.match(value) and not Path(value).expanduser().exists():
        repo, _, name = value.partition(":")
        return repo, name
    if is_reference(value) and REPO_ID.match(value):
        if not filename:
            raise ConfigError(f"{value} is a repo id: name the file as '{value}:FILE.safetensors'")
        return value, filename
    if not value and repo_id and filename:
        return repo_id, filename
    return None


def resolve(value: str | None, repo_id: str | None, filename: str | None, what: str) -> str:
    """A local path for a checkpoint: `value` itself, or the hub file it names, downloaded (or found in the cache)."""
    target = split(value, repo_id, filename)
    if target is None:
        if not value:
            raise ConfigError(f"{what}: no file given (a path, or 'org/repo:file.safetensors')")
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{what}: file not found: {value}")
        return str(path)
    repo, name = target
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    logger.info(f"{what}: {repo}:{name} from the Hugging Face {'cache' if offline else 'Hub'}")
    token_hint = "set HF_TOKEN to a token that has accepted the model's licence on its Hugging Face page"
    try:
        return hf_hub_download(repo, name, token=os.environ.get("HF_TOKEN") or None)
    except hub_errors.GatedRepoError:
        raise ConfigError(f"{what}: {repo} is gated: {token_hint}") from None
    except hub_errors.RepositoryNotFoundError:
        raise ConfigError(f"{what}: repo {repo} not found, or private: check the id, or {token_hint}") from None
    # the cache's miss first: LocalEntryNotFoundError is an EntryNotFoundError too
    except hub_errors.LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set and the cache" if offline else "the Hub cannot be reached and the cache"
        raise ConfigError(f"{what}: {where} has no {repo}:{name} (download it once online)") from None
    except hub_errors.EntryNotFoundError:
        raise ConfigError(f"{what}: {repo} has no file {name}") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise ConfigError(f"{what}: {repo}:{name} could not be downloaded: {type(e).__name__}: {e}") from None
