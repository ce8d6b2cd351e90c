"""Downloading checkpoints, against HTTP servers on 127.0.0.1 that play good and bad hosts.

Every test drives :func:`timesformer_convert.download.fetch_variant` (the function the CLI and the real tier use) or
the :func:`fetch` underneath it, with a variant whose download location is a loopback URL. The cache and the
checksums lock file are temporary folders per test.
"""

import dataclasses
import hashlib
import io
import json
import signal
import threading
import time
from pathlib import Path

import gdown
import pytest
import torch

from tests.loopback import QUOTA_PAGE, LoopbackServer, Route
from tests.running import Forked
from timesformer_convert.cache import CACHE_ENV, CACHE_TAG
from timesformer_convert.checkpoint import read_state_dict
from timesformer_convert.checksums import ChecksumLock, FileDigest
from timesformer_convert.config import DIVIDED, ModelShape
from timesformer_convert.download import (
    direct_url,
    fetch,
    fetch_url,
    fetch_variant,
    url_cache_path,
    variant_cache_path,
    variant_for_url,
    variant_urls,
)
from timesformer_convert.errors import DownloadError, IntegrityError
from timesformer_convert.reference import synthetic_checkpoint
from timesformer_convert.variants import VARIANTS

TINY = ModelShape(32, 2, 2, 64, 4, 32, 16, 5, DIVIDED)
DRIVE_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
REPO_ROOT = Path(__file__).resolve().parents[1]


def checkpoint_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    torch.save(synthetic_checkpoint(TINY, seed=seed), buffer)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def loopback_variant(url: str, seed_url: str | None = None):
    """A released variant whose download locations are replaced by ``url`` (and ``seed_url``)."""
    return dataclasses.replace(
        VARIANTS["timesformer-base-finetuned-k400"],
        name="loopback-tiny",
        original_file="tiny.pyth",
        url=url,
        seed_url=seed_url,
    )


def cached_files(cache: Path) -> list[str]:
    """Every file and folder in the cache except lock files and the cache's tag (which hold no data and are never
    trusted)."""
    if not cache.exists():
        return []
    kept = (p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock" and p != cache / CACHE_TAG)
    return sorted(str(p.relative_to(cache)) for p in kept)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def lock(tmp_path) -> ChecksumLock:
    return ChecksumLock(tmp_path / "checksums.json")


def pin(lock: ChecksumLock, key: str, size: int, digest: str) -> None:
    lock.path.write_text(json.dumps({"files": {key: {"size": size, "sha256": digest, "source": "test"}}}))


# --- download locations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "direct"),
    [
        (
            "https://www.dropbox.com/s/g5t24we9gl5yk88/a.pyth?dl=0",
            "https://www.dropbox.com/s/g5t24we9gl5yk88/a.pyth?dl=1",
        ),
        ("https://www.dropbox.com/s/key/a.pyth", "https://www.dropbox.com/s/key/a.pyth?dl=1"),
        ("https://dropbox.com/s/key/a.pyth?raw=1", "https://dropbox.com/s/key/a.pyth?dl=1"),
        (
            "https://www.dropbox.com/scl/fi/x/a.pyth?rlkey=k&dl=0",
            "https://www.dropbox.com/scl/fi/x/a.pyth?rlkey=k&dl=1",
        ),
        ("http://127.0.0.1:8000/a.pyth?dl=0", "http://127.0.0.1:8000/a.pyth?dl=0"),
    ],
    ids=["share-link", "no-query", "raw", "rlkey-kept", "other-host-unchanged"],
)
def test_dropbox_share_links_become_direct_downloads(share, direct):
    assert direct_url(share) == direct


def test_every_released_variant_downloads_directly_from_dropbox_then_drive():
    for variant in VARIANTS.values():
        urls = variant_urls(variant)

        assert urls[0].startswith("https://www.dropbox.com/s/") and urls[0].endswith(f"/{variant.original_file}?dl=1")
        assert variant_for_url(variant.url) is variant
        assert variant_cache_path(variant).name == f"{variant.name}.pyth"
    assert variant_urls(VARIANTS["timesformer-base-finetuned-k400"])[1].startswith("https://drive.google.com/")


def test_each_variant_and_url_has_its_own_cache_file(cache):
    paths = [variant_cache_path(variant) for variant in VARIANTS.values()]
    paths += [url_cache_path("http://127.0.0.1:1/a/model.pyth"), url_cache_path("http://127.0.0.1:1/b/model.pyth")]

    assert len(set(paths)) == len(paths)
    assert all(path.is_relative_to(cache) for path in paths)


# --- good downloads --------------------------------------------------------------------------------------------------


def test_a_good_download_is_cached_under_the_variant_name_and_fetched_once(server, cache, lock, good_bytes):
    variant = loopback_variant(server.serve("/model.pyth", Route(good_bytes)))

    first = fetch_variant(variant, lock=lock)
    second = fetch_variant(variant, lock=lock)

    assert first == second == cache / "checkpoints" / "loopback-tiny.pyth"
    assert first.read_bytes() == good_bytes
    assert server.requests("/model.pyth") == 1
    assert "model.blocks.1.temporal_fc.weight" in read_state_dict(first)
    assert cached_files(cache) == ["checkpoints/loopback-tiny.pyth"]
    assert not lock.path.exists(), "the lock file was written without --record-checksums"


def test_redirects_are_followed(server, cache, lock, good_bytes):
    server.serve("/content/model.pyth", Route(good_bytes))
    url = server.serve("/s/key/model.pyth", Route(status=302, location=server.url("/content/model.pyth")))

    path = fetch(url, cache / "model.pyth", lock=lock)

    assert path.read_bytes() == good_bytes
    assert (server.requests("/s/key/model.pyth"), server.requests("/content/model.pyth")) == (1, 1)


def test_a_checkpoint_folder_is_used_before_any_download(server, cache, lock, good_bytes, tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "tiny.pyth").write_bytes(good_bytes)
    variant = loopback_variant(server.serve("/model.pyth", Route(good_bytes)))

    path = fetch_variant(variant, checkpoint_dir=folder, lock=lock)

    assert path == folder / "tiny.pyth"
    assert server.requests("/model.pyth") == 0
    assert cached_files(cache) == []


def test_the_checkpoint_folder_comes_from_the_environment(server, cache, lock, good_bytes, tmp_path, monkeypatch):
    (tmp_path / "tiny.pyth").write_bytes(good_bytes)
    monkeypatch.setenv("TIMESFORMER_CHECKPOINT_DIR", str(tmp_path))
    variant = loopback_variant(server.serve("/model.pyth", Route(good_bytes)))

    assert fetch_variant(variant, lock=lock) == tmp_path / "tiny.pyth"
    assert server.requests("/model.pyth") == 0


def test_nothing_is_fetched_when_downloading_is_off(server, cache, lock, good_bytes, tmp_path):
    variant = loopback_variant(server.serve("/model.pyth", Route(good_bytes)))

    with pytest.raises(DownloadError, match="downloading is off") as error:
        fetch_variant(variant, checkpoint_dir=tmp_path, download=False, lock=lock)

    assert "tiny.pyth" in str(error.value) and str(tmp_path) in str(error.value)
    assert server.requests("/model.pyth") == 0


# --- refused downloads: nothing is cached ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "fragments"),
    [
        (Route(QUOTA_PAGE, content_type="text/html"), ["web page", f"{len(QUOTA_PAGE)} bytes", "quota"]),
        (Route(b"Access denied.\n", content_type="text/plain"), ["a text file", "15 bytes"]),
        (Route(b'{"error": "rate limited"}', content_type="application/json"), ["a JSON document"]),
        (Route(b""), ["empty file (0 bytes)"]),
        (Route(b"nope", status=403, content_type="text/plain"), ["HTTP 403"]),
        (Route(b"gone", status=404, content_type="text/plain"), ["HTTP 404"]),
    ],
    ids=["html-quota-page-200", "text-page", "json-page", "empty", "forbidden", "not-found"],
)
def test_what_is_not_a_checkpoint_is_refused_and_not_cached(server, cache, lock, route, fragments):
    url = server.serve("/model.pyth", route)

    with pytest.raises(DownloadError) as error:
        fetch_variant(loopback_variant(url), lock=lock)

    message = str(error.value)
    assert url in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert cached_files(cache) == []


def test_a_download_cut_short_of_its_content_length_is_refused(server, cache, lock, good_bytes):
    url = server.serve("/model.pyth", Route(good_bytes, send=len(good_bytes) // 2))

    with pytest.raises(DownloadError, match="cut short") as error:
        fetch_variant(loopback_variant(url), lock=lock)

    assert f"of the {len(good_bytes)} announced" in str(error.value)
    assert cached_files(cache) == []


def test_a_zip_archive_served_without_its_end_is_refused(server, cache, lock, good_bytes):
    url = server.serve("/model.pyth", Route(good_bytes[: len(good_bytes) // 2]))

    with pytest.raises(DownloadError, match="zip archive without its end"):
        fetch_variant(loopback_variant(url), lock=lock)

    assert cached_files(cache) == []


def test_a_host_that_stops_sending_is_abandoned_after_the_timeout(server, cache, lock, good_bytes):
    url = server.serve("/model.pyth", Route(good_bytes, stall_after=4096))

    with pytest.raises(DownloadError, match=r"sent no data for 0.5 s"):
        fetch(url, cache / "model.pyth", lock=lock, timeout=0.5)

    assert cached_files(cache) == []


def test_a_host_that_never_answers_is_abandoned_after_the_timeout(server, cache, lock):
    url = server.serve("/model.pyth", Route(stall_before_headers=True))

    with pytest.raises(DownloadError, match=r"no answer within 0.5 s"):
        fetch(url, cache / "model.pyth", lock=lock, timeout=0.5)

    assert cached_files(cache) == []


def test_nothing_listens(cache, lock):
    with LoopbackServer() as closed:
        url = closed.url("/model.pyth")

    with pytest.raises(DownloadError, match="cannot connect"):
        fetch(url, cache / "model.pyth", lock=lock, timeout=2)


# --- the checksums lock file -----------------------------------------------------------------------------------------


def test_a_file_whose_sha256_differs_from_the_pin_is_refused(server, cache, lock, good_bytes):
    url = server.serve("/model.pyth", Route(good_bytes))
    pin(lock, "loopback-tiny", len(good_bytes), "0" * 64)

    with pytest.raises(IntegrityError) as error:
        fetch_variant(loopback_variant(url), lock=lock)

    message = str(error.value)
    assert sha256(good_bytes) in message and "0" * 64 in message and str(lock.path) in message
    assert "--record-checksums" in message
    assert cached_files(cache) == []


def test_a_file_whose_size_differs_from_the_pin_is_refused(server, cache, lock, good_bytes):
    url = server.serve("/model.pyth", Route(good_bytes))
    pin(lock, "loopback-tiny", len(good_bytes) + 1, sha256(good_bytes))

    with pytest.raises(IntegrityError, match=f"its size is {len(good_bytes)} bytes, the pinned size is"):
        fetch_variant(loopback_variant(url), lock=lock)

    assert cached_files(cache) == []


def test_recording_pins_the_first_download_and_later_downloads_must_match(server, cache, lock, good_bytes):
    url = server.serve("/model.pyth", Route(good_bytes))

    fetch_variant(loopback_variant(url), lock=lock, record=True)

    entry = json.loads(lock.path.read_text())["files"]["loopback-tiny"]
    assert entry == {"sha256": sha256(good_bytes), "size": len(good_bytes), "source": url}
    assert lock.pinned("loopback-tiny") == FileDigest(len(good_bytes), sha256(good_bytes))

    # The host now serves other bytes: a fresh download is refused, and so is the cached copy (it is replaced).
    variant_cache_path(loopback_variant(url)).unlink()
    server.serve("/model.pyth", Route(checkpoint_bytes(seed=1)))
    with pytest.raises(IntegrityError):
        fetch_variant(loopback_variant(url), lock=lock)
    assert cached_files(cache) == []


def test_a_cached_copy_that_no_longer_matches_its_pin_is_downloaded_again(server, cache, lock, good_bytes):
    variant = loopback_variant(server.serve("/model.pyth", Route(good_bytes)))
    target = variant_cache_path(variant)
    target.parent.mkdir(parents=True)
    target.write_bytes(checkpoint_bytes(seed=1))
    pin(lock, "loopback-tiny", len(good_bytes), sha256(good_bytes))

    assert fetch_variant(variant, lock=lock).read_bytes() == good_bytes
    assert server.requests("/model.pyth") == 1


def test_a_checkpoint_folder_file_is_checked_against_its_pin(server, cache, lock, good_bytes, tmp_path):
    (tmp_path / "tiny.pyth").write_bytes(good_bytes)
    pin(lock, "loopback-tiny", len(good_bytes), "f" * 64)

    with pytest.raises(IntegrityError, match="tiny.pyth"):
        fetch_variant(loopback_variant(server.url("/model.pyth")), checkpoint_dir=tmp_path, lock=lock)


def test_the_repository_lock_file_is_well_formed():
    lock = ChecksumLock(REPO_ROOT / "checksums.json")

    for key in lock.keys():
        digest = lock.pinned(key)
        assert key in VARIANTS or key.startswith("https://"), f"{key}: not a variant name or a URL"
        assert digest.size > 0 and len(digest.sha256) == 64 and int(digest.sha256, 16) >= 0, key


def test_a_corrupt_lock_file_is_named_in_the_error(tmp_path):
    broken = tmp_path / "checksums.json"
    broken.write_text("{not json")

    with pytest.raises(Exception, match="checksums.json: cannot read the checksums lock file"):
        ChecksumLock(broken).pinned("anything")


# --- Google Drive through gdown --------------------------------------------------------------------------------------


@pytest.fixture
def fake_drive(server, monkeypatch):
    """Replace gdown's Drive lookup: ``gdown.download(id=...)`` fetches the loopback path registered for that id,
    through gdown's own download code. Records the arguments of every call."""
    real_download = gdown.download
    calls = []
    files = {}

    def download(*, id, output, quiet, timeout, hasher, progress, **rest):
        calls.append({"id": id, "output": output, "quiet": quiet, "timeout": timeout, **rest})
        if files.get(id) is None:
            raise gdown.exceptions.FileURLRetrievalError(
                "Too many users have viewed or downloaded this file recently. Please try accessing the file again "
                "later."
            )
        return real_download(
            url=server.url(files[id]),
            output=output,
            quiet=quiet,
            timeout=timeout,
            hasher=hasher,
            progress=progress,
            **rest,
        )

    monkeypatch.setattr(gdown, "download", download)
    return files, calls


def test_a_dropbox_web_page_falls_back_to_google_drive(server, cache, lock, good_bytes, fake_drive):
    files, calls = fake_drive
    files[DRIVE_ID] = "/drive/file"
    server.serve("/drive/file", Route(good_bytes))
    dropbox = server.serve("/dropbox/model.pyth", Route(QUOTA_PAGE, content_type="text/html"))
    variant = loopback_variant(dropbox, f"https://drive.google.com/u/1/uc?id={DRIVE_ID}&export=download")

    path = fetch_variant(variant, lock=lock, timeout=7)

    assert path.read_bytes() == good_bytes
    assert calls == [{"id": DRIVE_ID, "output": calls[0]["output"], "quiet": True, "timeout": 7, "use_cookies": False}]
    assert Path(calls[0]["output"]).name == path.name and Path(calls[0]["output"]) != path
    assert (server.requests("/dropbox/model.pyth"), server.requests("/drive/file")) == (1, 1)


def test_google_drive_quota_refusal_is_one_clear_error(server, cache, lock, fake_drive):
    dropbox = server.serve("/dropbox/model.pyth", Route(QUOTA_PAGE, content_type="text/html"))
    variant = loopback_variant(dropbox, f"https://drive.google.com/uc?id={DRIVE_ID}")

    with pytest.raises(DownloadError) as error:
        fetch_variant(variant, lock=lock)

    message = str(error.value)
    assert "\n" not in message and "no download location gave a valid checkpoint" in message
    assert dropbox in message and "Google Drive answered with a web page" in message
    assert cached_files(cache) == []


def test_a_web_page_from_google_drive_is_refused_like_any_other(server, cache, lock, fake_drive):
    files, _ = fake_drive
    files[DRIVE_ID] = "/drive/page"
    server.serve("/drive/page", Route(QUOTA_PAGE, content_type="text/html"))

    with pytest.raises(DownloadError, match="web page"):
        fetch(f"https://drive.google.com/uc?id={DRIVE_ID}", cache / "model.pyth", lock=lock)

    assert cached_files(cache) == []


def test_a_drive_link_without_a_file_id_is_refused(cache, lock):
    with pytest.raises(DownloadError, match="no file id"):
        fetch("https://drive.google.com/drive/my-drive", cache / "model.pyth", lock=lock)


# --- several processes at once, and interrupted downloads ------------------------------------------------------------

FETCH_SCRIPT = """
import dataclasses, pathlib, sys
from timesformer_convert.checksums import ChecksumLock
from timesformer_convert.download import fetch_variant
from timesformer_convert.variants import VARIANTS

variant = dataclasses.replace(
    VARIANTS["timesformer-base-finetuned-k400"], name="loopback-tiny", original_file="tiny.pyth", url=sys.argv[1],
    seed_url=None,
)
pathlib.Path(sys.argv[2]).write_text("started")
print(fetch_variant(variant, lock=ChecksumLock(None), timeout=120))
"""


def start_fetch(url: str, marker: Path, cache: Path) -> Forked:
    return Forked.python(FETCH_SCRIPT, url, marker, env={CACHE_ENV: str(cache)})


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_two_processes_asking_at_once_download_once(server, cache, good_bytes, tmp_path):
    gate = threading.Event()
    url = server.serve("/model.pyth", Route(good_bytes, gate=gate))
    markers = [tmp_path / "first.started", tmp_path / "second.started"]

    workers = [start_fetch(url, marker, cache) for marker in markers]
    # Hold the answer until both processes are inside fetch_variant and the first request has arrived.
    wait_for(lambda: all(m.exists() for m in markers) and server.requests("/model.pyth") == 1, "both workers")
    gate.set()
    results = [worker.wait() for worker in workers]

    assert [result.returncode for result in results] == [0, 0], results
    paths = {result.stdout.strip() for result in results}
    assert paths == {str(cache / "checkpoints" / "loopback-tiny.pyth")}
    assert server.requests("/model.pyth") == 1
    assert Path(paths.pop()).read_bytes() == good_bytes


def test_an_interrupted_download_leaves_nothing_a_later_run_trusts(server, cache, lock, tmp_path):
    # Large enough (about 2.4 MB) that the first megabyte is on disk when the host stalls.
    buffer = io.BytesIO()
    torch.save(synthetic_checkpoint(ModelShape(128, 2, 2, 512, 4, 32, 16, 5, DIVIDED)), buffer)
    good_bytes = buffer.getvalue()
    url = server.serve("/model.pyth", Route(good_bytes, stall_after=2 * len(good_bytes) // 3))
    worker = start_fetch(url, tmp_path / "started", cache)
    partials = lambda: [p for p in (cache / "checkpoints").glob(".*.partial/*") if p.stat().st_size > 0]  # noqa: E731

    wait_for(lambda: (cache / "checkpoints").is_dir() and partials(), "the partial download")
    worker.kill()
    assert worker.wait(60).returncode == -signal.SIGKILL

    target = cache / "checkpoints" / "loopback-tiny.pyth"
    assert not target.exists()
    assert partials(), "the killed process should have left its staging folder"

    server.serve("/model.pyth", Route(good_bytes))
    assert fetch_variant(loopback_variant(url), lock=lock).read_bytes() == good_bytes
    assert cached_files(cache) == ["checkpoints/loopback-tiny.pyth"], "the stale staging folder was not removed"
    assert server.requests("/model.pyth") == 2


def test_a_url_download_is_cached_by_url(server, cache, lock, good_bytes):
    url = server.serve("/some/where/model.pyth", Route(good_bytes))

    path = fetch_url(url, lock=lock)

    assert path == url_cache_path(url) and path.name.endswith("-model.pyth")
    assert fetch_url(url, lock=lock) == path and server.requests("/some/where/model.pyth") == 1
