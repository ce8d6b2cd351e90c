"""Against the ground truth: checkpoints, inputs and logits written by the original TimeSformer code.

Each case is converted as a user would (CLI-equivalent library call, heads from the case file since shapes do not
carry them) and must reproduce the original's logits to 1e-5. The reference implementation is held to the same bar,
which is what lets the synthetic tests trust it at full size.
"""

import json

import numpy as np
import pytest
import torch

from conftest import ORACLE_ENV, oracle_dir
from timesformer_convert.checkpoint import load_checkpoint, read_state_dict
from timesformer_convert.config import SPACE_ONLY, infer_shape
from timesformer_convert.convert import convert_checkpoint
from timesformer_convert.inference import load_converted, original_logits, to_pixel_values
from timesformer_convert.reference import reference_model

ORACLE_ATOL = 1e-5

pytestmark = pytest.mark.oracle


def _case(folder):
    """The case file, input and logits of one oracle case; a damaged case fails in one line naming the file."""
    problem = None
    try:
        case = json.loads((folder / "case.json").read_text())
        clip = torch.from_numpy(np.load(folder / "input_bcthw.npy"))
        logits = torch.from_numpy(np.load(folder / "logits.npy"))
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:  # failed outside the except block, so the report is the one line
        pytest.fail(f"{folder}: damaged oracle case ({problem})", pytrace=False)
    if not isinstance(case, dict):
        pytest.fail(f"{folder / 'case.json'}: damaged oracle case (not a JSON object)", pytrace=False)
    return case, clip, logits


def _assert_close(actual, expected, what):
    __tracebackhide__ = True
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= ORACLE_ATOL, (
        f"{what}: max |diff| {diff:.3e} > {ORACLE_ATOL}\n  got      {actual}\n  expected {expected}"
    )


def test_layout_is_the_one_the_case_names(oracle_case_dir):
    case, _, _ = _case(oracle_case_dir)
    checkpoint = load_checkpoint(oracle_case_dir / "checkpoint.pyth")

    assert case["layout"] in checkpoint


def test_shape_is_read_from_the_checkpoint(oracle_case_dir):
    case, _, _ = _case(oracle_case_dir)
    state_dict = read_state_dict(oracle_case_dir / "checkpoint.pyth")
    frames = case["num_frames"] if case["attention_type"] == SPACE_ONLY else None

    shape = infer_shape(state_dict, num_attention_heads=case["num_heads"], num_frames=frames)

    assert shape.attention_type == case["attention_type"]
    assert shape.num_frames == case["num_frames"]
    assert shape.image_size == case["img_size"]
    assert shape.hidden_size == case["embed_dim"]
    assert shape.num_hidden_layers == case["depth"]
    assert shape.num_labels == case["num_classes"]
    assert shape.patch_size == case["patch_size"]
    assert shape.intermediate_size == case["embed_dim"] * case["mlp_ratio"]


def test_reference_implementation_reproduces_the_original(oracle_case_dir):
    case, clip, expected = _case(oracle_case_dir)
    state_dict = read_state_dict(oracle_case_dir / "checkpoint.pyth")
    shape = infer_shape(state_dict, num_attention_heads=case["num_heads"], num_frames=case["num_frames"])

    with torch.no_grad():
        actual = reference_model(state_dict, shape)(clip)

    _assert_close(actual, expected, f"reference on {case['name']}")


def test_conversion_reproduces_the_original(oracle_case_dir, tmp_path):
    case, clip, expected = _case(oracle_case_dir)

    convert_checkpoint(
        oracle_case_dir / "checkpoint.pyth",
        tmp_path / "out",
        num_attention_heads=case["num_heads"],
        num_frames=case["num_frames"] if case["attention_type"] == SPACE_ONLY else None,
    )
    actual = original_logits(load_converted(tmp_path / "out"), to_pixel_values(clip))

    _assert_close(actual, expected, f"converted {case['name']}")


def test_space_only_stock_output_is_per_frame(request, tmp_path):
    folders = [
        path.parent
        for path in sorted(oracle_dir(request.config).glob("*/case.json"))
        if _case(path.parent)[0].get("attention_type") == SPACE_ONLY
    ]
    if not folders:
        pytest.skip(f"no space-only oracle case; pass --oracle-dir=DIR or set {ORACLE_ENV}")
    case, clip, expected = _case(folders[0])
    convert_checkpoint(
        folders[0] / "checkpoint.pyth",
        tmp_path / "out",
        num_attention_heads=case["num_heads"],
        num_frames=case["num_frames"],
    )
    model = load_converted(tmp_path / "out")

    with torch.no_grad():
        per_frame = model(pixel_values=to_pixel_values(clip)).logits

    assert per_frame.shape == (case["batch"] * case["num_frames"], case["num_classes"])
    assert (per_frame.reshape(case["batch"], case["num_frames"], -1).mean(1) - expected).abs().max() > ORACLE_ATOL, (
        "averaging per-frame logits is not the original's computation; if it matched, the test input is degenerate"
    )
