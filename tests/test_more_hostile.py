"""More inputs a user can get wrong: damaged weights, odd arguments, label files, URLs, the cache folder.

Each refusal is one ``error:`` line naming the file or argument, a non-zero exit, no traceback and no output folder.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import check_oracle_dir
from tests.loopback import LoopbackServer, Route
from tests.running import Forked, Options, run_cli
from tests.test_cli import TINY, assert_one_line_error
from timesformer_convert.cache import CACHE_ENV, cache_dir, clean
from timesformer_convert.config import SPACE_ONLY, ModelShape
from timesformer_convert.convert import convert_state_dict
from timesformer_convert.errors import ConversionError
from timesformer_convert.golden import Comparison, _top5_problems
from timesformer_convert.labels import read_label_file
from timesformer_convert.reference import synthetic_checkpoint, synthetic_state_dict
from timesformer_convert.verify import first_divergent_block

SPACE_TINY = ModelShape(32, 1, 2, 64, None, 32, 16, 5, SPACE_ONLY)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.pyth"
    torch.save(synthetic_checkpoint(TINY), path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def _no_output(tmp_path, name="out"):
    return not any(entry.name == name or entry.name.startswith(f".{name}.") for entry in tmp_path.iterdir())


# --- weights ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_naming_the_key(tmp_path, value):
    state_dict = synthetic_state_dict(TINY)
    state_dict["blocks.1.mlp.fc2.bias"][3] = value
    path = tmp_path / "damaged.pyth"
    torch.save(state_dict, path)

    result = run_cli("convert", path, "--out", tmp_path / "out", "--num-attention-heads", "2")

    assert_one_line_error(result, "damaged.pyth", "blocks.1.mlp.fc2.bias (1 of 32)", "NaN or infinite")
    assert _no_output(tmp_path)


def test_space_only_without_frame_count_is_refused():
    with pytest.raises(ConversionError, match="space-only model has no time embedding.*--num-frames"):
        convert_state_dict(synthetic_state_dict(SPACE_TINY), num_attention_heads=2, source="space.pyth")

    _, config, shape, _ = convert_state_dict(synthetic_state_dict(SPACE_TINY), num_attention_heads=2, num_frames=3)
    assert config.num_frames == shape.num_frames == 3


# --- arguments -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--num-attention-heads", "0"], "--num-attention-heads: expected a positive whole number, got '0'"),
        (["--num-attention-heads", "abc"], "--num-attention-heads: expected a positive whole number, got 'abc'"),
        (["--num-frames", "-1"], "--num-frames: expected a positive whole number, got '-1'"),
        (["--timeout", "nan"], "--timeout: expected a positive number of seconds, got 'nan'"),
        (["--timeout", "inf"], "--timeout: expected at most 86400 seconds, got 'inf'"),
        (["--out", ""], "argument --out: is empty; give a path"),
        (["--labels", " "], "argument --labels: is empty; give a path"),
    ],
    ids=[
        "heads-0",
        "heads-text",
        "frames-negative",
        "timeout-nan",
        "timeout-inf",
        "out-empty",
        "labels-blank",
    ],
)
def test_bad_argument_values_are_one_line_usage_errors(tiny_checkpoint, tmp_path, args, fragment):
    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out", *args)

    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _no_output(tmp_path)


@pytest.mark.parametrize("source", ["", "  "], ids=["empty", "blank"])
def test_a_blank_source_is_a_one_line_usage_error(tmp_path, source):
    result = run_cli("convert", source, "--out", tmp_path / "out")

    assert result.returncode == 2
    assert_one_line_error(result, "argument source: is empty; give a file or a URL")
    assert _no_output(tmp_path)


def test_missing_command_is_a_one_line_usage_error():
    result = run_cli()

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: timesformer-convert: the following arguments are required: COMMAND; see timesformer-convert --help"
    ]


def test_out_under_a_file_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")

    result = run_cli("convert", tiny_checkpoint, "--out", blocker / "sub" / "out")

    assert_one_line_error(result, "cannot be created", "afile is not a folder", "--out")
    assert result.stderr.strip().splitlines()[0].startswith("error:"), "refused before the label warning"


def test_a_checkpoint_name_that_is_not_utf8_is_named_as_the_problem(tiny_checkpoint, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path / "ck") + b"\xff.pyth"))
    odd.write_bytes(tiny_checkpoint.read_bytes())

    result = run_cli("convert", odd, "--out", tmp_path / "out")

    assert_one_line_error(result, "its name is not valid UTF-8", "rename the file")
    assert "corrupt" not in result.stderr
    assert _no_output(tmp_path)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        (b"out\xff", "the path is not valid UTF-8"),
        (b"a" * 240, "the name is too long to be written beside it first (240 bytes, at most 237 here)"),
    ],
    ids=["not-utf8", "too-long"],
)
def test_an_output_name_that_cannot_be_written_is_refused_before_any_work(tiny_checkpoint, tmp_path, name, fragment):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/" + name))
    before = sorted(tmp_path.iterdir())

    result = run_cli("convert", tiny_checkpoint, "--out", out)

    assert_one_line_error(result, fragment, "--out")
    assert result.stderr.strip().splitlines()[0].startswith("error:"), "refused before the label warning"
    assert sorted(tmp_path.iterdir()) == before


def test_a_deleted_working_folder_is_one_line(tiny_checkpoint, tmp_path):
    code = (
        "import os, sys\n"
        "os.mkdir(sys.argv[1]); os.chdir(sys.argv[1]); os.rmdir(sys.argv[1])\n"
        "from timesformer_convert.cli import main\n"
        "sys.exit(main(['convert', sys.argv[2], '--out', sys.argv[3]]))\n"
    )

    result = Forked.python(code, tmp_path / "gone", tiny_checkpoint, tmp_path / "out").wait()

    assert result.returncode == 1
    assert result.stderr == "error: the current folder no longer exists; change to an existing one and run again\n"


# --- label files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"0": "a", "1": null}', "label names must be strings; class 1 is not"),
        ('{"0": "a", "1": {"x": 1}}', "label names must be strings; class 1 is not"),
        ('{"0": "a", "1": "b", "0": "c"}', "gives class 0 twice"),
        ('{"0": "a", "1": "b", "01": "c"}', "gives class 1 twice"),
        ('{"0": "a", " 1 ": "b"}', "keys must be class indices"),
        ('{"0": "a", "-1": "b"}', "keys must be class indices"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ],
    ids=["null-name", "object-name", "repeated-key", "same-index", "padded-key", "negative-key", "deep-nesting"],
)
def test_bad_label_files_are_refused_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "labels.json"
    path.write_text(text)

    with pytest.raises(ConversionError, match=fragment) as error:
        read_label_file(path, 2)

    assert str(path) in str(error.value)


def test_label_directory_is_named_as_one(tiny_checkpoint, tmp_path):
    (tmp_path / "labels").mkdir()

    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out", "--labels", tmp_path / "labels")

    assert_one_line_error(result, "labels: is a directory, not a label file")


def test_label_device_is_named_as_not_a_file(tiny_checkpoint, tmp_path):
    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out", "--labels", os.devnull)

    assert_one_line_error(result, f"{os.devnull}: is not a regular file")


# --- URLs ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("ftp://127.0.0.1/model.pyth", "ftp://127.0.0.1/model.pyth: ftp URLs are not downloaded, only http(s)"),
        ("file:///tmp/model.pyth", "file:///tmp/model.pyth: file URLs are not downloaded, only http(s)"),
        ("http://[::1/model.pyth", "http://[::1/model.pyth: is not a valid URL"),
        ("http://127.0.0.1:99999/model.pyth", "is not a valid URL (Port out of range"),
        ("http://", "http://: is not a valid http(s) URL (no host)"),
    ],
    ids=["ftp", "file", "unclosed-ipv6", "port-out-of-range", "no-host"],
)
def test_unusable_urls_are_refused_in_one_line(cache, tmp_path, source, fragment):
    result = run_cli("convert", source, "--out", tmp_path / "out")

    assert_one_line_error(result, fragment)
    assert "unexpected" not in result.stderr
    assert _no_output(tmp_path)


def test_damaged_cached_download_is_dropped_and_fetched_again(cache, tiny_checkpoint, tmp_path):
    with LoopbackServer() as server:
        url = server.serve("/model.pyth", Route(tiny_checkpoint.read_bytes()))
        first = run_cli("convert", url, "--out", tmp_path / "first", "--num-attention-heads", "2")
        assert first.returncode == 0, first.stderr
        (cached,) = [path for path in (cache / "downloads").iterdir() if path.suffix == ".pyth"]
        with open(cached, "r+b") as handle:
            handle.truncate(1000)

        damaged = run_cli("convert", url, "--out", tmp_path / "second", "--num-attention-heads", "2")
        again = run_cli("convert", url, "--out", tmp_path / "second", "--num-attention-heads", "2")

        assert server.requests("/model.pyth") == 2
    assert_one_line_error(damaged, str(cached), "truncated", "the next run downloads it again")
    assert again.returncode == 0, again.stderr


# --- the cache folder ------------------------------------------------------------------------------------------------


def test_cache_clean_keeps_what_the_converter_did_not_put_there(cache):
    cache_dir()  # creates and tags the folder, as any run does
    for name in ("checkpoints", "downloads", "suite-0123456789ab"):
        (cache / name).mkdir(parents=True)
        (cache / name / "file").write_bytes(b"x" * 10)
    (cache / "Documents").mkdir()
    (cache / "Documents" / "thesis.txt").write_text("precious")
    (cache / "notes.txt").write_text("mine")

    freed = clean(cache)

    assert freed == 30
    assert sorted(entry.name for entry in cache.iterdir()) == ["CACHEDIR.TAG", "Documents", "notes.txt"]
    assert (cache / "Documents" / "thesis.txt").read_text() == "precious"


def test_cache_clean_command_on_a_mistaken_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "project" / "main.py").write_text("print()")
    monkeypatch.setenv(CACHE_ENV, str(home))

    result = run_cli("cache", "clean")

    assert_one_line_error(result, f"{home}: not cleaned", CACHE_ENV)
    assert (home / "project" / "main.py").exists()


def test_cache_variable_naming_a_file_is_one_clear_line(tmp_path, monkeypatch):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(blocker))

    with pytest.raises(ConversionError, match=f"{CACHE_ENV} to a folder"):
        cache_dir()
    result = run_cli("cache", "info")
    assert_one_line_error(result, str(blocker), CACHE_ENV)


# --- comparisons never pass a NaN ------------------------------------------------------------------------------------


def test_golden_comparison_fails_on_nan():
    comparison = Comparison(1e-4, rows=[("logits[0]", 0.5, 0.5), ("logits[1]", 0.25, float("nan"))])

    assert [row[0] for row in comparison.failing] == ["logits[1]"]
    assert not comparison.ok
    assert comparison.max_abs_diff == float("inf")
    assert _top5_problems((0, 1), torch.tensor([float("nan"), 1.0, 0.0]), 1e-4)


def test_first_divergent_block_finds_a_nan():
    ours = [torch.zeros(2), torch.full((2,), float("nan"))]
    theirs = [torch.zeros(2), torch.zeros(2)]

    assert first_divergent_block(ours, theirs, 1e-4) == 0


@pytest.mark.parametrize(("make", "what"), [(lambda path: None, "does not exist"), (Path.touch, "is not a folder")])
def test_oracle_dir_that_is_not_a_folder_is_a_usage_error(tmp_path, make, what):
    path = tmp_path / "oracle"
    make(path)

    with pytest.raises(pytest.UsageError, match=f"--oracle-dir {path}: {what}; give the folder of oracle cases"):
        check_oracle_dir(Options(oracle_dir=str(path)))


def test_label_file_that_is_fine_still_reads(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"0": "abseiling", "1": "air drumming"}))

    assert read_label_file(path, 2) == {0: "abseiling", 1: "air drumming"}


@pytest.mark.parametrize(("names", "counted"), [(["a"], "1 entry, "), (["a", "b"], "2 entries, ")])
def test_cache_info_counts_the_entries(tmp_path, monkeypatch, names, counted):
    root = tmp_path / "cache"
    root.mkdir()
    for name in names:
        (root / name).write_bytes(b"x" * 1024)
    monkeypatch.setenv(CACHE_ENV, str(root))

    result = run_cli("cache", "info")

    assert result.returncode == 0, result.stderr
    assert f"{root} (from {CACHE_ENV}): {counted}" in result.stdout


def test_cache_info_says_how_to_move_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    result = run_cli("cache", "info")

    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'timesformer-convert'} (set {CACHE_ENV} to move it): 0 entries, " in result.stdout
