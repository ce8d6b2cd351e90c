"""Golden values: the gate that catches numerical drift, refresh mode, and proof that the gate can fail.

Synthetic goldens (tests/golden/synthetic) hold the outputs of each variant's converted synthetic checkpoint (full
width, first FORWARD_BLOCKS blocks) on ``verify.native_clip`` and are compared offline in every run. Real goldens
(tests/golden/real) hold logits of the released checkpoints on the spaghetti clip and are compared only when real
checkpoints are available. ``pytest --refresh-golden`` re-records instead of comparing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FORWARD_BLOCKS, SYNTHETIC_VERSION, VARIANT_NAMES
from tests.plugins import golden as golden_plugin
from tests.plugins.golden import GoldenStore, set_golden_status
from tests.running import Forked, Options, run_pytest
from timesformer_convert.checkpoint import read_state_dict
from timesformer_convert.config import ModelShape
from timesformer_convert.convert import WEIGHTS_NAME, convert_checkpoint
from timesformer_convert.golden import (
    DEFAULT_TOLERANCE,
    HEAD,
    KINDS,
    SEED_FRAMES,
    GoldenError,
    GoldenMismatch,
    GoldenRecord,
    Observation,
    compare,
    fingerprint,
    gate,
    golden_path,
    load_record,
    new_record,
    observation_of,
    observe,
    protocol_pixel_values,
    record_from_dict,
    reference_divergence,
    spaghetti_protocol,
    state_dict_checksum,
    synthetic_protocol,
    write_record,
)
from timesformer_convert.inference import load_converted, to_pixel_values
from timesformer_convert.variants import VARIANTS
from timesformer_convert.verify import native_clip, variant_seed, variant_shape

BASE = "timesformer-base-finetuned-k400"
# Goldens that tests/test_plain_run.py moves by 1e-3: variant -> (value, where the gate should locate it).
PERTURBED_GOLDENS = {BASE: ("logits[2]", HEAD), "timesformer-base-finetuned-ssv2": ("block 0 mean", "block 0")}
SYNTHETIC_NOTE = (
    "outputs of the converted synthetic checkpoint (full width, first blocks) on verify.native_clip at the variant's "
    "native input; they move when the converter, torch, transformers or the synthetic weights change"
)
REAL_NOTE = "logits of the converted released checkpoint on the spaghetti clip, recorded by a real run"


# --- running a converted model and gating it ------------------------------------------------------------------------


@dataclass
class ConvertedRun:
    """One converted model's outputs on its golden input, with what the gate needs to locate a divergence."""

    variant: str
    shape: ModelShape
    checkpoint: Path
    folder: Path
    clip_bcthw: torch.Tensor | None
    observation: Observation
    checksum: str

    def clip(self) -> torch.Tensor:
        return self.clip_bcthw if self.clip_bcthw is not None else native_clip(self.shape)

    def locate(self, folder: Path | None = None, atol: float = DEFAULT_TOLERANCE) -> str:
        """Where the converted model in ``folder`` (default: this run's) first departs from the reference."""
        if folder is None:
            return self._located
        return reference_divergence(folder, read_state_dict(self.checkpoint), self.shape, self.clip(), atol)

    @cached_property
    def _located(self) -> str:
        return reference_divergence(
            self.folder, read_state_dict(self.checkpoint), self.shape, self.clip(), DEFAULT_TOLERANCE
        )


@pytest.fixture(scope="session")
def synthetic_runs(artifacts):
    """``run(variant)``: the converted FORWARD_BLOCKS-deep synthetic model's outputs on ``verify.native_clip``,
    computed once per worker (the clip is rebuilt on demand rather than kept)."""
    runs: dict[str, ConvertedRun] = {}

    def run(variant: str) -> ConvertedRun:
        if variant not in runs:
            shape = artifacts.forward_shape(variant)
            checkpoint = artifacts.checkpoint(variant, FORWARD_BLOCKS)
            folder = artifacts.converted(variant, FORWARD_BLOCKS)
            outputs = artifacts.converted_outputs(variant)  # the forward pass the reference test also checks
            observation = observation_of(outputs.logits, outputs.hidden_states)
            checksum = state_dict_checksum(read_state_dict(checkpoint))
            runs[variant] = ConvertedRun(variant, shape, checkpoint, folder, None, observation, checksum)
        return runs[variant]

    return run


def real_run(variant: str, checkpoint: Path, video, work_dir: Path, converted: Path | None = None) -> ConvertedRun:
    """Convert a released checkpoint into ``work_dir`` (unless its conversion is given as ``converted``) and run it
    on the spaghetti protocol's input."""
    declared = VARIANTS[variant]
    folder = converted or work_dir / "converted"
    if converted is None:
        convert_checkpoint(checkpoint, folder, variant=declared, overwrite=True)
    pixel_values = protocol_pixel_values(video, spaghetti_protocol(declared))
    observation = observe(load_converted(folder), pixel_values)
    checksum = state_dict_checksum(read_state_dict(checkpoint))
    clip = to_pixel_values(pixel_values)  # the same permutation turns it back into the original layout
    return ConvertedRun(variant, variant_shape(declared), checkpoint, folder, clip, observation, checksum)


def synthetic_record(run: ConvertedRun) -> GoldenRecord:
    source = (
        f"synthetic checkpoint of {run.variant}: reference.synthetic_checkpoint, seed {variant_seed(run.variant)}, "
        "synthetic version "
        f"{SYNTHETIC_VERSION}, first {FORWARD_BLOCKS} blocks"
    )
    protocol = synthetic_protocol(VARIANTS[run.variant])
    return new_record(
        VARIANTS[run.variant],
        "synthetic",
        run.observation,
        protocol,
        source,
        run.checksum,
        SYNTHETIC_NOTE,
        FORWARD_BLOCKS,
    )


def real_record(run: ConvertedRun) -> GoldenRecord:
    declared = VARIANTS[run.variant]
    source = f"released checkpoint {declared.original_file}"
    return new_record(
        declared,
        "real",
        run.observation,
        spaghetti_protocol(declared),
        source,
        run.checksum,
        REAL_NOTE,
        declared.num_hidden_layers,
    )


def provided(request, name: str):
    """The fixture ``name`` when a plugin provides it (the download tier's ``real_checkpoint(variant)`` and
    ``spaghetti_frames``, which fetch with --real), else None; its skips propagate."""
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return None


def load_or_fail(store: GoldenStore, kind: str, variant: str) -> GoldenRecord:
    __tracebackhide__ = True
    try:
        return store.load(kind, variant)
    except GoldenError as e:
        refused = str(e)
    pytest.fail(refused, pytrace=False)  # outside the except block, so the message is not shown twice


def apply_gate(node, record: GoldenRecord, path: Path, run: ConvertedRun, protocol) -> None:
    """Compare ``run`` with ``record``; fail the test with the gate's message. A mismatch of an unverified record is
    raised as GoldenMismatch for the strict xfail that marks it."""
    __tracebackhide__ = True
    try:
        comparison = gate(record, path, run.observation, protocol, run.locate, run.checksum)
    except GoldenMismatch as e:
        if not record.verified:
            raise
        failure = str(e)
    except GoldenError as e:
        failure = str(e)
    else:
        set_golden_status(node, record.kind, "ok", max_abs_diff=comparison.max_abs_diff)
        return
    pytest.fail(failure, pytrace=False)  # outside the except block, so the message is not shown twice


# --- the gate -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_synthetic_golden(variant, synthetic_runs, golden_store, request):
    set_golden_status(request.node, "synthetic", "pending")
    run = synthetic_runs(variant)

    if golden_store.refreshing(variant):
        record = synthetic_record(run)
        golden_store.rewrite(request.node, record)
        assert golden_store.load("synthetic", variant) == record, "the written golden does not read back equal"
        return

    record = load_or_fail(golden_store, "synthetic", variant)
    apply_gate(
        request.node, record, golden_store.path("synthetic", variant), run, synthetic_protocol(VARIANTS[variant])
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_real_golden(variant, golden_store, real_inputs, tmp_path, request):
    set_golden_status(request.node, "real", "pending")
    real_inputs.require_enabled()
    path = golden_store.path("real", variant)
    refreshing = golden_store.refreshing(variant)
    if not refreshing and not path.exists():
        pytest.skip(
            f"no real golden for {variant} (none was published); record one with "
            f"`pytest --checkpoint-dir=DIR --refresh-golden --golden-variant {variant}`"
        )
    record = None if refreshing else load_or_fail(golden_store, "real", variant)

    checkpoint = provided(request, "real_checkpoint")
    frames = provided(request, "spaghetti_frames")
    checkpoint = checkpoint(variant) if checkpoint is not None else real_inputs.checkpoint(variant)
    run = real_run(variant, checkpoint, frames if frames is not None else real_inputs.video(), tmp_path)

    if refreshing:
        golden_store.rewrite(request.node, real_record(run))
        return
    if not record.verified:
        request.node.add_marker(
            pytest.mark.xfail(
                strict=True,
                raises=GoldenMismatch,
                reason=f"{path} is unverified ({record.note}); if this passes, a real run reproduced the values: "
                "set verified to true",
            )
        )
    apply_gate(request.node, record, path, run, spaghetti_protocol(VARIANTS[variant]))


# --- the golden files in the repository ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_golden_file_is_valid(variant, kind, golden_store):
    declared = VARIANTS[variant]
    path = golden_store.path(kind, variant)
    if kind == "real" and not path.exists():
        assert declared.reference_logits is None, f"{variant} has published logits but no real golden at {path}"
        return

    record = load_or_fail(golden_store, kind, variant)

    if kind == "synthetic":
        assert record.verified and record.num_hidden_layers == FORWARD_BLOCKS
        assert record.protocol == synthetic_protocol(declared)
        assert record.provenance["source_sha256"], f"{path}: no checksum of the source weights"
        return
    assert record.protocol == spaghetti_protocol(declared)
    if record.verified and declared.num_frames == SEED_FRAMES:
        # The published values were computed on this protocol; a record of it must reproduce them.
        published = declared.reference_logits
        assert all(abs(a - b) <= record.tolerance for a, b in zip(record.logits, published, strict=False)), (
            f"{path}: {record.logits[:3]} differ from the published {published}"
        )


def test_every_golden_file_belongs_to_a_variant(golden_store):
    files = sorted(golden_store.root.rglob("*.json"))
    expected = {golden_path(golden_store.root, kind, variant) for kind in KINDS for variant in VARIANTS}

    stray = [str(path) for path in files if path not in expected]

    assert files, f"no golden files under {golden_store.root}"
    assert not stray, f"golden files of no variant (misspelled or stale): {stray}"


# --- the gate can fail ----------------------------------------------------------------------------------------------


def perturb(data: dict, name: str, delta: float) -> dict:
    """A copy of a record's JSON data with the value ``name`` (as in GoldenRecord.values) moved by ``delta``."""
    data = json.loads(json.dumps(data))
    if name.startswith("logits["):
        data["logits"][int(name[7:-1])] += delta
        return data
    state_name, key = name.rsplit(" ", 1)
    state = next(state for state in data["hidden_states"] if state["name"] == state_name)
    if key.startswith("cls["):
        state["cls"][int(key[4:-1])] += delta
    else:
        state[key] += delta
    return data


def divergence_of(name: str) -> str:
    return HEAD if name.startswith("logits[") else name.rsplit(" ", 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_gate_fails_for_every_value_perturbed_beyond_tolerance(variant, synthetic_runs, tmp_path):
    run = synthetic_runs(variant)
    record = synthetic_record(run)
    data = record.as_dict()
    path = tmp_path / f"{variant}.json"
    protocol = synthetic_protocol(VARIANTS[variant])
    assert compare(record, run.observation).ok

    for name in record.values():
        beyond = record_from_dict(perturb(data, name, 10 * DEFAULT_TOLERANCE), path, VARIANTS[variant], "synthetic")
        within = record_from_dict(perturb(data, name, DEFAULT_TOLERANCE / 2), path, VARIANTS[variant], "synthetic")

        failed = compare(beyond, run.observation)
        assert not failed.ok, f"{name} moved by {10 * DEFAULT_TOLERANCE} was not caught"
        assert failed.first_divergent == divergence_of(name)
        assert compare(within, run.observation).ok, f"{name} moved by half the tolerance failed"

    top5 = list(record.top5)
    top5[0] = int(run.observation.logits[0].argmin())
    swapped = replace(record, top5=tuple(top5))
    assert not compare(swapped, run.observation).ok

    # The gate asks where the model departs from the reference only on a mismatch; the reference pass itself is
    # exercised on the base variant below and at every variant's native shape in test_variants.py.
    located = []
    moved = replace(record, logits=(record.logits[0] + 1e-3, *record.logits[1:]))
    assert gate(record, path, run.observation, protocol, lambda: located.append("ok")).ok and not located
    with pytest.raises(GoldenMismatch) as failure:
        gate(moved, path, run.observation, protocol, lambda: located.append("called") or "block 7 (stand-in)")
    message = str(failure.value)
    assert located == ["called"]
    assert message.startswith(f"{variant}: the converted model's outputs differ from the synthetic golden {path}")
    assert f"first divergent block against the golden's hidden states: {HEAD}" in message
    assert "first divergent block against the reference implementation: block 7 (stand-in)" in message


@pytest.mark.slow
@pytest.mark.parametrize("variant", [BASE])
def test_perturbed_weight_is_caught_and_localized(variant, synthetic_runs, golden_store, tmp_path):
    run = synthetic_runs(variant)
    folder = tmp_path / "converted"
    shutil.copytree(run.folder, folder)
    tensors = load_file(folder / WEIGHTS_NAME)
    last = FORWARD_BLOCKS - 1  # the last block: every earlier hidden state must still match
    key = f"timesformer.encoder.layer.{last}.output.dense.weight"
    tensors[key] = tensors[key] * 1.05
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    observation = observe(load_converted(folder), to_pixel_values(native_clip(run.shape)))
    record = load_or_fail(golden_store, "synthetic", variant)

    with pytest.raises(GoldenMismatch) as failure:
        gate(
            record,
            golden_store.path("synthetic", variant),
            observation,
            synthetic_protocol(VARIANTS[variant]),
            lambda: run.locate(folder),
        )

    message = str(failure.value)
    assert message.startswith(f"{variant}: ")
    assert f"first divergent block against the golden's hidden states: block {last}" in message
    assert f"first divergent block against the reference implementation: block {last}" in message


# --- pytest as a user runs it ---------------------------------------------------------------------------------------


def copy_golden(store: GoldenStore, kind: str, variant: str, folder: Path) -> tuple[dict, Path]:
    source = store.path(kind, variant)
    target = golden_path(folder, kind, variant)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return json.loads(source.read_text()), target


def status_line(output: str, test: str, status: str) -> bool:
    """Whether a verbose line reports ``test`` with ``status``."""
    return any(test in line and f" {status}" in line for line in output.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("variant", [BASE])
def test_refresh_restores_a_deleted_golden_and_the_next_run_passes(variant, golden_store, synthetic_runs, tmp_path):
    other = "timesformer-base-finetuned-ssv2"
    copy_golden(golden_store, "synthetic", other, tmp_path)
    selection = ["-k", f"test_synthetic_golden and ({variant} or {other})"]

    refresh = run_pytest(
        "tests/test_golden.py",
        *selection,
        "--golden-dir",
        tmp_path,
        "--refresh-golden",
        "--golden-variant",
        variant,
        "-v",
    )

    output = refresh.stdout
    assert refresh.returncode == 0, output + refresh.stderr
    assert status_line(output, f"test_synthetic_golden[{variant}]", "REFRESHED")
    assert status_line(output, f"test_synthetic_golden[{other}]", "PASSED")
    table = output[output.index("golden values refreshed") :]
    assert f"{variant}  synthetic  missing" in table and "new file" in table
    assert other not in table.split("review the change")[0]
    summary = output[output.index("per-variant summary") :].splitlines()
    assert any(line.startswith(variant) and "refreshed" in line for line in summary), summary
    assert any(line.startswith(other) and " ok (" in line for line in summary), summary
    path = golden_path(tmp_path, "synthetic", variant)
    restored = load_record(path, variant, "synthetic")
    committed = golden_store.load("synthetic", variant)
    assert all(abs(a - b) <= DEFAULT_TOLERANCE for a, b in zip(restored.logits, committed.logits, strict=True))
    # The next run's gate: the restored golden passes on the same outputs.
    run = synthetic_runs(variant)
    assert gate(restored, path, run.observation, synthetic_protocol(VARIANTS[variant]), run.locate).ok


def test_refresh_refuses_to_run_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.UsageError, match="--refresh-golden refuses to run while CI is set"):
        golden_plugin.pytest_configure(Options(refresh_golden=True, golden_variant=[]))


def test_unknown_golden_variant_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.UsageError, match="--golden-variant 'timesformer-tiny' is not a variant"):
        golden_plugin.pytest_configure(Options(refresh_golden=True, golden_variant=["timesformer-tiny"]))


def test_golden_variant_without_refresh_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.UsageError, match="--golden-variant only narrows --refresh-golden"):
        golden_plugin.pytest_configure(Options(refresh_golden=False, golden_variant=[BASE]))


# --- the real tier, offline, on a synthetic full-size checkpoint and a made-up clip ----------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", [BASE])
def test_real_tier_records_and_compares_a_full_checkpoint(variant, artifacts, tmp_path):
    video = torch.randint(0, 256, (16, 180, 320, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    # The cached conversion is the one real_run would make: the full checkpoint declared as the variant.
    run = real_run(variant, artifacts.checkpoint(variant), video.numpy(), tmp_path, artifacts.converted(variant))
    path = golden_path(tmp_path / "golden", "real", variant)
    protocol = spaghetti_protocol(VARIANTS[variant])

    write_record(path, real_record(run))
    record = load_record(path, variant, "real")

    assert record.output_shape == (1, 400) and len(record.hidden_states) == 13
    assert record.provenance["source_sha256"] == run.checksum
    assert gate(record, path, run.observation, protocol, run.locate).ok
    moved = replace(record, verified=False, note="made up", logits=(record.logits[0] + 1e-3, *record.logits[1:]))
    with pytest.raises(GoldenMismatch, match=f"{variant}: .* real golden"):
        gate(moved, path, run.observation, protocol, lambda: "not located in this test")


# --- records, files and protocols -----------------------------------------------------------------------------------


def made_up_record(variant: str = "timesformer-hr-finetuned-k400", kind: str = "synthetic") -> GoldenRecord:
    declared = VARIANTS[variant]
    generator = torch.Generator().manual_seed(0)
    states = [fingerprint(index, torch.randn(1, 7, 16, generator=generator)) for index in range(3)]
    observation = Observation(torch.randn(1, declared.num_labels, generator=generator), states)
    protocol = synthetic_protocol(declared) if kind == "synthetic" else spaghetti_protocol(declared)
    return new_record(declared, kind, observation, protocol, "made up for a test", None, "made up", 2)


def test_a_record_reads_back_equal_and_diffs_in_few_lines(tmp_path):
    record = made_up_record()
    path = tmp_path / "synthetic" / f"{record.variant}.json"

    refresh = write_record(path, record)

    assert refresh.previous_state == "missing" and refresh.largest_change() is None
    assert load_record(path, record.variant, "synthetic") == record
    assert not [p.name for p in path.parent.iterdir() if p.name != path.name], "temporary files left behind"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, "a golden is written like any file, not 0600"

    before = path.read_text().splitlines()
    second = write_record(path, replace(record, logits=(record.logits[0] + 0.25, *record.logits[1:])))
    after = path.read_text().splitlines()

    assert second.previous == record and second.largest_change() == pytest.approx(0.25)
    changed = [line for old, line in zip(before, after, strict=True) if old != line]
    assert len(changed) == 1 and changed[0].strip().startswith('"logits": ['), changed


def _set(path: str, value):
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        target[last] = value

    return change


INVALID = {
    "placeholder": (_set("logits", [0.0, 0.0, 0.0]), "all-zero placeholder"),
    "frames": (_set("input.num_frames", 8), "input is 8 frames at 448 px but timesformer-hr-finetuned-k400 takes 16"),
    "crop": (_set("input.crop", 224), "input is 16 frames at 224 px but timesformer-hr-finetuned-k400 takes 16"),
    "frame indices": (_set("input.frame_indices", [0, 1]), "input.frame_indices must hold 16 indices"),
    "unverified without a note": (lambda data: data.update(verified=False, note=""), "an unverified record"),
    "misspelled key": (lambda data: data.update(tolerence=data.pop("tolerance")), "unknown keys ['tolerence']"),
    "another variant": (_set("variant", "timesformer-hr-finetuned-k600"), "expected synthetic of timesformer-hr"),
    "output shape": (_set("output_shape", [1, 600]), "output_shape [1, 600] is not [1, 400]"),
    "too few logits": (_set("logits", [0.5, 0.25]), "at least 3 values"),
    "text logits": (_set("logits", ["0.5", 0.25, 1.0]), "logits must be a list of finite numbers"),
    "top5 out of range": (_set("top5", [0, 1, 2, 3, 400]), "top5 must hold 5 class indices below 400"),
    "hidden state count": (_set("num_hidden_layers", 3), "hidden_states must hold 4 entries"),
    "zero tolerance": (_set("tolerance", 0), "tolerance must be a positive number"),
    "provenance keys": (_set("provenance", {"source": "x"}), "provenance must have exactly the keys"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_an_invalid_record_is_refused_naming_the_file(case, tmp_path):
    change, fragment = INVALID[case]
    record = made_up_record()
    data = record.as_dict()
    change(data)
    path = tmp_path / "synthetic" / f"{record.variant}.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))

    with pytest.raises(GoldenError) as refused:
        load_record(path, record.variant, "synthetic")

    message = str(refused.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert f"--refresh-golden --golden-variant {record.variant}" in message
    assert "\n" not in message


def test_missing_and_malformed_files_are_refused_naming_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    broken = tmp_path / "broken.json"
    broken.write_text('{"variant": ')

    with pytest.raises(GoldenError, match="nope.json: no golden file for .* --refresh-golden"):
        load_record(missing, BASE, "synthetic")
    with pytest.raises(GoldenError, match="broken.json: not valid JSON"):
        load_record(broken, BASE, "synthetic")


def test_unreadable_golden_files_are_refused_naming_the_file(tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe{")
    folder = tmp_path / "folder.json"
    folder.mkdir()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(GoldenError, match="binary.json: cannot be read as a golden file"):
        load_record(binary, BASE, "synthetic")
    with pytest.raises(GoldenError, match="folder.json: cannot be read as a golden file"):
        load_record(folder, BASE, "synthetic")
    with pytest.raises(GoldenError, match="deep.json: not valid JSON"):
        load_record(deep, BASE, "synthetic")


def test_a_record_made_on_another_input_is_never_compared(tmp_path):
    record = made_up_record()
    observation = Observation(torch.zeros(1, 400), [])
    other_input = replace(record.protocol, mean=(0.5, 0.5, 0.5))

    with pytest.raises(GoldenError, match=r"recorded on another input than this run uses \(mean: recorded"):
        gate(record, tmp_path / "x.json", observation, other_input, lambda: pytest.fail("must not be located"))


def test_spaghetti_protocols_take_the_native_frames_and_crop():
    base = spaghetti_protocol(VARIANTS[BASE])
    hr = spaghetti_protocol(VARIANTS["timesformer-hr-finetuned-ssv2"])
    large = spaghetti_protocol(VARIANTS["timesformer-large-finetuned-k400"])
    large_ssv2 = spaghetti_protocol(VARIANTS["timesformer-large-finetuned-ssv2"])

    assert base.frame_indices == tuple(range(8)) and (base.resize, base.crop) == (224, 224)
    assert base.mean == base.std == (0.5, 0.5, 0.5)
    assert hr.frame_indices == tuple(range(16)) and (hr.resize, hr.crop) == (448, 448)
    assert large.frame_indices == tuple(index // 6 for index in range(96))
    assert large_ssv2.frame_indices == tuple(index // 4 for index in range(64))


def test_protocol_pixel_values_resize_crop_and_normalize():
    protocol = spaghetti_protocol(VARIANTS[BASE])
    video = np.zeros((16, 240, 320, 3), dtype=np.uint8)
    video[3] = 255

    pixel_values = protocol_pixel_values(video, protocol)

    assert pixel_values.shape == (1, 8, 3, 224, 224) and pixel_values.dtype == torch.float32
    assert torch.allclose(pixel_values[0, 3], torch.ones(3, 224, 224), atol=1e-6)
    assert torch.allclose(pixel_values[0, 2], -torch.ones(3, 224, 224), atol=1e-6)
    with pytest.raises(ValueError, match="takes frame 7 but the clip has 4 frames"):
        protocol_pixel_values(video[:4], protocol)


WRITER = """
import json, sys
from dataclasses import replace
from timesformer_convert.golden import load_record, write_record
path, variant, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
template = load_record(path, variant, "synthetic")
for index in range(count):
    refresh = write_record(path, replace(template, logits=(worker + 1.0, index + 1.0, *template.logits[2:])))
    previous = list(refresh.previous.logits[:2]) if refresh.previous else None
    print(json.dumps([worker + 1.0, index + 1.0, refresh.previous_state, previous]), flush=True)
"""


def test_parallel_writes_are_serialized_and_never_torn(tmp_path):
    record = made_up_record()
    path = tmp_path / "synthetic" / f"{record.variant}.json"
    initial = replace(record, logits=(-1.0, -1.0, *record.logits[2:]))
    write_record(path, initial)
    workers, count = 3, 15

    processes = [Forked.python(WRITER, path, record.variant, worker, count) for worker in range(workers)]
    results = [process.wait() for process in processes]

    assert all(result.returncode == 0 for result in results), [result.stderr for result in results]
    writes = [json.loads(line) for result in results for line in result.stdout.splitlines()]
    assert len(writes) == workers * count
    assert {state for _, _, state, _ in writes} == {"valid"}, "a writer saw a torn or missing file"
    # Each write replaced exactly one earlier write: the chain of predecessors has no gap and no fork.
    predecessors = sorted(tuple(previous) for _, _, _, previous in writes)
    final = tuple(load_record(path, record.variant, "synthetic").logits[:2])
    written = sorted([(worker, index) for worker, index, _, _ in writes] + [(-1.0, -1.0)])
    assert sorted([*predecessors, final]) == written
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary files left behind"
