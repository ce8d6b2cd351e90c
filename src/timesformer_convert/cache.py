"""One cache folder for downloaded checkpoints, synthetic checkpoints and conversions.

Default location: ``$TIMESFORMER_CONVERT_CACHE`` (``~`` and ``$VARS`` expanded), else
``$XDG_CACHE_HOME/timesformer-convert``, else ``~/.cache/timesformer-convert``. A folder the converter creates, or
finds empty, gets a ``CACHEDIR.TAG`` (the Cache Directory Tagging standard, so backup tools skip it); ``clean``
empties only a folder holding that tag, or the default location, which older versions made without one.

Every entry is built under a temporary name and renamed into place once complete, while a file lock beside it makes
parallel processes (pytest-xdist workers, concurrent CLI runs) build it once: the first one builds, the others wait
and reuse the result.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
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
# Marks a folder as this converter's cache. The first line is the standard's signature, byte for byte.
CACHE_TAG = "CACHEDIR.TAG"
CACHE_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by timesformer-convert.\n"
    "# For information about cache directory tags, see https://bford.info/cachedir/\n"
)


def default_cache_dir() -> Path:
    """Where the cache is when ``$TIMESFORMER_CONVERT_CACHE`` is not set."""
    return _expanded(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "timesformer-convert"


def cache_location() -> Path:
    """The cache root the environment names (see the module docstring), without creating it.

    Raises ConversionError when a file stands where the folder (or one of its parents) would be.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured and not configured.strip():
        raise ConversionError(f"${CACHE_ENV} is blank; unset it, or set it to a folder")
    root = _expanded(configured) if configured else default_cache_dir()
    blocker = _file_in_the_way(root)
    if blocker is not None:
        raise ConversionError(
            f"{blocker}: is a file, not a folder, so it cannot hold the cache ({_named_by()}); set {CACHE_ENV} to a "
            "folder"
        )
    return root


def cache_dir() -> Path:
    """The cache root (see :func:`cache_location`), created if missing and tagged if it holds nothing yet.

    Raises ConversionError when it cannot be created or written.
    """
    root = cache_location()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _tag_if_empty(root)
    except OSError as e:
        raise ConversionError(
            f"{root}: cannot be used as the cache folder ({_named_by()}: {e.strerror or e}); set {CACHE_ENV} to a "
            "folder you can write"
        ) from e
    return root


def is_tagged(root: Path) -> bool:
    """Whether ``root`` holds this converter's ``CACHEDIR.TAG``."""
    tag = root / CACHE_TAG
    if tag.is_symlink():  # a link to another folder's tag says nothing about this folder
        return False
    try:
        text = tag.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return text.startswith(CACHE_TAG_TEXT.splitlines()[0]) and "timesformer-convert" in text


def _expanded(value: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(value)))


def _named_by() -> str:
    return f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the default cache folder"


def _file_in_the_way(root: Path) -> Path | None:
    """The nearest of ``root`` and its parents that exists, when that is not a folder."""
    for path in (root, *root.parents):
        try:
            if path.exists():
                return None if path.is_dir() else path
        except OSError:  # a parent that cannot be searched: mkdir reports that better
            return None
    return None


def umask_mode(mode: int) -> int:
    """``mode`` as ``mkdir`` or ``open`` would give it under the process's umask. ``tempfile`` creates folders
    0700 and files 0600; what is moved into place from there gets this mode, like any folder or file the user makes."""
    umask = os.umask(0o022)
    os.umask(umask)
    return mode & ~umask


def unclean_reason(root: Path) -> str | None:
    """Why :func:`clean` would refuse ``root``, or None when it is the cache: tagged, or the default location."""
    if is_tagged(root) or root.resolve() == default_cache_dir().resolve():
        return None
    return f"it holds no {CACHE_TAG} of timesformer-convert, so it may not be a cache"


def _tag_if_empty(root: Path) -> None:
    """Write the tag into ``root`` when it holds nothing, through a temporary name, so that a reader never sees half
    a tag. A folder that already holds files is left as it is: nothing says they are the converter's."""
    if (root / CACHE_TAG).exists() or any(root.iterdir()):
        return
    handle, staging = tempfile.mkstemp(prefix=f".{CACHE_TAG}.", dir=root)
    try:
        os.chmod(handle, umask_mode(0o666))
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(CACHE_TAG_TEXT)
        os.replace(staging, root / CACHE_TAG)
    finally:
        Path(staging).unlink(missing_ok=True)


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
    """Size of a file, or of every file under a folder. A symbolic link counts as itself, never as what it points to:
    deleting it frees only the link."""
    if path.is_symlink() or not path.is_dir():
        return _lstat_size(path)
    return sum(_lstat_size(Path(folder, name)) for folder, _, names in os.walk(path) for name in names)


def _lstat_size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:  # removed meanwhile by another process
        return 0


def usage(root: Path | None = None) -> tuple[int, int]:
    """Return (top-level entries, total bytes) of the cache, the tag not counted; (0, 0) when it does not exist.
    Creates nothing."""
    root = root or cache_location()
    if not root.is_dir():
        return 0, 0
    return sum(entry.name != CACHE_TAG for entry in root.iterdir()), _bytes_under(root)


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

    Anything else in the folder was not put there by the converter and is kept, with a warning naming it. Raises
    ConversionError, deleting nothing, when ``root`` holds no ``CACHEDIR.TAG`` and is not the default location; and,
    after deleting what it could, naming what it could not remove.
    """
    root = root or cache_location()
    if not root.is_dir() or next(root.iterdir(), None) is None:
        return 0
    refusal = unclean_reason(root)
    if refusal is not None:
        raise ConversionError(
            f"{root}: not cleaned, {refusal} ({_named_by()}); point {CACHE_ENV} at the cache folder, or delete its "
            "checkpoints, downloads, real and suite-* folders yourself"
        )
    owned = [entry for entry in root.iterdir() if OWNED_ENTRIES.fullmatch(entry.name) and not entry.is_symlink()]
    foreign = sorted(entry.name for entry in root.iterdir() if entry not in owned and entry.name != CACHE_TAG)
    if foreign:
        logger.warning(
            "%s: kept %d entr%s the converter did not create: %s",
            root,
            len(foreign),
            "y" if len(foreign) == 1 else "ies",
            ", ".join(foreign[:10]) + (" ..." if len(foreign) > 10 else ""),
        )

    freed, kept = 0, []
    for entry in owned:
        size = _bytes_under(entry)
        problem = _remove(entry)
        freed += size - (_bytes_under(entry) if os.path.lexists(entry) else 0)
        if problem is not None:
            kept.append(f"{entry} ({problem})")
    if kept:
        raise ConversionError(
            f"{root}: removed {freed / 2**20:.1f} MiB, but could not remove {'; '.join(kept)}; fix its permissions "
            "and run clean again, or delete it yourself"
        )
    return freed


def _remove(entry: Path) -> str | None:
    """Delete a file, or a folder and everything in it, as far as possible; return the first reason something
    could not be deleted, else None."""
    problems = []

    def record(path, error: BaseException) -> None:
        problems.append(f"{path}: {getattr(error, 'strerror', None) or error}")

    if not entry.is_dir():
        try:
            entry.unlink(missing_ok=True)
        except OSError as e:
            record(entry, e)
    elif sys.version_info >= (3, 12):
        shutil.rmtree(entry, onexc=lambda _function, path, error: record(path, error))
    else:
        shutil.rmtree(entry, onerror=lambda _function, path, info: record(path, info[1]))
    return problems[0] if problems else None
