"""Full-size synthetic checkpoints of all nine released variants: coverage, shapes, round trip and logits.

The checkpoints are built by the reference implementation in the original trainer's layout, with the variant's real
sizes (hidden 768, 12 blocks, its frames, crop and label count), and converted with the variant declared. Forward
passes run at the variant's native input shape on a model of full width and the first two blocks.
"""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import FORWARD_BLOCKS, VARIANT_NAMES
from timesformer_convert.checkpoint import read_state_dict
from timesformer_convert.convert import (
    CONFIG_NAME,
    PREPROCESSOR_NAME,
    WEIGHTS_NAME,
    expected_tensors,
    rename_state_dict,
)
from timesformer_convert.variants import ORIGINAL_MEAN, ORIGINAL_STD, VARIANTS
from timesformer_convert.verify import (
    FORWARD_ATOL,
    compare_outputs,
    roundtrip_mismatches,
)

pytestmark = pytest.mark.slow


@pytest.fixture(params=VARIANT_NAMES)
def variant(request):
    request.node.user_properties.append(("check", "conversion"))
    return request.param


def _config(folder):
    from transformers import TimesformerConfig

    return TimesformerConfig.from_pretrained(folder)


def test_key_coverage_is_complete(variant, artifacts, record_property):
    folder = artifacts.converted(variant)
    expected = expected_tensors(_config(folder))

    with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
        written = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    record_property("key_coverage", f"{len(set(written) & set(expected))}/{len(expected)}")

    missing, unexpected = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    assert not missing and not unexpected, f"{variant}: missing {missing}, unexpected {unexpected}"
    wrong = {key: (shape, expected[key][0]) for key, shape in written.items() if shape != expected[key][0]}
    assert not wrong, f"{variant}: shape mismatches {wrong}"


def test_config_has_the_native_shape(variant, artifacts):
    declared = VARIANTS[variant]

    config = _config(artifacts.converted(variant))

    assert (config.num_frames, config.image_size, config.num_labels) == (
        declared.num_frames,
        declared.image_size,
        declared.num_labels,
    )
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.attention_type == "divided_space_time"


def test_preprocessor_uses_the_original_normalization_and_native_crop(variant, artifacts):
    size = VARIANTS[variant].image_size

    settings = json.loads((artifacts.converted(variant) / PREPROCESSOR_NAME).read_text())

    assert settings["image_mean"] == list(ORIGINAL_MEAN) and settings["image_std"] == list(ORIGINAL_STD)
    assert settings["size"] == {"shortest_edge": size}
    assert settings["crop_size"] == {"height": size, "width": size}


def test_safetensors_round_trip_is_bit_identical(variant, artifacts):
    source = rename_state_dict(read_state_dict(artifacts.checkpoint(variant)))

    assert roundtrip_mismatches(artifacts.converted(variant), source) == []


def test_transformers_loads_the_folder(variant, artifacts):
    from transformers import TimesformerForVideoClassification

    folder = artifacts.converted(variant)
    model = TimesformerForVideoClassification.from_pretrained(folder)

    with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
        probe = "timesformer.embeddings.time_embeddings"
        assert torch.equal(model.state_dict()[probe], handle.get_tensor(probe))
    assert json.loads((folder / CONFIG_NAME).read_text())["model_type"] == "timesformer"


def test_logits_and_hidden_states_match_the_reference_at_native_shape(variant, artifacts, record_property):
    actual = artifacts.converted_outputs(variant)
    expected = artifacts.reference_outputs(variant)

    comparison = compare_outputs(actual, expected)

    record_property("max_abs_diff", max(comparison.max_abs_diff, comparison.max_hidden_diff))
    assert actual.logits.shape == (1, VARIANTS[variant].num_labels)
    assert len(actual.hidden_states) == FORWARD_BLOCKS + 1
    assert comparison.agrees(), (
        f"{variant}: max |diff| logits {comparison.max_abs_diff:.3e}, hidden states {comparison.max_hidden_diff:.3e} "
        f"> {FORWARD_ATOL}; first divergence: {comparison.divergence}"
    )
