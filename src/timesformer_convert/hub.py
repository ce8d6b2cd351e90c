"""Files from the Hugging Face hub, through ``huggingface_hub`` and its cache.

The spaghetti clip the reference logits were computed on, and the published transformers conversions of the released
variants, are hub files. By default only the local hub cache is read, so an offline machine with a warm cache works
(``HF_HOME`` / ``HF_HUB_CACHE`` say where that cache is, read when a file is asked for); ``download=True`` lets
``huggingface_hub`` fetch what is missing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ClipError, DownloadError
from .variants import Variant

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

SPAGHETTI_REPO = "hf-internal-testing/spaghetti-video"
SPAGHETTI_FILE = "eating_spaghetti.npy"
# The published conversions hold their weights in one of these files, looked for in this order.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Name the hub cache folder itself, in this order; without them it is $HF_HOME/hub.
HUB_CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def hub_cache_dir() -> Path:
    """The hub cache folder the environment names now: ``$HF_HUB_CACHE`` (or its older name
    ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``. That is ``huggingface_hub``'s own order, which it reads once, on import; reading it
    on each call honours a process that changes them later."""
    cache = next((os.environ[name] for name in HUB_CACHE_VARIABLES if os.environ.get(name)), None)
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(cache)))


def hub_file(
    repo_id: str,
    filename: str,
    *,
    repo_type: str | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Path of ``filename`` from the hub repository ``repo_id``, from the hub cache or (with ``download``) fetched.

    Raises DownloadError saying how to get the file when it is not cached (and not downloaded) or the hub refuses.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = cache_dir if cache_dir is not None else hub_cache_dir()
    try:
        path = hf_hub_download(
            repo_id, filename, repo_type=repo_type, cache_dir=cache_dir, local_files_only=not download
        )
    except LocalEntryNotFoundError as e:
        raise DownloadError(
            f"{repo_id}/{filename}: not in the Hugging Face hub cache and not downloaded; run once with network "
            "access (pytest --real), or point HF_HOME / HF_HUB_CACHE at a cache that holds it"
        ) from e
    except Exception as e:  # the hub client raises many types for network, permission and missing-file failures
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DownloadError(f"{repo_id}/{filename}: the Hugging Face hub refused it ({first})") from e
    return Path(path)


def spaghetti_clip_file(download: bool = False, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the spaghetti clip (``eating_spaghetti.npy``), see :func:`hub_file`."""
    return hub_file(SPAGHETTI_REPO, SPAGHETTI_FILE, repo_type="dataset", download=download, cache_dir=cache_dir)


def read_clip_array(path: str | os.PathLike) -> list[np.ndarray]:
    """Read a clip saved as a NumPy array of frames (frames, height, width, 3), uint8 RGB, and return its frames.

    Loaded without pickle. Raises ClipError naming the file when it is not such an array.
    """
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ClipError(f"{path}: not a NumPy array file of video frames ({e})") from e
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ClipError(f"{path}: holds an array of shape {array.shape}; expected (frames, height, width, 3)")
    if array.dtype != np.uint8:
        raise ClipError(f"{path}: holds {array.dtype} values; expected uint8 RGB frames")
    return list(array)


def hub_state_dict(variant: Variant, download: bool = False, cache_dir=None) -> dict[str, torch.Tensor]:
    """The weights of the published transformers conversion of ``variant`` (``variant.hub_id``).

    Reads ``model.safetensors``, else ``pytorch_model.bin`` (with ``weights_only=True``). Raises DownloadError when
    neither is available.
    """
    import torch

    failures = []
    for filename in HUB_WEIGHT_FILES:
        try:
            path = hub_file(variant.hub_id, filename, download=download, cache_dir=cache_dir)
        except DownloadError as e:
            failures.append(str(e))
            continue
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    raise DownloadError(f"{variant.hub_id}: no weights file available: " + " | ".join(failures))
