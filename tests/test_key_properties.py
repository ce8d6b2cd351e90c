"""Properties of the key mapping over generated models: random depths, attention types, sizes and stacks of wrapper
prefixes. For every one, renaming is one-to-one, produces exactly the keys and shapes transformers' model expects, and
the inverse rules give the original keys back; a ``model.`` that is not a leading prefix is never stripped.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timesformer_convert.config import ATTENTION_TYPES, SPACE_ONLY, ModelShape, infer_shape
from timesformer_convert.convert import convert_state_dict, expected_tensors
from timesformer_convert.errors import RuleError
from timesformer_convert.reference import original_layout
from timesformer_convert.rules import WRAPPER_PREFIXES, invert_keys, rename_keys, strip_prefixes

# Each example builds transformers' model on the meta device; a few dozen keep the file to seconds on two cores.
EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes(draw) -> ModelShape:
    attention_type = draw(st.sampled_from(ATTENTION_TYPES))
    heads = draw(st.sampled_from([1, 2, 4]))
    return ModelShape(
        hidden_size=heads * draw(st.sampled_from([8, 16])),
        num_hidden_layers=draw(st.integers(1, 16)),
        num_attention_heads=heads,
        intermediate_size=draw(st.sampled_from([16, 48, 64])),
        num_frames=None if attention_type == SPACE_ONLY else draw(st.integers(1, 12)),
        image_size=16 * draw(st.integers(1, 4)),
        patch_size=16,
        num_labels=draw(st.integers(1, 12)),
        attention_type=attention_type,
    )


prefix_stacks = st.lists(st.sampled_from(WRAPPER_PREFIXES), max_size=4).map("".join)


def transformers_layout(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    config = shape.transformers_config()
    return {key: size for key, (size, _) in expected_tensors(config).items()}


@EXAMPLES
@given(shape=shapes(), prefix=prefix_stacks)
def test_renaming_is_one_to_one_complete_and_invertible(shape, prefix):
    layout = original_layout(shape)
    keys = [prefix + key for key in layout]

    renamed = rename_keys(keys)

    # one-to-one: every source key has its own target
    assert sorted(renamed) == sorted(keys)
    assert len(set(renamed.values())) == len(keys)
    # complete: exactly the keys of transformers' model, each with the tensor shape it expects
    expected = transformers_layout(shape)
    assert sorted(renamed.values()) == sorted(expected)
    assert {renamed[prefix + key]: size for key, size in layout.items()} == expected
    # invertible: the inverse rules give back each original key (without its wrapper prefixes)
    inverted = invert_keys(renamed.values())
    assert {inverted[target]: source for source, target in renamed.items()} == {key: prefix + key for key in layout}


@EXAMPLES
@given(shape=shapes(), prefix=prefix_stacks)
def test_the_converter_reads_the_shape_back_and_covers_every_key(shape, prefix):
    one = torch.ones(())
    state_dict = {prefix + key: one.expand(size) for key, size in original_layout(shape).items()}
    frames = shape.num_frames if shape.attention_type != SPACE_ONLY else 3

    tensors, config, read, _ = convert_state_dict(
        state_dict, num_attention_heads=shape.num_attention_heads, num_frames=frames
    )

    assert read == (shape if shape.num_frames is not None else ModelShape(**{**shape.__dict__, "num_frames": 3}))
    assert infer_shape(state_dict, num_attention_heads=shape.num_attention_heads, num_frames=frames) == read
    assert {key: tuple(t.shape) for key, t in tensors.items()} == transformers_layout(read)
    assert config.attention_type == shape.attention_type and config.num_hidden_layers == shape.num_hidden_layers


@EXAMPLES
@given(shape=shapes(), prefix=prefix_stacks, data=st.data())
def test_a_wrapper_name_inside_a_key_is_never_stripped(shape, prefix, data):
    layout = list(original_layout(shape))
    victim = data.draw(st.sampled_from(layout))
    segments = victim.split(".")
    at = data.draw(st.integers(1, len(segments)))  # after the first segment: not a leading prefix
    inner = data.draw(st.sampled_from(WRAPPER_PREFIXES)).rstrip(".")
    mangled = ".".join([*segments[:at], inner, *segments[at:]])
    keys = [prefix + key for key in layout if key != victim] + [prefix + mangled]

    assert strip_prefixes(prefix + mangled) == mangled
    with pytest.raises(RuleError, match="matches no rename rule") as error:
        rename_keys(keys)
    assert repr(mangled) in str(error.value)


@EXAMPLES
@given(shape=shapes(), first=prefix_stacks, second=prefix_stacks, data=st.data())
def test_one_weight_under_two_prefix_stacks_is_refused(shape, first, second, data):
    layout = list(original_layout(shape))
    twice = data.draw(st.sampled_from(layout))
    if first == second:
        second = "module." + second

    with pytest.raises(RuleError, match="are the same key") as error:
        rename_keys([first + key for key in layout] + [second + twice])

    assert repr(first + twice) in str(error.value) and repr(second + twice) in str(error.value)
