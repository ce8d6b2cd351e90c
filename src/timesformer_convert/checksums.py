"""The checksums lock file: the size and sha256 each downloaded checkpoint must have.

The lock file is a JSON object ``{"about": ..., "files": {key: {"sha256": ..., "size": ..., "source": ...}}}``. A key
is a variant name for the released checkpoints and the URL for any other download. Entries are written only when
recording is asked for (``--record-checksums``): the first successful download of a file pins it, and every later
download or cached copy of it must match. Nothing is pinned by default, since a pin is only worth what the download
that recorded it was worth.

Location: ``$TIMESFORMER_CHECKSUMS``, else ``checksums.json`` at the root of the source checkout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .errors import ConversionError, IntegrityError

logger = logging.getLogger(__name__)

CHECKSUMS_ENV = "TIMESFORMER_CHECKSUMS"
LOCK_FILE_NAME = "checksums.json"
ABOUT = (
    "Size and sha256 of downloaded TimeSformer checkpoints, keyed by variant name (or URL). Written only by "
    "`timesformer-convert convert --record-checksums` or `pytest --real --record-checksums`; every later download "
    "must match."
)
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """The size in bytes and the sha256 (lowercase hex) of a file."""

    size: int
    sha256: str


class Hasher:
    """Counts and hashes bytes as they stream past, so a download is checked without reading it back."""

    def __init__(self):
        self._sha256 = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        self.size += len(chunk)

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self._sha256.hexdigest())


def digest_file(path: str | os.PathLike) -> FileDigest:
    """Return the size and sha256 of the file at ``path``."""
    hasher = Hasher()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
            hasher.update(chunk)
    return hasher.digest()


def default_lock_path() -> Path | None:
    """The lock file in use: ``$TIMESFORMER_CHECKSUMS``, else the source checkout's ``checksums.json``, else None
    (an installed package outside a checkout has no lock file unless one is named)."""
    configured = os.environ.get(CHECKSUMS_ENV)
    if configured:
        return Path(configured)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root / LOCK_FILE_NAME
    return None


class ChecksumLock:
    """The pinned digests in one lock file; a missing file pins nothing."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None

    def _read(self) -> dict[str, dict]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            files = data["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not an object")
            return files
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(
                f"{self.path}: cannot read the checksums lock file ({e}); fix or delete it, or name another with "
                f"--checksums / ${CHECKSUMS_ENV}"
            ) from e

    def pinned(self, key: str) -> FileDigest | None:
        """The digest pinned for ``key``, or None."""
        entry = self._read().get(key)
        if entry is None:
            return None
        try:
            return FileDigest(int(entry["size"]), str(entry["sha256"]).lower())
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{self.path}: the entry for {key!r} needs 'size' and 'sha256'") from e

    def keys(self) -> Iterable[str]:
        return sorted(self._read())

    def check(self, key: str, actual: FileDigest, what: str) -> None:
        """Raise IntegrityError when ``actual`` (the digest of ``what``, a URL or path) differs from the pin."""
        pin = self.pinned(key)
        if pin is None or pin == actual:
            return
        if pin.size != actual.size:
            difference = f"its size is {actual.size} bytes, the pinned size is {pin.size}"
        else:
            difference = f"its sha256 is {actual.sha256}, the pinned sha256 is {pin.sha256}"
        raise IntegrityError(
            f"{what}: does not match the checksum pinned for {key} in {self.path} ({difference}); the file changed "
            "upstream or is corrupt. Nothing was kept. If you trust the new file, run again with --record-checksums"
        )

    def record(self, key: str, digest: FileDigest, source: str) -> bool:
        """Pin ``digest`` for ``key``; return True when the file changed. Written under a lock, atomically."""
        if self.path is None:
            raise ConversionError(
                f"no checksums lock file to record {key} in; name one with --checksums FILE or ${CHECKSUMS_ENV}"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            files = self._read()
            entry = {"sha256": digest.sha256, "size": digest.size, "source": source}
            previous = files.get(key)
            if previous == entry:
                return False
            if previous is not None:
                logger.warning("replacing the pinned checksum of %s in %s", key, self.path)
            files[key] = entry
            text = json.dumps({"about": ABOUT, "files": dict(sorted(files.items()))}, indent=2) + "\n"
            handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(text)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        logger.info("pinned %s: %d bytes, sha256 %s, in %s", key, digest.size, digest.sha256, self.path)
        return True
