"""One cache folder for downloaded checkpoints, synthetic checkpoints and conversions.

Default location: ``$TIMESFORMER_CONVERT_CACHE``, else ``$XDG_CACHE_HOME/timesformer-convert``, else
``~/.cache/timesformer-convert``. Every entry is built under a temporary name and renamed into place once complete,
while a file lock beside it makes parallel processes (pytest-xdist workers, concurrent CLI runs) build it once: the
first one builds, the others wait and reuse the result.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from .errors import ConversionError

logger = logging.getLogger(__name__)

CACHE_ENV = "TIMESFORMER_CONVERT_CACHE"
LOCK_TIMEOUT_SECONDS = 3600
# What the converter and its test suite put at the top of the cache; ``clean`` deletes these and nothing else, so a
# cache variable pointed at the wrong folder (a home folder, a project) never costs the files that were there.
OWNED_ENTRIES = re.compile(r"(checkpoints|downloads|real|suite-[0-9a-f]+)")


def cache_dir() -> Path:
    """The cache root (see the module docstring); created if missing."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        root = Path(configured)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "timesformer-convert"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f"${CACHE_ENV}" if configured else "the default cache folder"
        raise ConversionError(
            f"{root}: cannot be used as the cache folder ({where}: {e.strerror or e}); set {CACHE_ENV} to a folder "
            "you can write"
        ) from e
    if not root.is_dir():
        raise ConversionError(f"{root}: is not a folder, so it cannot hold the cache; set {CACHE_ENV} to a folder")
    return root


def build_once(target: Path, build: Callable[[Path], None], on_built: Callable[[Path], None] | None = None) -> Path:
    """Return ``target``, building it first if it does not exist.

    ``build(staging)`` must create ``staging`` (a file or a folder); it is renamed to ``target`` only when ``build``
    returns. Concurrent callers for the same target are serialised by a lock file beside it, so the work is done once.
    ``on_built`` is called only by the process that did the work.
    """
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=LOCK_TIMEOUT_SECONDS):
        if target.exists():
            return target
        _remove_stale_staging(target)
        staging_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        staging = staging_root / target.name
        try:
            build(staging)
            if not staging.exists():
                raise RuntimeError(f"building {target} produced nothing")
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging_root, ignore_errors=True)
        logger.info("built %s", target)
        if on_built is not None:
            on_built(target)
    return target


def _bytes_under(path: Path) -> int:
    """Size of a file, or of every file under a folder."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(inner.stat().st_size for inner in path.rglob("*") if inner.is_file())


def usage(root: Path | None = None) -> tuple[int, int]:
    """Return (top-level entries, total bytes) of the cache."""
    root = root or cache_dir()
    return len(list(root.iterdir())), _bytes_under(root)


def _remove_stale_staging(target: Path) -> None:
    """Delete staging folders of ``target`` left by a process killed mid-build. Call only while holding its lock:
    then no other process is building it. Their names never equal ``target``'s, so nothing ever trusted them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]{{8}}\.partial")
    for entry in target.parent.iterdir():
        if pattern.fullmatch(entry.name):
            logger.info("removing %s, left by an interrupted build", entry)
            shutil.rmtree(entry, ignore_errors=True)


def clean(root: Path | None = None) -> int:
    """Delete what the converter cached (see ``OWNED_ENTRIES``); return the number of bytes freed.

    Anything else in the folder was not put there by the converter and is kept, with a warning naming it.
    """
    root = root or cache_dir()
    owned = [entry for entry in root.iterdir() if OWNED_ENTRIES.fullmatch(entry.name) and not entry.is_symlink()]
    foreign = sorted(entry.name for entry in root.iterdir() if entry not in owned)
    if foreign:
        logger.warning(
            "%s: kept %d entr%s the converter did not create: %s",
            root,
            len(foreign),
            "y" if len(foreign) == 1 else "ies",
            ", ".join(foreign[:10]) + (" ..." if len(foreign) > 10 else ""),
        )
    freed = 0
    for entry in owned:
        freed += _bytes_under(entry)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return freed
