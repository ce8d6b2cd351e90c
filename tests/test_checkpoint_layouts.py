"""Checkpoint layouts, config inference from shapes, and the checks made before anything is written."""

import pytest
import torch

from timesformer_convert.checkpoint import extract_state_dict, read_state_dict
from timesformer_convert.config import DIVIDED, JOINT, SPACE_ONLY, ModelShape, check_variant, infer_shape
from timesformer_convert.convert import check_coverage, convert_checkpoint, convert_state_dict, expected_tensors
from timesformer_convert.errors import ConversionError, CoverageError, VariantMismatchError
from timesformer_convert.reference import synthetic_state_dict
from timesformer_convert.variants import VARIANTS, get_variant

TINY = ModelShape(32, 2, 2, 64, 4, 32, 16, 5, DIVIDED)


def _tiny(attention_type=DIVIDED, **changes):
    fields = {**TINY.__dict__, "attention_type": attention_type, **changes}
    if attention_type == SPACE_ONLY:
        fields["num_frames"] = None
    return ModelShape(**fields)


def _prefixed(state_dict, prefix="model."):
    return {prefix + key: value for key, value in state_dict.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"epoch": 3, "model_state": sd, "optimizer_state": {"state": {}}, "cfg": "TRAIN: {}"},
        lambda sd: {"model": sd},
        lambda sd: {"module": sd},
        lambda sd: {"state_dict": sd, "extra": 1},
        lambda sd: sd,
    ],
    ids=["model_state", "model", "module", "state_dict", "bare"],
)
def test_every_layout_converts(wrap, tmp_path):
    state_dict = _prefixed(synthetic_state_dict(TINY))
    torch.save(wrap(state_dict), tmp_path / "checkpoint.pyth")

    report = convert_checkpoint(tmp_path / "checkpoint.pyth", tmp_path / "out")

    assert report.num_tensors == len(state_dict)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_legacy_non_zip_checkpoint_is_read(tmp_path):
    state_dict = _prefixed(synthetic_state_dict(TINY))
    torch.save({"model_state": state_dict}, tmp_path / "old.pyth", _use_new_zipfile_serialization=False)

    loaded = read_state_dict(tmp_path / "old.pyth")

    assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict)


def test_container_without_a_state_dict_names_what_it_found():
    with pytest.raises(ConversionError, match="found: cfg, epoch"):
        extract_state_dict({"epoch": 1, "cfg": "x"}, source="ck.pyth")


@pytest.mark.parametrize("attention_type", [DIVIDED, JOINT, SPACE_ONLY])
def test_shape_is_read_from_tensors(attention_type):
    shape = _tiny(attention_type)

    inferred = infer_shape(_prefixed(synthetic_state_dict(shape)), num_attention_heads=2)

    assert inferred == shape


def test_heads_default_to_hidden_over_64():
    shape = _tiny(hidden_size=128, num_attention_heads=2, intermediate_size=512)

    assert infer_shape(synthetic_state_dict(shape)).num_attention_heads == 2
    assert infer_shape(synthetic_state_dict(shape), num_attention_heads=8).num_attention_heads == 8


def test_heads_that_do_not_divide_hidden_are_refused():
    with pytest.raises(ConversionError, match="not divisible by 5 attention heads"):
        infer_shape(synthetic_state_dict(TINY), num_attention_heads=5)


def test_declared_variant_with_8_frame_time_embedding_names_both_counts():
    hr = get_variant("timesformer-hr-finetuned-k400")
    shape = ModelShape(768, 12, 12, 3072, 8, 448, 16, 400, DIVIDED)

    with pytest.raises(
        VariantMismatchError, match="num_frames: checkpoint 8, timesformer-hr-finetuned-k400 declares 16"
    ):
        check_variant(shape, hr, "hr.pyth")


def test_large_ssv2_is_64_frames_and_large_kinetics_96():
    assert VARIANTS["timesformer-large-finetuned-ssv2"].num_frames == 64
    assert VARIANTS["timesformer-large-finetuned-k400"].num_frames == 96
    assert VARIANTS["timesformer-large-finetuned-k600"].num_frames == 96


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ConversionError, match="choose one of: timesformer-base-finetuned-k400"):
        get_variant("timesformer-huge")


def test_missing_head_is_named():
    state_dict = synthetic_state_dict(TINY)
    del state_dict["head.weight"], state_dict["head.bias"]

    with pytest.raises(ConversionError, match="'head.weight' is missing"):
        convert_state_dict(state_dict)


def test_coverage_lists_missing_unexpected_and_mismatched_keys():
    tensors, config, _, _ = convert_state_dict(synthetic_state_dict(TINY), num_attention_heads=2)
    expected = expected_tensors(config)
    broken = dict(tensors)
    del broken["classifier.bias"]
    broken["classifier.extra"] = torch.zeros(1)
    broken["timesformer.layernorm.weight"] = torch.zeros(7)

    with pytest.raises(CoverageError) as error:
        check_coverage(broken, expected, "ck.pyth")

    message = str(error.value)
    assert "missing (1): classifier.bias" in message
    assert "unexpected (1): classifier.extra" in message
    assert "shape mismatch (1): timesformer.layernorm.weight: checkpoint (7,), model (32,)" in message


def test_divided_without_temporal_blocks_declared_as_a_variant_is_refused():
    # A ViT without temporal blocks reads as joint space-time, which no released variant is.
    shape = ModelShape(768, 12, 12, 3072, 8, 224, 16, 400, JOINT)

    with pytest.raises(VariantMismatchError, match="attention_type: checkpoint joint_space_time"):
        check_variant(shape, get_variant("timesformer-base-finetuned-k400"))
