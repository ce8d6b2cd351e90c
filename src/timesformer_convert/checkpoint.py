"""Reading original TimeSformer checkpoints safely.

Checkpoints are unpickled with ``torch.load(weights_only=True)``, which refuses any pickle that would import or call
anything beyond plain tensors and containers; there is no fallback to full unpickling. Files in torch's zip format are
memory-mapped, so a 486 MB checkpoint is not read into memory before its tensors are used.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

# Containers the original trainer and common wrappers put the state dict in, in the order they are looked for.
STATE_DICT_ENTRIES = ("model_state", "model", "module", "state_dict")

_SNIFF_BYTES = 512


def describe_text(head: bytes) -> str | None:
    """Say what kind of text page a file starting with ``head`` is, or None when it does not look like text."""
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<")):
        return "an HTML or XML page (the host returned a web page, likely a quota, login or permission page)"
    if stripped.startswith((b"{", b"[")):
        return "a JSON document"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "a text file"
    return None


def check_readable(path: Path) -> int:
    """Check that ``path`` is a non-empty regular file that is not a text page. Return its size in bytes.

    Raises CheckpointError naming the path and what is wrong.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; give the path of a TimeSformer checkpoint (.pyth or .pth)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file; give the .pyth file inside it")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except PermissionError as e:
        raise CheckpointError(f"{path}: permission denied; make the file readable (chmod u+r) and retry") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy did not complete")
    kind = describe_text(head)
    if kind is not None:
        raise CheckpointError(f"{path}: is {kind}, not a checkpoint ({size} bytes); it was not loaded")
    return size


def load_checkpoint(path: str | os.PathLike) -> object:
    """Unpickle a checkpoint with ``weights_only=True``, memory-mapped when the file is in torch's zip format.

    Returns whatever object the file holds (usually a dict). Raises CheckpointError for a missing, unreadable, empty,
    text, truncated or corrupt file, and for a pickle that asks for anything other than plain weights.
    """
    path = Path(path)
    size = check_readable(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: is not a plain weights file: its pickle asks to import or call code"
            f"{' (' + detail.strip() + ')' if detail else ''}; it was not loaded. Re-save the weights alone with "
            "torch.save(state_dict) from a trusted environment"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        if is_zip:
            why = "a torch zip archive that is truncated or corrupt"
        else:
            why = "not a PyTorch checkpoint (neither torch's zip format nor a legacy pickle)"
        raise CheckpointError(f"{path}: is {why} ({size} bytes); download or copy it again") from e


def extract_state_dict(checkpoint: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the state dict inside a loaded checkpoint.

    Accepts ``{"model_state": sd, ...}`` (the original trainer's layout), ``{"model": sd}``, ``{"module": sd}``,
    ``{"state_dict": sd}`` and a bare state dict; other entries (optimizer state, epoch, cfg) are ignored.
    Raises CheckpointError when no state dict is found or an entry is not a tensor.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: holds a {type(checkpoint).__name__}, not a dict of weights")
    state_dict = checkpoint
    if not _is_state_dict(checkpoint):
        for entry in STATE_DICT_ENTRIES:
            if isinstance(checkpoint.get(entry), Mapping):
                state_dict = checkpoint[entry]
                logger.debug("state dict found under %r", entry)
                break
        else:
            entries = ", ".join(sorted(map(str, checkpoint))) or "nothing"
            raise CheckpointError(
                f"{source}: no state dict found; expected one of the entries {', '.join(STATE_DICT_ENTRIES)} "
                f"or a bare state dict, found: {entries}"
            )
    bad = sorted(str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if bad:
        raise CheckpointError(f"{source}: state dict entries are not tensors: {', '.join(bad)}")
    if not state_dict:
        raise CheckpointError(f"{source}: the state dict is empty")
    return dict(state_dict)


def _is_state_dict(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(value, torch.Tensor) for value in mapping.values())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``path`` safely and return its state dict (see :func:`load_checkpoint` and :func:`extract_state_dict`)."""
    return extract_state_dict(load_checkpoint(path), source=str(path))
