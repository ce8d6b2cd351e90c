"""``timesformer-convert convert URL`` as a user runs it, against HTTP servers on 127.0.0.1.

A good file converts; a web page, a transfer cut short and a checksum mismatch each exit non-zero with one ``error:``
line and leave neither an output folder nor a cached file. Parallel runs download once.
"""

import hashlib
import json
import threading

import pytest

from tests.loopback import QUOTA_PAGE, Route
from tests.running import Forked, run_cli
from tests.test_cli import assert_one_line_error
from tests.test_download import cached_files, wait_for
from timesformer_convert.cache import CACHE_ENV
from timesformer_convert.checksums import CHECKSUMS_ENV
from timesformer_convert.variants import VARIANTS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache and checksums lock file for the command line, in this process and in the ones it starts."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    monkeypatch.setenv(CHECKSUMS_ENV, str(tmp_path / "checksums.json"))
    return folder


def test_convert_a_served_checkpoint(server, cache, good_bytes, tmp_path):
    url = server.serve("/model.pyth", Route(good_bytes))

    result = run_cli("convert", url, "--out", tmp_path / "out", "--num-attention-heads", "2")

    assert result.returncode == 0, result.stderr
    assert f"converted {url} -> " in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as handle:
        assert handle.metadata()["source_file"] == "model.pyth"
    assert len(cached_files(cache)) == 1
    assert not (tmp_path / "checksums.json").exists()

    again = run_cli("convert", url, "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert server.requests("/model.pyth") == 1


@pytest.mark.parametrize(
    "case",
    ["html-page", "cut-short", "wrong-checksum", "empty"],
)
def test_a_bad_download_is_one_line_and_leaves_nothing(server, cache, good_bytes, tmp_path, case):
    routes = {
        "html-page": (Route(QUOTA_PAGE, content_type="text/html"), ["web page", "quota"]),
        "cut-short": (Route(good_bytes, send=1000), ["cut short", f"1000 bytes of the {len(good_bytes)} announced"]),
        "wrong-checksum": (Route(good_bytes), ["does not match the checksum pinned", "--record-checksums"]),
        "empty": (Route(b""), ["empty file"]),
    }
    route, fragments = routes[case]
    url = server.serve("/model.pyth", route)
    lock = tmp_path / "pins.json"
    lock.write_text(json.dumps({"files": {url: {"size": len(good_bytes), "sha256": "ab" * 32}}}))

    result = run_cli("convert", url, "--out", tmp_path / "out", "--checksums", lock)

    assert_one_line_error(result, url, *fragments)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*")), "a staging folder was left behind"
    assert cached_files(cache) == []


def test_a_slow_host_is_abandoned_after_timeout(server, cache, good_bytes, tmp_path):
    url = server.serve("/model.pyth", Route(good_bytes, stall_after=100))

    result = run_cli("convert", url, "--out", tmp_path / "out", "--timeout", "0.5")

    assert_one_line_error(result, url, "sent no data for 0.5 s")
    assert not (tmp_path / "out").exists() and cached_files(cache) == []


def test_record_checksums_pins_the_download(server, cache, good_bytes, tmp_path):
    url = server.serve("/model.pyth", Route(good_bytes))
    lock = tmp_path / "pins.json"

    result = run_cli("convert", url, "--out", tmp_path / "out", "--checksums", lock, "--record-checksums")

    assert result.returncode == 0, result.stderr
    entry = json.loads(lock.read_text())["files"][url]
    assert entry["sha256"] == hashlib.sha256(good_bytes).hexdigest() and entry["size"] == len(good_bytes)


def test_record_checksums_refuses_a_local_file(cache, good_bytes, tmp_path):
    source = tmp_path / "model.pyth"
    source.write_bytes(good_bytes)

    result = run_cli("convert", source, "--out", tmp_path / "out", "--record-checksums")

    assert_one_line_error(result, str(source), "--record-checksums pins downloads")
    assert not (tmp_path / "out").exists()


def test_convert_without_a_source_or_variant_says_what_to_give(cache, tmp_path):
    result = run_cli("convert", "--out", tmp_path / "out")

    assert_one_line_error(result, "no checkpoint given", "--variant NAME")


def test_existing_output_is_refused_before_downloading(server, cache, good_bytes, tmp_path):
    url = server.serve("/model.pyth", Route(good_bytes))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")

    result = run_cli("convert", url, "--out", tmp_path / "out")

    assert_one_line_error(result, "already exists")
    assert server.requests("/model.pyth") == 0


def test_parallel_cli_runs_download_once(server, cache, good_bytes, tmp_path):
    gate = threading.Event()
    url = server.serve("/model.pyth", Route(good_bytes, gate=gate))
    runs = [Forked.cli(["convert", url, "--out", tmp_path / name]) for name in ("first", "second")]

    wait_for(lambda: server.requests("/model.pyth") >= 1, "the first request")
    gate.set()
    results = [run.wait() for run in runs]

    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    assert server.requests("/model.pyth") == 1
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == (
        tmp_path / "second" / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_convert_a_variant_from_a_checkpoint_folder(artifacts, cache, tmp_path):
    variant = VARIANTS["timesformer-base-finetuned-ssv2"]
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / variant.original_file).symlink_to(artifacts.checkpoint(variant.name))
    lock = tmp_path / "pins.json"

    result = run_cli(
        "convert",
        "--variant",
        variant.name,
        "--checkpoint-dir",
        folder,
        "--out",
        tmp_path / "out",
        "--checksums",
        lock,
        "--record-checksums",
    )

    assert result.returncode == 0, result.stderr
    assert "174 labels" in result.stdout and "8 frames x 224 px" in result.stdout
    assert (
        json.loads(lock.read_text())["files"][variant.name]["size"] == (folder / variant.original_file).stat().st_size
    )
    assert cached_files(cache) == []
