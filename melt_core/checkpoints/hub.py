"""Checkpoints named by a Hugging Face Hub model id: ``ByteDance/Ouro-1.4B``, ``owner/name@revision``.

huggingface_hub does the work, so its own settings apply unchanged: the cache (HF_HOME /
HF_HUB_CACHE) and offline mode (HF_HUB_OFFLINE=1). A model downloaded once loads again offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..errors import CheckpointNotFoundError
from .files import CHECKPOINT_FILES  # never the remote-code .py files: melt runs its own model code

_REVISION = re.compile(r"[A-Za-z0-9._/-]+")  # a branch, tag (refs/pr/1 included) or commit hash


def is_hub_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` reads as ``owner/name[@revision]`` and is not a local path (a local path wins)."""
    text = str(text)
    if not text or text.startswith((".", "~", "/")) or os.path.isabs(text) or Path(text).exists():
        return False
    repo, at, revision = text.partition("@")
    if repo.count("/") != 1 or (at and not _REVISION.fullmatch(revision)):
        return False
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return False
    return True


def check_revision(revision: str, text: str) -> None:
    """A revision is a branch, tag or commit hash: one with ``..`` (or an empty path segment) could
    name a folder outside the Hub cache, so it is refused before huggingface_hub sees it."""
    if ".." in revision or revision.startswith("/") or revision.endswith("/") or "//" in revision:
        raise CheckpointNotFoundError(
            f"{text}: revision {revision!r} is not a branch, tag or commit hash (no '..' or empty path segments)"
        )


def resolve_hub_id(text: str) -> Path:
    """The local snapshot folder of Hub model ``text``, downloaded into the Hub cache if missing."""
    repo, _, revision = text.partition("@")
    check_revision(revision, text)
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=list(CHECKPOINT_FILES)))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise CheckpointNotFoundError(
            f"{text} is neither a local directory nor (completely) in the local Hugging Face Hub cache "
            f"({constants.HF_HUB_CACHE}), and {why}: download it on a machine with network access "
            f"(hf download {repo}) and copy the cache here (HF_HUB_CACHE, with HF_HUB_OFFLINE=1), "
            f"or pass a local checkpoint directory"
        ) from e
    except GatedRepoError as e:
        raise CheckpointNotFoundError(
            f"Hub model {repo} is gated: accept its terms on huggingface.co, then log in (hf auth login, or HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointNotFoundError(
            f"{text} is neither a local directory nor a model on the Hugging Face Hub "
            f"(if it is private, log in with hf auth login, or set HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointNotFoundError(
            f"Hub model {repo} has no revision {revision!r} (a branch, tag or commit hash)"
        ) from e
    except HfHubHTTPError as e:
        first_line = next(iter(str(e).splitlines()), type(e).__name__)
        raise CheckpointNotFoundError(f"cannot download Hub model {text}: {first_line}") from e
