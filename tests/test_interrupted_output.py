"""Nothing lost, nothing trusted by mistake: a conversion that fails or is killed part-way leaves an earlier output
exactly as it was and no folder a later run (or ``from_pretrained``) would take for output.

Output is written to a ``.NAME.partial-*`` folder beside ``--out`` and moved into place only when complete and re-read.
A killed process (SIGKILL) cannot clean up, so its ``.partial-*`` folder stays; later runs name it in a warning and
leave it alone, since it may belong to a conversion still running.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.running import run_cli, run_cli_process
from timesformer_convert import convert as convert_module
from timesformer_convert.config import DIVIDED, ModelShape
from timesformer_convert.convert import OUTPUT_FILES, WEIGHTS_NAME, convert_checkpoint
from timesformer_convert.errors import ConversionError
from timesformer_convert.reference import synthetic_checkpoint

TINY = ModelShape(32, 2, 2, 64, 4, 32, 16, 5, DIVIDED)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}."))


def head_weight(folder: Path) -> torch.Tensor:
    from transformers import TimesformerForVideoClassification

    return TimesformerForVideoClassification.from_pretrained(folder).classifier.weight.detach()


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    """Two checkpoints of the same shape with different weights: the earlier conversion's and the new one's."""
    paths = {}
    for name, seed in (("earlier", 1), ("new", 2)):
        paths[name] = tmp_path / f"{name}.pyth"
        torch.save(synthetic_checkpoint(TINY, seed=seed), paths[name])
    return paths


@pytest.fixture
def earlier_output(tmp_path, checkpoints) -> Path:
    out = tmp_path / "out"
    convert_checkpoint(checkpoints["earlier"], out)
    return out


def expected_head(checkpoint: Path) -> torch.Tensor:
    return torch.load(checkpoint, weights_only=True)["model_state"]["model.head.weight"]


# --- failures in-process: every step of writing ---------------------------------------------------------------------


def _fail_while_writing_weights(monkeypatch):
    real = convert_module.write_safetensors

    def write(path, tensors, metadata=None):
        size = real(path, tensors, metadata)
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(convert_module, "write_safetensors", write)


def _interrupt_while_writing_weights(monkeypatch):
    def write(path, tensors, metadata=None):
        Path(path).write_bytes(b"\0" * 64)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_safetensors", write)


def _fail_writing_config(monkeypatch):
    from transformers import TimesformerConfig

    def to_json_file(self, path, *args, **kwargs):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(TimesformerConfig, "to_json_file", to_json_file)


def _fail_writing_preprocessor_config(monkeypatch):
    def preprocessor_config(image_size):
        raise RuntimeError("failed between the config and the preprocessor config")

    monkeypatch.setattr(convert_module, "preprocessor_config", preprocessor_config)


def _fail_moving_into_place(monkeypatch):
    def replace(staging, out_dir, overwrite):
        raise OSError(18, "Invalid cross-device link", str(out_dir))

    monkeypatch.setattr(convert_module, "_replace", replace)


FAILURES = {
    "disk-full-while-writing-weights": (_fail_while_writing_weights, OSError),
    "ctrl-c-while-writing-weights": (_interrupt_while_writing_weights, KeyboardInterrupt),
    "writing-config": (_fail_writing_config, OSError),
    "writing-preprocessor-config": (_fail_writing_preprocessor_config, RuntimeError),
    "moving-into-place": (_fail_moving_into_place, OSError),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_overwrite_leaves_the_earlier_output_intact(earlier_output, checkpoints, monkeypatch, failure):
    before = snapshot(earlier_output)
    inject, error_type = FAILURES[failure]
    inject(monkeypatch)

    with pytest.raises(error_type):
        convert_checkpoint(checkpoints["new"], earlier_output, overwrite=True)

    assert snapshot(earlier_output) == before
    assert leftovers(earlier_output) == []


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_first_conversion_leaves_nothing(tmp_path, checkpoints, monkeypatch, failure):
    inject, error_type = FAILURES[failure]
    inject(monkeypatch)

    with pytest.raises(error_type):
        convert_checkpoint(checkpoints["new"], tmp_path / "out")

    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path / "out") == []


def test_weights_that_do_not_read_back_are_never_moved_into_place(earlier_output, checkpoints, monkeypatch):
    before = snapshot(earlier_output)
    real = convert_module.write_safetensors

    def write_short(path, tensors, metadata=None):
        size = real(path, tensors, metadata)
        with open(path, "r+b") as handle:
            handle.truncate(size - 4)

    monkeypatch.setattr(convert_module, "write_safetensors", write_short)

    with pytest.raises(ConversionError, match="the written weights cannot be read back"):
        convert_checkpoint(checkpoints["new"], earlier_output, overwrite=True)

    assert snapshot(earlier_output) == before
    assert leftovers(earlier_output) == []


def test_weights_written_with_a_wrong_shape_are_never_moved_into_place(earlier_output, checkpoints, monkeypatch):
    before = snapshot(earlier_output)
    real = convert_module.write_safetensors

    def write_wrong(path, tensors, metadata=None):
        return real(path, {**tensors, "classifier.bias": tensors["classifier.bias"][:2]}, metadata)

    monkeypatch.setattr(convert_module, "write_safetensors", write_wrong)

    with pytest.raises(ConversionError, match="written with the wrong shape: classifier.bias"):
        convert_checkpoint(checkpoints["new"], earlier_output, overwrite=True)

    assert snapshot(earlier_output) == before


def test_without_path_exchange_a_failed_second_rename_puts_the_earlier_output_back(
    earlier_output, checkpoints, monkeypatch
):
    # Where paths cannot be exchanged in one step, the old folder is renamed aside first; if the new one then cannot
    # be renamed into place, the old one goes back.
    before = snapshot(earlier_output)
    monkeypatch.setattr(convert_module, "_exchange", lambda first, second: False)
    real_replace = os.replace
    calls = []

    def replace(source, target):
        calls.append((Path(source).name, Path(target).name))
        if len(calls) == 2:
            raise OSError(5, "Input/output error", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)

    with pytest.raises(OSError, match="Input/output error"):
        convert_checkpoint(checkpoints["new"], earlier_output, overwrite=True)

    assert len(calls) == 3, calls  # aside, into place (failed), back
    assert snapshot(earlier_output) == before
    assert leftovers(earlier_output) == []


def test_paths_are_exchanged_in_one_step(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a").write_text("first")
    (second / "b").write_text("second")

    if not convert_module._exchange(first, second):
        pytest.skip("this file system cannot exchange paths in one step; the two-rename path is tested above")

    assert (first / "b").read_text() == "second" and (second / "a").read_text() == "first"


# --- a process killed part-way (SIGKILL: no clean-up runs) ----------------------------------------------------------

DIE = "import os, signal\ndef die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"

KILLED_AT = {
    # Half the weights are on disk when the process dies.
    "writing-weights": DIE
    + (
        "from timesformer_convert import convert\n"
        "real = convert.write_safetensors\n"
        "def write(path, tensors, metadata=None):\n"
        "    size = real(path, tensors, metadata)\n"
        "    with open(path, 'r+b') as handle:\n"
        "        handle.truncate(size // 2)\n"
        "    die()\n"
        "convert.write_safetensors = write\n"
    ),
    # Everything is written and verified; the process dies just before moving it into place.
    "before-moving-into-place": DIE
    + ("from timesformer_convert import convert\nconvert._replace = lambda staging, out_dir, overwrite: die()\n"),
    # The new folder is in place; the process dies while deleting the old one.
    "deleting-the-old-output": DIE
    + (
        "import shutil\n"
        "from timesformer_convert import convert\n"
        "real = convert._replace\n"
        "def replace(staging, out_dir, overwrite):\n"
        "    shutil.rmtree = lambda *args, **kwargs: die()\n"
        "    real(staging, out_dir, overwrite)\n"
        "convert._replace = replace\n"
    ),
}


@pytest.mark.parametrize("step", ["writing-weights", "before-moving-into-place"])
def test_killed_before_the_move_the_earlier_output_stays_and_the_leftover_is_never_used(
    earlier_output, checkpoints, step
):
    before = snapshot(earlier_output)

    killed = run_cli_process(
        "convert", checkpoints["new"], "--out", earlier_output, "--overwrite", code=KILLED_AT[step]
    )

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert snapshot(earlier_output) == before
    stale = leftovers(earlier_output)
    assert len(stale) == 1 and stale[0].startswith(".out.partial-"), stale
    assert torch.equal(head_weight(earlier_output), expected_head(checkpoints["earlier"]))

    # A later run does not take the leftover for output: without --overwrite the earlier output still blocks it,
    refused = run_cli("convert", checkpoints["new"], "--out", earlier_output)
    assert refused.returncode == 1 and "already exists; pass --overwrite" in refused.stderr
    assert snapshot(earlier_output) == before

    # and with it the conversion replaces the earlier output, naming the leftover, which it leaves alone.
    later = run_cli("convert", checkpoints["new"], "--out", earlier_output, "--overwrite")
    assert later.returncode == 0, later.stderr
    assert f"left beside {earlier_output} by interrupted conversions: {stale[0]}" in later.stderr
    assert torch.equal(head_weight(earlier_output), expected_head(checkpoints["new"]))
    assert leftovers(earlier_output) == stale


def test_killed_while_deleting_the_old_output_the_new_one_is_complete(earlier_output, checkpoints):
    killed = run_cli_process(
        "convert",
        checkpoints["new"],
        "--out",
        earlier_output,
        "--overwrite",
        code=KILLED_AT["deleting-the-old-output"],
    )

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(path.name for path in earlier_output.iterdir()) == sorted(OUTPUT_FILES)
    assert torch.equal(head_weight(earlier_output), expected_head(checkpoints["new"]))


def test_killed_first_conversion_leaves_no_output_and_does_not_block_the_next(tmp_path, checkpoints):
    out = tmp_path / "out"

    killed = run_cli_process("convert", checkpoints["new"], "--out", out, code=KILLED_AT["writing-weights"])

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    stale = leftovers(out)
    assert len(stale) == 1
    partial = out.parent / stale[0] / WEIGHTS_NAME
    assert partial.stat().st_size < (tmp_path / "new.pyth").stat().st_size, "the leftover should hold half a file"

    later = run_cli("convert", checkpoints["new"], "--out", out)

    assert later.returncode == 0, later.stderr
    assert stale[0] in later.stderr
    assert torch.equal(head_weight(out), expected_head(checkpoints["new"]))


# --- an existing output is replaced only with --overwrite, and only when it is an output ----------------------------


def test_an_earlier_output_is_kept_without_overwrite(earlier_output, checkpoints):
    before = snapshot(earlier_output)

    result = run_cli("convert", checkpoints["new"], "--out", earlier_output)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {earlier_output}: already exists; pass --overwrite to replace it, or choose another --out"
    )
    assert snapshot(earlier_output) == before


def _file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    return target, "is a file, not an output folder"


def _symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real)
    return tmp_path / "link", "is a symbolic link, not an output folder"


def _folder_with_subfolders(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "keep.txt").write_text("mine")
    return project, "holds folders (src), which a conversion never writes"


def _folder_holding_the_checkpoint(tmp_path):
    return tmp_path, "holds the checkpoint"


def _folder_with_other_files(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text("{}")
    (project / "notes.txt").write_text("mine")
    return project, "holds files a conversion never writes (notes.txt)"


NOT_OUTPUTS = {
    "a-file": _file,
    "a-folder-with-other-files": _folder_with_other_files,
    "a-symlink": _symlink,
    "a-folder-with-subfolders": _folder_with_subfolders,
    "the-folder-holding-the-checkpoint": _folder_holding_the_checkpoint,
}


@pytest.mark.parametrize("case", sorted(NOT_OUTPUTS))
def test_overwrite_refuses_what_is_not_an_earlier_output(tmp_path, checkpoints, case):
    target, fragment = NOT_OUTPUTS[case](tmp_path)
    before = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))

    result = run_cli("convert", checkpoints["new"], "--out", target, "--overwrite")

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}: {fragment}"), result.stderr
    assert "--overwrite replaces only an earlier output folder" in lines[0]
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == before


def test_overwrite_refuses_the_working_folder(tmp_path, checkpoints):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")

    result = run_cli("convert", checkpoints["new"], "--out", ".", "--overwrite", cwd=work)

    assert result.returncode == 1
    assert "holds the current folder" in result.stderr
    assert sorted(path.name for path in work.iterdir()) == ["keep.txt"]


def test_an_empty_folder_made_beforehand_takes_the_output_without_overwrite(tmp_path, checkpoints):
    out = tmp_path / "out"
    out.mkdir()

    result = run_cli("convert", checkpoints["new"], "--out", out)

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == sorted(OUTPUT_FILES)
    assert torch.equal(head_weight(out), expected_head(checkpoints["new"]))


@pytest.mark.parametrize("made_beforehand", [False, True], ids=["missing", "empty"])
def test_an_output_that_appears_while_converting_is_kept_without_overwrite(
    tmp_path, checkpoints, monkeypatch, made_beforehand
):
    out = tmp_path / "out"
    if made_beforehand:
        out.mkdir()
    real_check = convert_module._check_written

    def another_conversion_finishes_meanwhile(folder, tensors):
        real_check(folder, tensors)
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("theirs")

    monkeypatch.setattr(convert_module, "_check_written", another_conversion_finishes_meanwhile)

    with pytest.raises(FileExistsError, match="was created by another conversion while this one ran"):
        convert_checkpoint(checkpoints["new"], out)

    assert snapshot(out) == {"config.json": b"theirs"}
    assert leftovers(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchanged", "renamed-aside"])
def test_a_file_added_to_the_output_while_converting_is_never_deleted(
    earlier_output, checkpoints, monkeypatch, exchange
):
    if not exchange:
        monkeypatch.setattr(convert_module, "_exchange", lambda first, second: False)
    before = snapshot(earlier_output)
    real_check = convert_module._check_written

    def the_user_saves_notes_meanwhile(folder, tensors):
        real_check(folder, tensors)
        (earlier_output / "notes.txt").write_text("mine")

    monkeypatch.setattr(convert_module, "_check_written", the_user_saves_notes_meanwhile)

    with pytest.raises(ConversionError, match="notes.txt appeared in it while this conversion ran"):
        convert_checkpoint(checkpoints["new"], earlier_output, overwrite=True)

    assert snapshot(earlier_output) == {**before, "notes.txt": b"mine"}
    assert leftovers(earlier_output) == []


def test_overwrite_refuses_the_folder_a_declared_variant_is_read_from(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "TimeSformer_divST_8x32_224_K400.pyth").write_bytes(b"the only copy")
    before = snapshot(folder)

    result = run_cli(
        "convert",
        "--variant",
        "timesformer-base-finetuned-k400",
        "--checkpoint-dir",
        folder,
        "--out",
        folder,
        "--overwrite",
    )

    assert result.returncode == 1
    assert "--overwrite replaces only an earlier output folder" in result.stderr
    assert snapshot(folder) == before


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, checkpoints, monkeypatch):
    monkeypatch.setattr(convert_module.os, "access", lambda path, mode: Path(path) != tmp_path)

    result = run_cli("convert", tmp_path / "missing.pyth", "--out", tmp_path / "new" / "out")

    assert result.returncode == 1
    assert (
        result.stderr == f"error: {tmp_path / 'new' / 'out'}: cannot be written, {tmp_path} is not writable; "
        "choose another --out\n"
    )
    assert not (tmp_path / "new").exists()


# --- SIGINT and SIGTERM in the installed command --------------------------------------------------------------------

SIGNAL_AT = {
    # Part of the weights are on disk.
    "writing-weights": (
        "import os, signal\n"
        "from timesformer_convert import convert\n"
        "real = convert.write_safetensors\n"
        "def write(path, tensors, metadata=None):\n"
        "    real(path, tensors, metadata)\n"
        "    os.kill(os.getpid(), signal.{name})\n"
        "convert.write_safetensors = write\n"
    ),
    # The new output has just been moved into place; the old one waits to be deleted.
    "moving-into-place": (
        "import os, signal\n"
        "from timesformer_convert import convert\n"
        "real = convert._replace\n"
        "def replace(staging, out_dir, overwrite):\n"
        "    real(staging, out_dir, overwrite)\n"
        "    os.kill(os.getpid(), signal.{name})\n"
        "convert._replace = replace\n"
    ),
}


def _overwrite_signalled(out: Path, checkpoint: Path, step: str, name: str):
    """``convert CHECKPOINT --out OUT --overwrite`` in a process of its own that sends itself signal ``name``."""
    return run_cli_process("convert", checkpoint, "--out", out, "--overwrite", code=SIGNAL_AT[step].format(name=name))


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_while_writing_leaves_the_earlier_output_and_no_leftover(earlier_output, checkpoints, name):
    before = snapshot(earlier_output)

    result = _overwrite_signalled(earlier_output, checkpoints["new"], "writing-weights", name)

    assert result.returncode == 128 + getattr(signal, name), result.stderr
    assert result.stderr.splitlines()[-1] == "error: interrupted; no output was written"
    assert snapshot(earlier_output) == before
    assert leftovers(earlier_output) == []


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_output_is_moved_into_place_waits_until_it_is_complete(earlier_output, checkpoints, name):
    result = _overwrite_signalled(earlier_output, checkpoints["new"], "moving-into-place", name)

    assert result.returncode == 128 + getattr(signal, name), result.stderr
    assert (
        result.stderr.splitlines()[-1]
        == f"error: interrupted after {earlier_output} was written; the output there is complete"
    )
    assert sorted(path.name for path in earlier_output.iterdir()) == sorted(OUTPUT_FILES)
    assert torch.equal(head_weight(earlier_output), expected_head(checkpoints["new"]))
    assert leftovers(earlier_output) == []
