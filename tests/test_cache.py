"""The cache folder: where it is, how it is marked as the converter's, and what ``cache info`` and ``cache clean`` do.

``clean`` deletes only in a folder it can tell is its cache: one holding the ``CACHEDIR.TAG`` the converter writes
when it creates the folder, or the default location. Every refusal is one ``error:`` line and deletes nothing.
"""

import errno
import os
from pathlib import Path

import pytest

from tests.running import run_cli
from tests.test_cli import assert_one_line_error
from timesformer_convert.cache import CACHE_ENV, cache_dir, clean, usage
from timesformer_convert.errors import ConversionError

# The Cache Directory Tagging standard fixes both the name and the first line.
CACHE_TAG = "CACHEDIR.TAG"
SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder named by the variable, created and tagged by the converter."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return cache_dir()


def fill(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


# --- which folder ----------------------------------------------------------------------------------------------------


def test_a_folder_the_converter_creates_is_tagged(cache):
    lines = (cache / CACHE_TAG).read_text().splitlines()

    assert lines[0] == SIGNATURE
    assert lines[1].startswith("#") and "timesformer-convert" in lines[1]
    # Readable like any file the user makes, not tempfile's 0600.
    umask = os.umask(0o022)
    os.umask(umask)
    assert (cache / CACHE_TAG).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_folder_that_already_holds_files_is_not_tagged(tmp_path, monkeypatch):
    fill(tmp_path / "project", {"main.py": b"print()"})
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "project"))

    assert cache_dir() == tmp_path / "project"
    assert not (tmp_path / "project" / CACHE_TAG).exists()


@pytest.mark.parametrize("value", ["~/cache", "$CACHE_PARENT/cache", "${CACHE_PARENT}/cache"])
def test_home_and_variables_in_the_cache_variable_are_expanded(tmp_path, monkeypatch, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CACHE_PARENT", str(tmp_path))
    monkeypatch.setenv(CACHE_ENV, value)

    result = run_cli("cache", "info", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{tmp_path / 'cache'} (from {CACHE_ENV}): 0 entries, ")
    assert cache_dir() == tmp_path / "cache"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]


@pytest.mark.parametrize("below", ["", "cache"], ids=["the-folder", "a-parent"])
def test_a_file_in_place_of_the_cache_folder_is_named_as_a_file(tmp_path, monkeypatch, below):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker / below))

    with pytest.raises(ConversionError, match=f"^{blocker}: is a file, not a folder") as refused:
        cache_dir()
    assert "File exists" not in str(refused.value)
    for action in ("info", "clean"):
        assert_one_line_error(run_cli("cache", action), f"{blocker}: is a file, not a folder", CACHE_ENV)


def test_cache_info_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "not-yet"))

    result = run_cli("cache", "info")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{tmp_path / 'not-yet'} (from {CACHE_ENV}): 0 entries, 0.0 MiB (the folder does not exist yet)"
    )
    assert not (tmp_path / "not-yet").exists()


def test_cache_info_says_when_clean_would_refuse_the_folder(tmp_path, monkeypatch):
    fill(tmp_path / "project", {"main.py": b"print()"})
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "project"))

    result = run_cli("cache", "info")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(
        f"; `cache clean` will not empty it: it holds no {CACHE_TAG} of timesformer-convert, so it may not be a cache"
    )


def test_a_tag_that_links_to_another_folders_tag_does_not_count(cache, tmp_path, monkeypatch):
    other = tmp_path / "other"
    fill(other, {"real/userfile": b"mine"})
    (other / CACHE_TAG).symlink_to(cache / CACHE_TAG)
    monkeypatch.setenv(CACHE_ENV, str(other))

    result = run_cli("cache", "clean")

    assert_one_line_error(result, "other: not cleaned", CACHE_TAG)
    assert (other / "real" / "userfile").read_bytes() == b"mine"


def test_a_blank_cache_variable_is_one_clear_line(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "  ")

    result = run_cli("cache", "info")

    assert_one_line_error(result, f"${CACHE_ENV} is blank; unset it, or set it to a folder")


def test_cleaning_an_empty_folder_has_nothing_to_refuse(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))

    result = run_cli("cache", "clean")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("removed 0.0 MiB")


def test_the_tag_is_not_counted_as_an_entry(cache):
    fill(cache, {"downloads/a.pyth": b"x" * 10})

    assert usage(cache)[0] == 1


# --- clean -----------------------------------------------------------------------------------------------------------


def test_clean_refuses_a_folder_without_the_tag(tmp_path, monkeypatch):
    project = tmp_path / "myproject"
    fill(project, {"checkpoints/run42.pt": b"weights", "real/photos.txt": b"photos"})
    monkeypatch.setenv(CACHE_ENV, "myproject")

    result = run_cli("cache", "clean", cwd=tmp_path)

    assert_one_line_error(result, "myproject: not cleaned", CACHE_TAG, CACHE_ENV)
    assert (project / "checkpoints" / "run42.pt").read_bytes() == b"weights"
    assert (project / "real" / "photos.txt").read_bytes() == b"photos"


def test_clean_keeps_the_tag_and_does_not_call_it_foreign(cache):
    fill(cache, {"checkpoints/a.pyth": b"x" * 10, "suite-0123456789ab/b": b"x" * 20})

    result = run_cli("cache", "clean")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"removed 0.0 MiB from {cache}"
    assert CACHE_TAG not in result.stderr
    assert [path.name for path in cache.iterdir()] == [CACHE_TAG]
    assert clean(cache) == 0


def test_clean_empties_the_default_folder_that_older_versions_made_without_a_tag(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    default = tmp_path / "timesformer-convert"
    fill(default, {"checkpoints/a.pyth": b"x" * 10})

    assert clean() == 10
    assert list(default.iterdir()) == []


def test_clean_reports_what_it_could_not_remove(cache, monkeypatch):
    fill(cache, {"downloads/stuck.pyth": b"x" * 10, "checkpoints/a.pyth": b"x" * 20})
    unlink = os.unlink

    def refuse_stuck(path, *args, **kwargs):
        if os.fspath(path).endswith("stuck.pyth"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_stuck)
    result = run_cli("cache", "clean")

    assert_one_line_error(result, f"could not remove {cache / 'downloads'}", "stuck.pyth: Permission denied")
    assert (cache / "downloads" / "stuck.pyth").exists()
    assert not (cache / "checkpoints").exists()
    with pytest.raises(ConversionError, match=r"removed 0\.0 MiB, but could not remove"):
        clean(cache)


def test_clean_counts_a_link_as_the_link_not_its_target(cache, tmp_path):
    target = tmp_path / "elsewhere.pyth"
    with open(target, "wb") as file:
        file.truncate(64 * 2**20)
    (cache / "downloads").mkdir()
    (cache / "downloads" / "link.pyth").symlink_to(target)

    freed = clean(cache)

    assert freed < 2**10
    assert target.stat().st_size == 64 * 2**20
