"""Hostile and broken checkpoints: each is refused with one line naming the file and what is wrong, runs nothing,
and leaves no output behind; or, where the input is only unusual, it converts to exactly the expected tensors.

Every input is built here, small. The command line runs in this process (tests/running.py); one refusal runs in a
fresh process too, where nothing but the converter could print.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import pickle
import random
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.running import run_cli, run_cli_process
from timesformer_convert import checkpoint as checkpoint_module
from timesformer_convert import convert as convert_module
from timesformer_convert.checkpoint import load_checkpoint, read_state_dict
from timesformer_convert.config import DIVIDED, JOINT, ModelShape
from timesformer_convert.convert import WEIGHTS_NAME, convert_checkpoint, convert_state_dict
from timesformer_convert.errors import CheckpointError, ConversionError, CoverageError, RuleError, VariantMismatchError
from timesformer_convert.reference import original_layout, synthetic_checkpoint, synthetic_state_dict
from timesformer_convert.variants import get_variant
from timesformer_convert.verify import compare_forward, native_clip

SRC = Path(convert_module.__file__).resolve().parent
TINY = ModelShape(32, 2, 2, 64, 4, 32, 16, 5, DIVIDED)
# Full-size shapes, built as zero-stride views of one number: the checks that read shapes see a real variant,
# while the file holds a few bytes of tensor data.
HR_WITH_8_FRAMES = ModelShape(768, 12, 12, 3072, 8, 448, 16, 400, DIVIDED)
BASE_WITH_600_CLASSES = ModelShape(768, 12, 12, 3072, 8, 224, 16, 600, DIVIDED)
BASE_WITHOUT_TEMPORAL_BLOCKS = ModelShape(768, 12, 12, 3072, 8, 224, 16, 400, JOINT)


def assert_refused(result, *fragments):
    """Exit status 1 and exactly one line on stderr, ``error: ...`` holding every fragment; no traceback."""
    __tracebackhide__ = True
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, f"exit {result.returncode}, expected 1\nstdout: {result.stdout}\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert result.stdout == "", result.stdout


def assert_nothing_written(out: Path):
    __tracebackhide__ = True
    assert not out.exists(), f"{out} was written"
    leftovers = sorted(path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}."))
    assert leftovers == [], f"staging folders left behind: {leftovers}"


def prefixed(state_dict, prefix="model."):
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def expanded_state_dict(shape: ModelShape) -> dict[str, torch.Tensor]:
    one = torch.full((), 0.5)
    return {f"model.{key}": one.expand(size) for key, size in original_layout(shape).items()}


# --- 1. a pickle that would run code --------------------------------------------------------------------------------


class RunsCommand:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    """Unpickling this object runs Python code that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


PAYLOADS = {"os.system": RunsCommand, "exec": RunsPython}


def _write_hostile(path: Path, payload, how: str) -> None:
    hostile = {"model_state": prefixed(synthetic_state_dict(TINY)), "cfg": payload}
    if how == "torch-zip":
        torch.save(hostile, path)
    elif how == "torch-legacy":
        torch.save(hostile, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(hostile, protocol=int(how.removeprefix("pickle-protocol-"))))


HOSTILE_FORMATS = ["torch-zip", "torch-legacy", "pickle-protocol-0", "pickle-protocol-2", "pickle-protocol-4"]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_the_hostile_pickle_does_run_code_when_unpickled_unsafely(tmp_path, payload):
    # The control: the same payload as below does create its marker when unpickled the way the reference script
    # loaded checkpoints, so the marker's absence in the other tests means something.
    marker = tmp_path / "ran"
    data = pickle.dumps({"cfg": PAYLOADS[payload](marker)})

    pickle.loads(data)

    assert marker.exists()


@pytest.mark.parametrize("how", HOSTILE_FORMATS)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_pickle_that_runs_code_is_refused_unrun(tmp_path, payload, how):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pyth"
    _write_hostile(path, PAYLOADS[payload](marker), how)

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)

    assert not marker.exists(), "the checkpoint's code ran"
    message = str(error.value)
    assert message.startswith(f"{path}: is not a plain weights file")
    assert "it was not loaded" in message
    assert (f"{os.system.__module__}.system" if payload == "os.system" else "builtins.exec") in message


@pytest.mark.parametrize("how", ["torch-zip", "torch-legacy", "pickle-protocol-0"])
def test_cli_refuses_a_pickle_that_runs_code_unrun(tmp_path, how):
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pyth"
    _write_hostile(path, RunsCommand(marker), how)

    result = run_cli("convert", path, "--out", tmp_path / "out")

    assert not marker.exists(), "the checkpoint's code ran"
    assert_refused(result, str(path), "is not a plain weights file", f"{os.system.__module__}.system", "not loaded")
    assert_nothing_written(tmp_path / "out")


def test_every_torch_load_in_the_package_is_weights_only():
    # No code path may unpickle without weights_only=True: no fallback, no option, no other unpickler.
    loads, unpicklers = [], []
    for source in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name == "torch.load":
                    loads.append((source.name, ast.unparse(node)))
                elif name.startswith(("pickle.", "dill.", "joblib.")) or name.endswith("Unpickler"):
                    unpicklers.append((source.name, ast.unparse(node)))

    assert loads, "no torch.load found: the check looks in the wrong place"
    for name, call in loads:
        assert "weights_only=True" in call, f"{name}: {call}"
    assert unpicklers == []


def test_no_option_loads_unsafely():
    result = run_cli("convert", "--help")

    assert result.returncode == 0
    for word in ("unsafe", "trust", "weights-only", "weights_only", "pickle"):
        assert word not in result.stdout.lower(), f"convert offers an option about {word!r}"


# --- 2. not a checkpoint at all -------------------------------------------------------------------------------------


def _good_checkpoint(path: Path, legacy: bool = False) -> Path:
    torch.save(synthetic_checkpoint(TINY), path, _use_new_zipfile_serialization=not legacy)
    return path


def _cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _tensor_larger_than_its_data(path: Path) -> Path:
    # A zip checkpoint whose pickle claims 2**20 elements for a storage that holds 4.
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(name for name in entries if name.endswith("data.pkl"))
    assert b"K\x04\x85" in entries[name]
    entries[name] = entries[name].replace(b"K\x04\x85", b"J\x00\x00\x10\x00\x85")
    with zipfile.ZipFile(path, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return path


def _written(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _rezipped(path: Path, compression: int) -> dict[str, bytes]:
    """Rewrite the zip checkpoint at ``path`` entry by entry with ``compression``; return the entries."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return entries


def _flipped_byte_in_weights(path: Path) -> Path:
    # Same length, intact zip structure, one byte of one tensor changed: only the record's CRC-32 tells.
    torch.save({"model_state": prefixed(synthetic_state_dict(TINY))}, path)
    data = bytearray(path.read_bytes())
    data[data.index(synthetic_state_dict(TINY)["blocks.1.mlp.fc1.weight"].numpy().tobytes()[:64]) + 9] ^= 0x40
    path.write_bytes(bytes(data))
    return path


def _zip_of_text(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not weights")
    return path


NOT_CHECKPOINTS = {
    "empty": (lambda p: _written(p, b""), ["the file is empty (0 bytes)"]),
    "text": (lambda p: _written(p, "model weights will be uploaded soon\n"), ["is a text file"]),
    "html-page": (
        lambda p: _written(p, "<!DOCTYPE html><html><body>Quota exceeded</body></html>"),
        ["is an HTML or XML page", "not a checkpoint"],
    ),
    "json": (lambda p: _written(p, '{"error": "not found"}'), ["is a JSON document"]),
    "random-bytes": (
        lambda p: _written(p, random.Random(0).randbytes(4096)),
        ["is not a PyTorch checkpoint", "neither torch's zip signature nor its legacy pickle header"],
    ),
    "truncated-zip": (
        lambda p: _cut_in_half(_good_checkpoint(p)),
        ["is a zip archive that is truncated or corrupt", "the file was cut off"],
    ),
    "truncated-legacy": (
        lambda p: _cut_in_half(_good_checkpoint(p, legacy=True)),
        ["is a legacy torch checkpoint that is truncated or corrupt"],
    ),
    "zip-of-text": (lambda p: _zip_of_text(p), ["is a zip archive but not a PyTorch checkpoint"]),
    "flipped-byte-in-weights": (
        _flipped_byte_in_weights,
        ["is a torch zip archive whose record checkpoint/data/", "is damaged (its CRC-32 does not match)"],
    ),
    "bare-pickle-of-tensors": (
        lambda p: _written(p, pickle.dumps(synthetic_state_dict(TINY))),
        ["is a bare Python pickle, not a checkpoint in torch.save's format"],
    ),
    "tensor-larger-than-its-data": (
        _tensor_larger_than_its_data,
        ["is a torch zip archive that is truncated or corrupt"],
    ),
    "directory": (lambda p: p.mkdir() or p, ["is a directory, not a checkpoint file"]),
    "missing": (lambda p: p, ["no such file"]),
}


@pytest.mark.parametrize("case", sorted(NOT_CHECKPOINTS))
def test_not_a_checkpoint_is_one_line_naming_the_path(tmp_path, case):
    make, fragments = NOT_CHECKPOINTS[case]
    path = make(tmp_path / "checkpoint.pyth")

    result = run_cli("convert", path, "--out", tmp_path / "out")

    assert_refused(result, f"error: {path}: ", *fragments)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("case", sorted(NOT_CHECKPOINTS))
def test_not_a_checkpoint_raises_checkpoint_error(tmp_path, case):
    make, fragments = NOT_CHECKPOINTS[case]
    path = make(tmp_path / "checkpoint.pyth")

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)

    assert str(error.value).startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in str(error.value)


def test_a_device_is_not_a_checkpoint(tmp_path):
    result = run_cli("convert", os.devnull, "--out", tmp_path / "out")

    assert_refused(result, os.devnull, "is not a regular file")


def test_debug_shows_the_traceback_of_a_refusal(tmp_path):
    path = _cut_in_half(_good_checkpoint(tmp_path / "checkpoint.pyth"))

    result = run_cli("convert", path, "--out", tmp_path / "out", "--debug")

    assert result.returncode == 1
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {path}: is a zip archive that is truncated")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode; run as another user to test it")
def test_unreadable_file_is_one_line(tmp_path):
    path = _good_checkpoint(tmp_path / "checkpoint.pyth")
    path.chmod(0)

    result = run_cli("convert", path, "--out", tmp_path / "out")

    assert_refused(result, str(path), "permission denied", "chmod u+r")


def _deny_reading(path: Path):
    """Code for a fresh process that makes opening ``path`` fail the way mode 000 does."""
    return (
        "import pathlib\n"
        f"denied = {str(path)!r}\n"
        "real = pathlib.Path.open\n"
        "def open_(self, *args, **kwargs):\n"
        "    if str(self) == denied:\n"
        "        raise PermissionError(13, 'Permission denied', denied)\n"
        "    return real(self, *args, **kwargs)\n"
        "pathlib.Path.open = open_\n"
    )


def test_unreadable_file_is_one_line_even_as_root(tmp_path):
    # Simulated: opening the file raises PermissionError, as it does for a non-root user on a mode-000 file.
    path = _good_checkpoint(tmp_path / "checkpoint.pyth")

    result = run_cli_process("convert", path, "--out", tmp_path / "out", code=_deny_reading(path))

    assert_refused(result, str(path), "permission denied", "chmod u+r")
    assert_nothing_written(tmp_path / "out")


def test_unreadable_file_raises_checkpoint_error(tmp_path, monkeypatch):
    path = _good_checkpoint(tmp_path / "checkpoint.pyth")
    real_open = Path.open

    def deny(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)

    with pytest.raises(CheckpointError, match="permission denied; make the file readable") as error:
        read_state_dict(path)
    assert isinstance(error.value.__cause__, PermissionError)


@functools.cache
def _small_checkpoint_bytes(legacy: bool) -> bytes:
    buffer = io.BytesIO()
    checkpoint = {"model_state": {"model.w": torch.arange(4.0), "model.b": torch.ones(2)}, "epoch": 3, "cfg": "a: 1"}
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _damaged(legacy: bool, flips: list[tuple[int, int]]) -> bytes:
    """A small checkpoint with bytes overwritten: anywhere in a legacy file, inside the pickle of a zip file."""
    original = _small_checkpoint_bytes(legacy)
    if legacy:
        damaged = bytearray(original)
        for position, value in flips:
            damaged[position % len(damaged)] = value
        return bytes(damaged)
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(name for name in entries if name.endswith("data.pkl"))
    pickled = bytearray(entries[name])
    for position, value in flips:
        pickled[position % len(pickled)] = value
    entries[name] = bytes(pickled)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return buffer.getvalue()


# torch warns about the unknown pickle protocol that some flipped bytes announce; the refusal is what is tested.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
# pickletools decodes a flipped byte inside a text string as an escape and warns before the parse fails.
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@settings(max_examples=60, deadline=None)
@given(
    legacy=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_damaged_checkpoints_are_refused_as_checkpoint_errors_or_load(tmp_path_factory, legacy, flips):
    # Whatever a damaged pickle makes torch's restricted unpickler raise, the user gets a CheckpointError naming the
    # file (or, when the damage hit only values, the file loads).
    path = tmp_path_factory.mktemp("damaged") / "checkpoint.pyth"
    path.write_bytes(_damaged(legacy, flips))

    try:
        load_checkpoint(path)
    except CheckpointError as error:
        assert str(error).startswith(f"{path}: is ")
        assert "not loaded" in str(error) or "the file is empty" in str(error)


# --- 3. a checkpoint, but the wrong one -----------------------------------------------------------------------------


def _save(tmp_path, state_dict, name="checkpoint.pyth") -> Path:
    path = tmp_path / name
    torch.save({"model_state": state_dict}, path)
    return path


def _converted(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / WEIGHTS_NAME)


def _refused(tmp_path, state_dict, error_type, *fragments, variant=None):
    """Convert ``state_dict`` from a file; expect ``error_type`` holding every fragment and nothing written."""
    __tracebackhide__ = True
    path = _save(tmp_path, state_dict)
    out = tmp_path / "out"
    with pytest.raises(error_type) as error:
        convert_checkpoint(path, out, variant=get_variant(variant) if variant else None, num_attention_heads=2)
    for fragment in fragments:
        assert fragment in str(error.value), f"{fragment!r} not in {str(error.value)!r}"
    assert_nothing_written(out)
    return str(error.value)


def test_declared_variant_is_checked_from_shapes_before_any_heavy_work(tmp_path, monkeypatch):
    # An HR checkpoint whose time embedding holds 8 frames (HR is 16), at full size but holding a few bytes.
    path = _save(tmp_path, expanded_state_dict(HR_WITH_8_FRAMES))
    assert path.stat().st_size < 2**20
    for step in ("expected_tensors", "prepare_tensors", "write_output"):
        monkeypatch.setattr(convert_module, step, lambda *a, _step=step, **k: pytest.fail(f"{_step} ran"))

    with pytest.raises(VariantMismatchError) as error:
        convert_checkpoint(path, tmp_path / "out", variant=get_variant("timesformer-hr-finetuned-k400"))

    assert "num_frames: checkpoint 8, timesformer-hr-finetuned-k400 declares 16" in str(error.value)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    "shape, variant, expected",
    [
        (HR_WITH_8_FRAMES, "timesformer-hr-finetuned-k400", "num_frames: checkpoint 8, {variant} declares 16"),
        (
            BASE_WITH_600_CLASSES,
            "timesformer-base-finetuned-k400",
            "num_labels: checkpoint 600, {variant} declares 400",
        ),
        (
            BASE_WITHOUT_TEMPORAL_BLOCKS,
            "timesformer-base-finetuned-k400",
            "attention_type: checkpoint joint_space_time, {variant} declares divided_space_time",
        ),
    ],
    ids=["hr-with-8-frames", "head-of-600-declared-k400", "vit-without-temporal-blocks-declared-divided"],
)
def test_cli_refuses_a_checkpoint_of_another_variant(tmp_path, shape, variant, expected):
    path = _save(tmp_path, expanded_state_dict(shape))

    result = run_cli("convert", path, "--out", tmp_path / "out", "--variant", variant)

    assert_refused(result, str(path), f"does not match variant {variant}", expected.format(variant=variant))
    assert_nothing_written(tmp_path / "out")


def test_missing_head_is_named(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    del state_dict["model.head.weight"], state_dict["model.head.bias"]

    _refused(tmp_path, state_dict, ConversionError, "required key 'head.weight' is missing")


def test_head_bias_of_another_size_names_both_keys(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["model.head.bias"] = torch.zeros(7)

    _refused(
        tmp_path,
        state_dict,
        CoverageError,
        "shape mismatch (1): classifier.bias (from model.head.bias): checkpoint (7,), model (5,)",
    )


def test_head_of_another_size_converts_to_that_many_classes(tmp_path):
    # Without a declared variant a different head is simply a different model: its size is read, not assumed.
    shape = ModelShape(**{**TINY.__dict__, "num_labels": 11})
    path = _save(tmp_path, prefixed(synthetic_state_dict(shape)))

    report = convert_checkpoint(path, tmp_path / "out", num_attention_heads=2)

    assert report.shape.num_labels == 11
    assert _converted(tmp_path / "out")["classifier.weight"].shape == (11, 32)


@pytest.mark.parametrize("prefix", ["module.model.", "model.module.", "module.module.model.", ""])
def test_stacked_wrapper_prefixes_convert_to_the_same_tensors(tmp_path, prefix):
    state_dict = synthetic_state_dict(TINY)
    path = _save(tmp_path, prefixed(state_dict, prefix))

    convert_checkpoint(path, tmp_path / "out", num_attention_heads=2)

    converted = _converted(tmp_path / "out")
    # Against the rule table's examples, written out by hand for this model:
    assert torch.equal(converted["timesformer.embeddings.cls_token"], state_dict["cls_token"])
    assert torch.equal(converted["classifier.weight"], state_dict["head.weight"])
    assert torch.equal(
        converted["timesformer.encoder.layer.1.temporal_dense.weight"], state_dict["blocks.1.temporal_fc.weight"]
    )
    assert torch.equal(
        converted["timesformer.encoder.layer.0.attention.attention.qkv.bias"], state_dict["blocks.0.attn.qkv.bias"]
    )
    # and as a model: the converted one computes what the original computes.
    comparison = compare_forward(tmp_path / "out", state_dict, TINY, native_clip(TINY))
    assert comparison.agrees(), comparison.max_abs_diff
    assert len(converted) == len(state_dict)


def test_a_key_with_model_inside_its_name_is_not_mangled(tmp_path):
    # Replacing "model." anywhere would turn this into blocks.0.norm1.weight and silently overwrite the real one.
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["model.blocks.0.model.norm1.weight"] = torch.zeros(32)

    message = _refused(
        tmp_path, state_dict, RuleError, "'model.blocks.0.model.norm1.weight'", "matches no rename rule"
    )

    assert "'blocks.0.norm1.weight'" not in message


def test_a_key_with_model_inside_its_name_instead_of_the_real_one_is_refused(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["model.blocks.0.model.norm1.weight"] = state_dict.pop("model.blocks.0.norm1.weight")

    _refused(tmp_path, state_dict, RuleError, "'blocks.0.model.norm1.weight' matches no rename rule")


def test_keys_duplicated_after_prefix_stripping_are_named(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["module.head.bias"] = torch.ones(5)

    _refused(tmp_path, state_dict, RuleError, "'model.head.bias' and 'module.head.bias' are the same key 'head.bias'")


def test_every_unknown_key_is_named(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["model.blocks.0.attn.relative_position_bias"] = torch.zeros(3)
    state_dict["model.fc_norm.weight"] = torch.zeros(32)

    _refused(
        tmp_path,
        state_dict,
        RuleError,
        "2 keys match no rename rule: 'model.blocks.0.attn.relative_position_bias', 'model.fc_norm.weight'",
    )


def test_temporal_blocks_missing_from_one_block_are_listed(tmp_path):
    state_dict = {k: v for k, v in prefixed(synthetic_state_dict(TINY)).items() if ".1.temporal_" not in k}

    _refused(
        tmp_path,
        state_dict,
        CoverageError,
        "missing (8): timesformer.encoder.layer.1.temporal_attention.attention.qkv.bias",
        "timesformer.encoder.layer.1.temporal_layernorm.weight",
    )


def test_temporal_blocks_without_a_time_embedding_are_refused(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    del state_dict["model.time_embed"]

    _refused(tmp_path, state_dict, ConversionError, "temporal attention blocks present but no 'time_embed'")


def test_a_gap_in_block_indices_is_counted_not_enumerated(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["model.blocks.999999.norm1.weight"] = torch.zeros(32)

    message = _refused(tmp_path, state_dict, ConversionError, "999997 blocks are missing (2, 3, 4,")

    assert "and 999987 more" in message and len(message) < 300


@pytest.mark.parametrize(
    "key, tensor, expected",
    [
        ("model.time_embed", torch.zeros(4), "'time_embed' has shape (4,), expected (1, frames, hidden)"),
        ("model.cls_token", torch.zeros(1, 1, 0), "'cls_token' has shape (1, 1, 0), expected (1, 1, hidden)"),
        ("model.pos_embed", torch.zeros(1, 1, 32), "'pos_embed' holds 0 patch positions"),
        ("model.head.weight", torch.zeros(5), "'head.weight' has shape (5,), expected (classes, hidden)"),
        (
            "model.patch_embed.proj.weight",
            torch.zeros(32, 3, 0, 0),
            "'patch_embed.proj.weight' has shape (32, 3, 0, 0)",
        ),
    ],
    ids=["1d-time-embedding", "zero-width", "no-positions", "1d-head", "zero-patch"],
)
def test_malformed_shapes_are_named(tmp_path, key, tensor, expected):
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict[key] = tensor

    _refused(tmp_path, state_dict, ConversionError, expected)


def _quantized(values: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated, but old files hold them
        return torch.quantize_per_tensor(values, 0.1, 0, torch.qint8)


NOT_DENSE_FLOATS = {
    "int64": (lambda: torch.zeros(64, dtype=torch.int64), "int64"),
    "bool": (lambda: torch.zeros(64, dtype=torch.bool), "bool"),
    "complex": (lambda: torch.zeros(64, dtype=torch.complex64), "complex64"),
    "quantized": (lambda: _quantized(torch.zeros(64)), "qint8"),
    "sparse": (lambda: torch.zeros(64).to_sparse(), "sparse_coo layout, not dense"),
    "meta": (lambda: torch.zeros(64, device="meta"), "no data: saved from the meta device"),
}


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("case", sorted(NOT_DENSE_FLOATS))
def test_tensors_that_are_not_dense_floats_are_named(tmp_path, case):
    make, why = NOT_DENSE_FLOATS[case]
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["model.blocks.0.mlp.fc1.bias"] = make()

    _refused(tmp_path, state_dict, ConversionError, "1 entry is not dense", f"model.blocks.0.mlp.fc1.bias ({why})")


def test_cli_names_a_non_float_tensor_in_one_line(tmp_path):
    state_dict = prefixed(synthetic_state_dict(TINY))
    state_dict["model.blocks.0.mlp.fc1.bias"] = torch.zeros(64, dtype=torch.int64)
    path = _save(tmp_path, state_dict)

    result = run_cli("convert", path, "--out", tmp_path / "out")

    assert_refused(result, str(path), "model.blocks.0.mlp.fc1.bias (int64)")
    assert_nothing_written(tmp_path / "out")


def test_non_string_keys_are_named():
    state_dict = {**synthetic_state_dict(TINY), 7: torch.zeros(1)}

    with pytest.raises(ConversionError, match=r"7 \(a int key, not a string\)"):
        convert_state_dict(state_dict, source="ck.pyth")


def test_cli_names_a_non_string_key_in_one_line(tmp_path):
    path = _save(tmp_path, {**prefixed(synthetic_state_dict(TINY)), 7: torch.zeros(1)})

    result = run_cli("convert", path, "--out", tmp_path / "out")

    assert_refused(result, str(path), "7 (a int key, not a string)")


def test_tensors_sharing_storage_convert_to_their_own_values(tmp_path):
    # qkv and proj of block 0 saved as two views of one tensor, the head bias as a view into the middle of another.
    state_dict = prefixed(synthetic_state_dict(TINY))
    fused = torch.cat([state_dict["model.blocks.0.attn.qkv.weight"], state_dict["model.blocks.0.attn.proj.weight"]])
    pool = torch.cat([torch.full((3,), 9.0), state_dict["model.head.bias"], torch.full((3,), 9.0)])
    shared = {
        **state_dict,
        "model.blocks.0.attn.qkv.weight": fused[:96],
        "model.blocks.0.attn.proj.weight": fused[96:],
        "model.head.bias": pool[3:8],
    }
    path = _save(tmp_path, shared)
    loaded = read_state_dict(path)
    assert loaded["model.blocks.0.attn.qkv.weight"].untyped_storage().data_ptr() == (
        loaded["model.blocks.0.attn.proj.weight"].untyped_storage().data_ptr()
    ), "the views were not saved as one storage"

    convert_checkpoint(path, tmp_path / "out", num_attention_heads=2)

    converted = _converted(tmp_path / "out")
    qkv, proj = (
        "timesformer.encoder.layer.0.attention.attention.qkv.weight",
        "timesformer.encoder.layer.0.attention.output.dense.weight",
    )
    assert torch.equal(converted[qkv], state_dict["model.blocks.0.attn.qkv.weight"])
    assert torch.equal(converted[proj], state_dict["model.blocks.0.attn.proj.weight"])
    assert torch.equal(converted["classifier.bias"], state_dict["model.head.bias"])


def test_a_checkpoint_rezipped_with_compression_converts_to_its_values(tmp_path):
    # torch memory-maps zip records as they lie in the file; a compressed record mapped that way reads as garbage.
    state_dict = prefixed(synthetic_state_dict(TINY))
    path = _save(tmp_path, state_dict)
    _rezipped(path, zipfile.ZIP_DEFLATED)

    convert_checkpoint(path, tmp_path / "out", num_attention_heads=2)

    converted = _converted(tmp_path / "out")
    assert torch.equal(converted["classifier.weight"], state_dict["model.head.weight"])
    assert torch.equal(
        converted["timesformer.encoder.layer.1.intermediate.dense.weight"], state_dict["model.blocks.1.mlp.fc1.weight"]
    )


def test_non_contiguous_tensors_convert_to_their_values(tmp_path):
    # Weights saved as transposed views (column-major), and one as a zero-stride broadcast.
    state_dict = prefixed(synthetic_state_dict(TINY))
    transposed = {key: t.t().contiguous().t() for key, t in state_dict.items() if t.ndim == 2}
    broadcast = torch.full((), 0.25).expand(1, 1, 32)
    path = _save(tmp_path, {**state_dict, **transposed, "model.cls_token": broadcast})
    loaded = read_state_dict(path)
    assert not loaded["model.blocks.1.mlp.fc2.weight"].is_contiguous(), "the view was saved contiguous"

    convert_checkpoint(path, tmp_path / "out", num_attention_heads=2)

    converted = _converted(tmp_path / "out")
    assert torch.equal(
        converted["timesformer.encoder.layer.1.output.dense.weight"], state_dict["model.blocks.1.mlp.fc2.weight"]
    )
    assert torch.equal(converted["classifier.weight"], state_dict["model.head.weight"])
    assert torch.equal(converted["timesformer.embeddings.cls_token"], torch.full((1, 1, 32), 0.25))
    expected = dict(state_dict, **{"model.cls_token": torch.full((1, 1, 32), 0.25)})
    comparison = compare_forward(tmp_path / "out", expected, TINY, native_clip(TINY))
    assert comparison.agrees(), comparison.max_abs_diff


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_the_pickle_scanner_names_imports_without_importing_them(tmp_path, protocol):
    # The refusal names what a pickle imports by decoding its instructions; it must not import those modules itself.
    module = os.system.__module__
    fake = "q" * len(module)  # same length, so that length-prefixed strings stay valid
    data = pickle.dumps(RunsCommand(tmp_path / "ran"), protocol=protocol).replace(module.encode(), fake.encode())

    imports = checkpoint_module.pickle_imports(io.BytesIO(data))

    assert imports == [f"{fake}.system"]
    assert fake not in sys.modules
