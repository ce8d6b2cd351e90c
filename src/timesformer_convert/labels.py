"""Label maps (class index to name) for converted models.

A label map is a JSON object ``{"0": "abseiling", ...}``. It comes from a file the user names, or from the Hugging
Face hub dataset that holds the released label files, through ``huggingface_hub`` and its cache. Downloading is only
done when asked for; by default only the local hub cache is consulted, so an offline machine with a warm cache works
and a conversion never reaches the network on its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .errors import ConversionError, first_few
from .variants import LABEL_REPO, Variant

logger = logging.getLogger(__name__)


def read_label_file(path: str | os.PathLike, num_labels: int | None = None) -> dict[int, str]:
    """Read a JSON label map and return ``{index: name}``.

    Raises ConversionError naming the file when it cannot be read, is not a JSON object of index to name, or does not
    hold exactly ``num_labels`` consecutive indices from 0.
    """
    path = Path(path)
    if path.is_dir():
        raise ConversionError(
            f"{path}: is a directory, not a label file; give a JSON file mapping class index to name"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the label file ({e.strerror or e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: the label file is not valid JSON ({e})") from e
    except RecursionError as e:
        raise ConversionError(f"{path}: the label file nests too deeply to be a label map") from e
    except _DuplicateKeyError as e:
        raise ConversionError(f"{path}: the label file gives class {e} twice; keep one name per class") from e
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: the label file must be a JSON object mapping class index to name")
    if any(not isinstance(index, str) or not index.isascii() or not index.isdigit() for index in raw):
        raise ConversionError(f'{path}: label file keys must be class indices ("0", "1", ...)')
    not_names = sorted((index for index, name in raw.items() if not isinstance(name, str)), key=int)
    if not_names:
        raise ConversionError(
            f"{path}: label names must be strings; class {', '.join(not_names[:10])} "
            f"{'is' if len(not_names) == 1 else 'are'} not"
        )
    labels = {}
    for index, name in raw.items():
        if int(index) in labels:
            raise ConversionError(f"{path}: the label file gives class {int(index)} twice; keep one name per class")
        labels[int(index)] = name
    if num_labels is not None and len(labels) != num_labels:
        raise ConversionError(
            f"{path}: holds {len(labels)} labels, but the checkpoint's head has {num_labels} classes"
        )
    if num_labels is not None and sorted(labels) != list(range(num_labels)):
        missing = sorted(set(range(num_labels)) - set(labels))
        extra = sorted(set(labels) - set(range(num_labels)))
        raise ConversionError(
            f"{path}: class indices must run from 0 to {num_labels - 1}; missing {first_few(missing)}, "
            f"out of range {first_few(extra)}"
        )
    return labels


class _DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (``json`` would silently keep the last)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKeyError(key)
        seen[key] = value
    return seen


def hub_label_file(variant: Variant, download: bool = False) -> Path | None:
    """Path of ``variant``'s label file from the hub cache, or None when it is not cached.

    With ``download`` the file is fetched when missing (network access to the hub). Without it only the local cache
    is read. Errors from the hub are logged and give None.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return None
    from .hub import hub_cache_dir

    try:
        return Path(
            hf_hub_download(
                LABEL_REPO,
                variant.label_file,
                repo_type="dataset",
                cache_dir=hub_cache_dir(),
                local_files_only=not download,
            )
        )
    except LocalEntryNotFoundError:
        return None
    except Exception as e:  # the hub client raises many types for network and permission failures
        logger.warning("could not get %s from the hub dataset %s: %s", variant.label_file, LABEL_REPO, e)
        return None


def hub_label_absence(variant: Variant) -> str:
    """Why :func:`hub_label_file` found no label file for ``variant``: the hub cache folder it searched was unreadable,
    or did not hold the file. Names the folder."""
    from .hub import hub_cache_dir

    folder = hub_cache_dir()
    repo = folder / f"datasets--{LABEL_REPO.replace('/', '--')}"
    # A folder that cannot be listed looks the same as an empty one to huggingface_hub.
    for searched in (folder, repo):
        if searched.is_dir() and not os.access(searched, os.R_OK | os.X_OK):
            return f"cannot read the hub cache folder {searched}; fix its permissions"
    return f"{variant.label_file} not in the hub cache {folder}"


def read_hub_label_file(path: str | os.PathLike, num_labels: int | None = None) -> dict[int, str]:
    """:func:`read_label_file` for a file :func:`hub_label_file` found: a cached copy that cannot be used is an error
    naming it and saying how to get past it."""
    try:
        return read_label_file(path, num_labels)
    except ConversionError as e:
        raise ConversionError(
            f"{e}; it is a cached hub file: delete it (--fetch-labels downloads it again), or pass --labels FILE"
        ) from e
