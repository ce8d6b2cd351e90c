"""Fetching original checkpoints: released download locations, any http(s) URL, or a folder of downloaded files.

Where a variant's checkpoint comes from, first match wins:

1. ``<checkpoint folder>/<original file name>`` (``--checkpoint-dir`` or ``$TIMESFORMER_CHECKPOINT_DIR``);
2. the cache, ``<cache>/checkpoints/<variant name>.pyth``;
3. a download from the variant's model-zoo link (Dropbox), then from its Google Drive link where it has one.

Dropbox share links are rewritten to direct downloads (``dl=1``); Google Drive links go through ``gdown``, which
follows Drive's confirmation page for large files. Any other http(s) URL is fetched with ``requests`` and cached as
``<cache>/downloads/<hash of the URL>-<file name>``.

A download is refused, and nothing is kept, when the host answers with an error status, a web page or text instead of
a file, an empty body, fewer bytes than its Content-Length announced, a zip archive that is cut short, or when no data
arrives for ``timeout`` seconds. When the checksums lock file pins the file (see :mod:`.checksums`), its size and
sha256 must match too. Only then is the file renamed into the cache, under a lock that makes parallel processes
download it once. All of this happens before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.parse
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from .cache import LOCK_TIMEOUT_SECONDS, build_once, cache_dir
from .checksums import ChecksumLock, FileDigest, Hasher, default_lock_path, digest_file
from .errors import DownloadError, IntegrityError
from .variants import VARIANTS, Variant

logger = logging.getLogger(__name__)

CHECKPOINT_DIR_ENV = "TIMESFORMER_CHECKPOINT_DIR"
DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0
USER_AGENT = "timesformer-convert"

_CHUNK = 1 << 20
_SNIFF_BYTES = 512
_ZIP_MAGIC = b"PK\x03\x04"
_DROPBOX_HOSTS = ("dropbox.com", "www.dropbox.com")
_DRIVE_HOSTS = ("drive.google.com", "docs.google.com")


# --- sources ---------------------------------------------------------------------------------------------------------


def is_url(text: str) -> bool:
    """True when ``text`` is an http(s) URL rather than a path (also when it is a malformed one, such as an
    unclosed IPv6 bracket, so that it is refused as a URL rather than looked for as a file)."""
    try:
        scheme = urllib.parse.urlsplit(str(text)).scheme
    except ValueError:
        scheme = str(text).partition("://")[0].lower()
    return scheme in ("http", "https")


def check_url(url: str) -> None:
    """Raise DownloadError unless ``url`` parses as an http(s) URL with a host and a valid port."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check: it raises ValueError when out of range
    except ValueError as e:
        raise DownloadError(f"{url}: is not a valid URL ({e}); check the link") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"{url}: is not a valid http(s) URL (no host); check the link")


def is_google_drive(url: str) -> bool:
    return (urllib.parse.urlsplit(url).hostname or "") in _DRIVE_HOSTS


def direct_url(url: str) -> str:
    """The URL that downloads the file itself: Dropbox share links (``?dl=0`` or none) get ``dl=1``, which makes
    Dropbox send the file instead of its preview page. Other URLs are returned unchanged."""
    parts = urllib.parse.urlsplit(url)
    if (parts.hostname or "") not in _DROPBOX_HOSTS:
        return url
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(name, value) for name, value in query if name not in ("dl", "raw")] + [("dl", "1")]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def variant_urls(variant: Variant) -> list[str]:
    """The download locations of ``variant``'s original checkpoint, in the order they are tried."""
    urls = [direct_url(variant.url)]
    if variant.seed_url:
        urls.append(variant.seed_url)
    return urls


def variant_for_url(url: str) -> Variant | None:
    """The released variant whose download location ``url`` is, or None."""
    wanted = direct_url(url)
    return next((variant for variant in VARIANTS.values() if wanted in variant_urls(variant)), None)


def variant_cache_path(variant: Variant) -> Path:
    """Where the downloaded checkpoint of ``variant`` is cached: one file per variant, named after it."""
    return cache_dir() / "checkpoints" / f"{variant.name}.pyth"


def url_cache_path(url: str) -> Path:
    """Where a download from an arbitrary ``url`` is cached: a hash of the URL, then the URL's file name."""
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "checkpoint"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "downloads" / f"{digest}-{name}"


def checkpoint_dir_from_env() -> Path | None:
    configured = os.environ.get(CHECKPOINT_DIR_ENV)
    return Path(configured) if configured else None


# --- transfers -------------------------------------------------------------------------------------------------------


@contextmanager
def _progress_bar(enabled: bool, total: int | None, label: str):
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not enabled) as bar:
        yield bar


def _announced_length(response) -> int | None:
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    length = response.headers.get("Content-Length")
    if encoding not in ("", "identity") or length is None:
        return None
    try:
        return int(length)
    except ValueError:
        return None


def _is_timeout(error: BaseException) -> bool:
    import requests
    from urllib3.exceptions import ReadTimeoutError

    if isinstance(error, requests.Timeout):
        return True
    return any(isinstance(arg, ReadTimeoutError) for arg in getattr(error, "args", ()))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _http_download(url: str, staging: Path, timeout: float, progress: bool) -> FileDigest:
    """Stream ``url`` into ``staging`` with requests, hashing on the way; check status and length."""
    import requests

    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    try:
        response = requests.get(url, stream=True, timeout=(min(CONNECT_TIMEOUT, timeout), timeout), headers=headers)
    except requests.RequestException as e:
        if _is_timeout(e):
            raise DownloadError(
                f"{url}: no answer within {timeout:g} s; check the connection or raise --timeout"
            ) from e
        raise DownloadError(f"{url}: cannot connect ({_first_line(e)})") from e

    with response:
        if response.status_code != 200:
            raise DownloadError(
                f"{url}: the host answered HTTP {response.status_code} {response.reason or ''}".rstrip()
                + "; check the link, or download the file yourself and pass its path"
            )
        announced = _announced_length(response)
        hasher = Hasher()
        try:
            with open(staging, "wb") as out, _progress_bar(progress, announced, staging.name) as bar:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
        except requests.RequestException as e:
            received = max(hasher.size, response.raw.tell() if response.raw is not None else 0)
            if _is_timeout(e):
                raise DownloadError(
                    f"{url}: the host sent no data for {timeout:g} s (after {received} bytes); the download was "
                    "abandoned and nothing was kept; retry, or raise --timeout"
                ) from e
            raise DownloadError(_cut_short(url, received, announced)) from e

    digest = hasher.digest()
    if announced is not None and digest.size != announced:
        raise DownloadError(_cut_short(url, digest.size, announced))
    return digest


def _cut_short(url: str, received: int, announced: int | None) -> str:
    expected = f" of the {announced} announced" if announced is not None else ""
    return f"{url}: the download was cut short ({received} bytes{expected}); nothing was kept; run again"


def _drive_download(url: str, staging: Path, timeout: float, progress: bool) -> FileDigest:
    """Fetch a Google Drive file with gdown (which answers Drive's confirmation page for large files)."""
    import gdown
    import requests
    from gdown.exceptions import DownloadError as GdownError
    from gdown.exceptions import FileURLRetrievalError
    from gdown.parse_url import parse_url

    file_id, _ = parse_url(url)
    if not file_id:
        raise DownloadError(f"{url}: no file id in this Google Drive link; give a link of the form .../uc?id=ID")
    hasher = Hasher()
    with _progress_bar(progress, None, staging.name) as bar:

        def report(done: int, total: int | None) -> None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

        try:
            # No cookie file: gdown would otherwise read and write one in the user's home folder.
            gdown.download(
                id=file_id,
                output=str(staging),
                quiet=True,
                timeout=timeout,
                hasher=hasher,
                progress=report,
                use_cookies=False,
            )
        except FileURLRetrievalError as e:
            raise DownloadError(
                f"{url}: Google Drive answered with a web page instead of the file (likely its download quota is "
                "exceeded or the file needs permission); nothing was kept. Try later, or download it in a browser "
                "and pass the file or --checkpoint-dir"
            ) from e
        except GdownError as e:
            raise DownloadError(f"{url}: the Google Drive download failed ({_first_line(e)}); nothing was kept") from e
        except requests.RequestException as e:
            if _is_timeout(e):
                raise DownloadError(f"{url}: Google Drive sent no data for {timeout:g} s; nothing was kept") from e
            raise DownloadError(f"{url}: cannot download from Google Drive ({_first_line(e)})") from e
    return hasher.digest()


def _check_payload(url: str, path: Path, digest: FileDigest, target: Path) -> None:
    """Refuse what is clearly not a checkpoint: an empty body, a web page or text, a zip archive cut short."""
    from .checkpoint import describe_text  # here: checkpoint imports torch, which the rest of fetching does not need

    if digest.size == 0:
        raise DownloadError(f"{url}: the host sent an empty file (0 bytes); nothing was saved to {target}")
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    kind = describe_text(head)
    if kind is not None:
        if "HTML" in kind:
            what = (
                f"a web page instead of the checkpoint (HTML, {digest.size} bytes), likely a quota, login or "
                "permission page"
            )
        else:
            what = f"{kind.split(' (')[0]} instead of the checkpoint ({digest.size} bytes)"
        raise DownloadError(
            f"{url}: the host returned {what}; nothing was saved to {target}. Download it in a browser and pass the "
            "file, or put it in --checkpoint-dir"
        )
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise DownloadError(
            f"{url}: the file is a zip archive without its end ({digest.size} bytes): cut short; nothing was saved "
            f"to {target}; run again"
        )


def _download_checked(url: str, staging: Path, target: Path, key: str, lock: ChecksumLock, timeout, progress):
    """Download ``url`` into ``staging`` and run every check; return its digest. Raises DownloadError."""
    logger.info("downloading %s", url)
    transfer: Callable = _drive_download if is_google_drive(url) else _http_download
    digest = transfer(url, staging, timeout, progress)
    _check_payload(url, staging, digest, target)
    lock.check(key, digest, url)
    logger.info("downloaded %s: %d bytes, sha256 %s", url, digest.size, digest.sha256)
    return digest


def _drop_mismatched_cache(target: Path, key: str, lock: ChecksumLock) -> None:
    """Delete a cached file that the lock file pins to another digest, so it is downloaded afresh."""
    pin = lock.pinned(key)
    if pin is None:
        return
    with FileLock(str(target) + ".lock", timeout=LOCK_TIMEOUT_SECONDS):
        if not target.exists():
            return
        if target.stat().st_size == pin.size and digest_file(target) == pin:
            return
        logger.warning(
            "%s does not match the checksum pinned for %s in %s; downloading it again", target, key, lock.path
        )
        target.unlink()


def fetch(
    url: str,
    target: str | os.PathLike,
    *,
    key: str | None = None,
    lock: ChecksumLock | None = None,
    record: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> Path:
    """Return ``target``, downloading ``url`` into it first unless it is already cached.

    ``key`` names the file in the checksums ``lock`` (default: the URL; lock default: :func:`default_lock_path`).
    A pinned file is checked before it is cached, and a cached copy that no longer matches its pin is replaced. With
    ``record`` the digest is pinned in the lock file. Parallel callers for the same target download it once.
    Raises DownloadError (IntegrityError for a pin mismatch); nothing is left at ``target`` then.
    """
    url = direct_url(url)
    target = Path(target)
    key = key or url
    lock = lock if lock is not None else ChecksumLock(default_lock_path())
    if target.exists():
        _drop_mismatched_cache(target, key, lock)

    digests: list[FileDigest] = []

    def build(staging: Path) -> None:
        digests.append(_download_checked(url, staging, target, key, lock, timeout, progress))

    build_once(target, build)
    if record:
        lock.record(key, digests[0] if digests else digest_file(target), url)
    return target


def fetch_url(
    url: str,
    *,
    lock: ChecksumLock | None = None,
    record: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> Path:
    """Download an http(s) checkpoint URL into the cache (once) and return its path.

    A released variant's own link is cached and pinned as that variant; any other URL under its own name and key.
    Raises DownloadError as :func:`fetch` does.
    """
    check_url(url)
    variant = variant_for_url(url)
    if variant is not None:
        return fetch(
            url,
            variant_cache_path(variant),
            key=variant.name,
            lock=lock,
            record=record,
            timeout=timeout,
            progress=progress,
        )
    url = direct_url(url)
    return fetch(url, url_cache_path(url), key=url, lock=lock, record=record, timeout=timeout, progress=progress)


def fetch_variant(
    variant: Variant,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    download: bool = True,
    lock: ChecksumLock | None = None,
    record: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> Path:
    """Return the path of ``variant``'s original checkpoint: from the checkpoint folder, the cache, or downloaded.

    ``checkpoint_dir`` defaults to ``$TIMESFORMER_CHECKPOINT_DIR``; a file there named ``variant.original_file`` is
    used as is, checked against its pin. Without ``download`` nothing is fetched. Download locations are tried in
    order (:func:`variant_urls`) until one gives a file that passes every check. Raises DownloadError naming each
    location and why it failed (IntegrityError when every failure was a pin mismatch).
    """
    lock = lock if lock is not None else ChecksumLock(default_lock_path())
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else checkpoint_dir_from_env()
    if folder is not None:
        local = folder / variant.original_file
        if local.is_file():
            digest = digest_file(local) if record or lock.pinned(variant.name) else None
            if digest is not None:
                lock.check(variant.name, digest, str(local))
                if record:
                    lock.record(variant.name, digest, variant_urls(variant)[0])
            logger.info("using %s for %s", local, variant.name)
            return local

    target = variant_cache_path(variant)
    if not download and not target.exists():
        where = f"neither in {folder} nor in" if folder is not None else "not in"
        raise DownloadError(
            f"{variant.name}: {variant.original_file} is {where} the cache ({target}), and downloading is off"
        )

    failures: list[DownloadError] = []
    urls = variant_urls(variant)
    for position, url in enumerate(urls):
        try:
            return fetch(url, target, key=variant.name, lock=lock, record=record, timeout=timeout, progress=progress)
        except DownloadError as e:
            failures.append(e)
            if position + 1 < len(urls):
                logger.warning("%s; trying the next download location", e)
    if len(failures) == 1:
        raise failures[0]
    kind = IntegrityError if all(isinstance(e, IntegrityError) for e in failures) else DownloadError
    raise kind(
        f"{variant.name}: no download location gave a valid checkpoint: " + " | ".join(map(str, failures))
    ) from failures[-1]
