"""The command line: its exit status, stdout and the one-line errors on stderr.

Most runs call the entry point in this process (tests/running.py); the self-check runs in a process of its own, and a
conversion and the installed script in a new interpreter, as a user runs them.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.running import run_cli, run_cli_interpreter, run_cli_process
from timesformer_convert.config import DIVIDED, SPACE_ONLY, ModelShape
from timesformer_convert.reference import synthetic_checkpoint

TINY = ModelShape(32, 2, 2, 64, 4, 32, 16, 5, DIVIDED)


def assert_one_line_error(result, *fragments):
    __tracebackhide__ = True
    assert result.returncode != 0, f"expected failure, got exit 0\n{result.stdout}"
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.pyth"
    torch.save(synthetic_checkpoint(TINY), path)
    return path


def test_list_json_has_the_registry_fields():
    script = shutil.which("timesformer-convert", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip(f"no timesformer-convert script beside {sys.executable}; 'pip install -e .' installs it")
    result = subprocess.run([script, "list", "--json"], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    variants = json.loads(result.stdout)
    assert len(variants) == 9
    for variant in variants:
        assert {"name", "num_frames", "image_size", "num_labels", "attention_type", "url"} <= set(variant)
    by_name = {variant["name"]: variant for variant in variants}
    assert by_name["timesformer-large-finetuned-ssv2"]["num_frames"] == 64
    assert by_name["timesformer-hr-finetuned-k600"]["image_size"] == 448


def test_rules_json_lists_every_rule():
    from timesformer_convert.rules import RULES

    result = run_cli("rules", "--json")

    assert [row["name"] for row in json.loads(result.stdout)] == [rule.name for rule in RULES]


def test_convert_writes_a_loadable_folder(tiny_checkpoint, tmp_path):
    from transformers import TimesformerForVideoClassification

    result = run_cli_interpreter("convert", tiny_checkpoint, "--out", tmp_path / "out", "--num-attention-heads", "2")

    assert result.returncode == 0, result.stderr
    stray = [line for line in result.stderr.splitlines() if not line.startswith("WARNING: ")]
    assert stray == [], f"stderr holds more than the converter's warnings:\n{result.stderr}"
    assert "converted" in result.stdout and "divided_space_time" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    model = TimesformerForVideoClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_attention_heads == 2 and model.config.num_frames == 4
    assert model.config.architectures == ["TimesformerForVideoClassification"]
    # The folder is readable as any folder the user makes (not tempfile's 0700).
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask


def test_convert_without_labels_warns_how_to_supply_them(tiny_checkpoint, tmp_path):
    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out")

    assert result.returncode == 0, result.stderr
    assert "--labels FILE" in result.stderr


def test_convert_warns_about_heads_it_had_to_assume_and_refuses_to_guess_frames(tmp_path):
    checkpoint = tmp_path / "space_only.pyth"
    torch.save(synthetic_checkpoint(ModelShape(32, 2, 2, 64, None, 32, 16, 5, SPACE_ONLY)), checkpoint)

    no_frames = run_cli("convert", checkpoint, "--out", tmp_path / "no-frames")
    guessed = run_cli("convert", checkpoint, "--out", tmp_path / "guessed", "--num-frames", "4")
    given = run_cli(
        "convert", checkpoint, "--out", tmp_path / "given", "--num-frames", "4", "--num-attention-heads", "2"
    )

    assert_one_line_error(no_frames, "pass --num-frames N")
    assert not (tmp_path / "no-frames").exists()
    assert guessed.returncode == 0 and given.returncode == 0, guessed.stderr + given.stderr
    assert "hidden size 32 is not a multiple of 64: assumed 1 attention head(s)" in guessed.stderr
    assert "--num-attention-heads" not in given.stderr


def test_convert_with_a_label_file(tiny_checkpoint, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(i): f"class {i}" for i in range(5)}))

    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out", "--labels", labels)

    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"]["3"] == "class 3"


@pytest.mark.parametrize(
    "indices, fragment",
    [
        pytest.param([0], "holds 1 labels, but the checkpoint's head has 5 classes", id="too-few"),
        pytest.param([0, 1, 2, 3, 5], "class indices must run from 0 to 4; missing 4, out of range 5", id="a-gap"),
    ],
)
def test_label_file_that_does_not_fit_the_head_is_refused(tiny_checkpoint, tmp_path, indices, fragment):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(i): f"class {i}" for i in indices}))

    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out", "--labels", labels)

    assert_one_line_error(result, str(labels), fragment)
    assert not (tmp_path / "out").exists()


def test_declared_variant_mismatch_exits_with_one_line(tiny_checkpoint, tmp_path):
    result = run_cli(
        "convert", tiny_checkpoint, "--out", tmp_path / "out", "--variant", "timesformer-hr-finetuned-k400"
    )

    assert_one_line_error(result, "num_frames: checkpoint 4, timesformer-hr-finetuned-k400 declares 16")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*")), "a staging folder was left behind"


def test_missing_source_exits_with_one_line(tmp_path):
    result = run_cli("convert", tmp_path / "nope.pyth", "--out", tmp_path / "out")

    assert_one_line_error(result, "nope.pyth", "no such file")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out")

    assert_one_line_error(result, "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_an_earlier_output(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("old")

    result = run_cli("convert", tiny_checkpoint, "--out", tmp_path / "out", "--overwrite")

    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "timesformer"
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", [["list"], ["list", "--json"], ["rules", "--json"]])
def test_a_reader_that_stops_early_ends_the_command_quietly(command):
    # As in `timesformer-convert list | head -1`: the pipe's reader is gone before the command writes.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "timesformer_convert.cli", *command],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)

    assert (result.returncode, result.stderr) == (141, "")


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "convert", tmp_path / "nope.pyth", "--out", tmp_path / "out")

    assert result.returncode != 0
    assert "Traceback" in result.stderr


@pytest.mark.parametrize("name", ["timesformer-base-finetuned-ssv2", "timesformer-base-finetuned-ssv2-1blocks"])
def test_selfcheck_refuses_a_work_dir_holding_files_it_did_not_write(tmp_path, name):
    work = tmp_path / "work"
    (work / name).mkdir(parents=True)
    (work / name / "notes.txt").write_text("mine")

    result = run_cli("selfcheck", "--variant", "timesformer-base-finetuned-ssv2", "--work-dir", work)

    assert_one_line_error(result, f"{work / name}: holds files selfcheck did not write (notes.txt)", "--work-dir")
    assert "--overwrite" not in result.stderr
    assert sorted(path.name for path in work.rglob("*")) == sorted([name, "notes.txt"])


@pytest.mark.slow
def test_selfcheck_prints_a_row_per_variant_and_keeps_its_work_dir(tmp_path):
    variant = "timesformer-base-finetuned-ssv2"
    work = tmp_path / "work"
    result = run_cli_process("selfcheck", "--variant", variant, "--json", tmp_path / "rows.json", "--work-dir", work)

    assert result.returncode == 0, result.stderr
    assert variant in result.stdout and "complete" in result.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[0]["ok"] and rows[0]["tensors"] == 249 and rows[0]["roundtrip"] == "identical"
    # --work-dir keeps what it built: the synthetic checkpoints and their conversions, to try by hand.
    assert {path.name for path in work.iterdir()} == {
        f"{variant}.pyth",
        variant,
        f"{variant}-1blocks.pyth",
        f"{variant}-1blocks",
    }
    assert (work / variant / "model.safetensors").is_file()
