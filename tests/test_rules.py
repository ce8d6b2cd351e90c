"""Every rename rule on its own, the rule table as a whole, and prefix stripping."""

import pytest

from timesformer_convert.config import DIVIDED, JOINT, SPACE_ONLY, ModelShape
from timesformer_convert.errors import RuleError
from timesformer_convert.reference import original_layout
from timesformer_convert.rules import RULES, Rule, invert_keys, match_rule, rename_keys, rules_used, strip_prefixes

# One example per rule: an original key as the trainer writes it (without prefix) and its transformers name.
EXAMPLES = {
    "cls_token": ("cls_token", "timesformer.embeddings.cls_token"),
    "position_embedding": ("pos_embed", "timesformer.embeddings.position_embeddings"),
    "time_embedding": ("time_embed", "timesformer.embeddings.time_embeddings"),
    "patch_projection": ("patch_embed.proj.weight", "timesformer.embeddings.patch_embeddings.projection.weight"),
    "spatial_norm": ("blocks.3.norm1.bias", "timesformer.encoder.layer.3.layernorm_before.bias"),
    "spatial_qkv": ("blocks.0.attn.qkv.weight", "timesformer.encoder.layer.0.attention.attention.qkv.weight"),
    "spatial_projection": ("blocks.11.attn.proj.bias", "timesformer.encoder.layer.11.attention.output.dense.bias"),
    "temporal_norm": ("blocks.2.temporal_norm1.weight", "timesformer.encoder.layer.2.temporal_layernorm.weight"),
    "temporal_qkv": (
        "blocks.5.temporal_attn.qkv.bias",
        "timesformer.encoder.layer.5.temporal_attention.attention.qkv.bias",
    ),
    "temporal_projection": (
        "blocks.7.temporal_attn.proj.weight",
        "timesformer.encoder.layer.7.temporal_attention.output.dense.weight",
    ),
    "temporal_fc": ("blocks.10.temporal_fc.weight", "timesformer.encoder.layer.10.temporal_dense.weight"),
    "mlp_norm": ("blocks.4.norm2.weight", "timesformer.encoder.layer.4.layernorm_after.weight"),
    "mlp_fc1": ("blocks.6.mlp.fc1.bias", "timesformer.encoder.layer.6.intermediate.dense.bias"),
    "mlp_fc2": ("blocks.9.mlp.fc2.weight", "timesformer.encoder.layer.9.output.dense.weight"),
    "final_norm": ("norm.weight", "timesformer.layernorm.weight"),
    "head": ("head.bias", "classifier.bias"),
}

RULES_BY_NAME = {rule.name: rule for rule in RULES}


def _shape(attention_type: str, depth: int = 12) -> ModelShape:
    return ModelShape(768, depth, 12, 3072, None if attention_type == SPACE_ONLY else 8, 224, 16, 400, attention_type)


def test_every_rule_has_an_example():
    assert sorted(EXAMPLES) == sorted(RULES_BY_NAME)


def test_rule_names_are_unique():
    assert len(RULES_BY_NAME) == len(RULES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rule_renames_its_example(name):
    source, target = EXAMPLES[name]

    rule, renamed = match_rule(source)

    assert rule.name == name
    assert renamed == target


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rule_inverts_its_example(name):
    source, target = EXAMPLES[name]

    assert RULES_BY_NAME[name].invert(target) == source


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rule_ignores_other_rules_examples(name):
    rule = RULES_BY_NAME[name]

    for other, (source, _) in EXAMPLES.items():
        if other != name:
            assert rule.apply(source) is None, f"{name} also matches {other}'s key {source!r}"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_rule_matches_whole_segments_only(name):
    source, _ = EXAMPLES[name]
    rule = RULES_BY_NAME[name]

    for mangled in (f"x{source}", f"{source}x", f"encoder.{source}", f"{source}.extra", source.replace(".", "_")):
        if mangled != source:
            assert rule.apply(mangled) is None, f"{name} matched {mangled!r}"


def test_block_index_must_be_a_number():
    with pytest.raises(RuleError, match="blocks.x.norm1.weight"):
        match_rule("blocks.x.norm1.weight")
    with pytest.raises(RuleError, match="blocks.01.norm1.weight"):
        match_rule("blocks.01.norm1.weight")


def test_every_rule_fires_on_the_divided_layout():
    keys = original_layout(_shape(DIVIDED))

    counts = rules_used(keys)

    assert [name for name, count in counts.items() if count == 0] == []


@pytest.mark.parametrize(
    "attention_type, unused",
    [
        (DIVIDED, set()),
        (JOINT, {"temporal_norm", "temporal_qkv", "temporal_projection", "temporal_fc"}),
        (SPACE_ONLY, {"temporal_norm", "temporal_qkv", "temporal_projection", "temporal_fc", "time_embedding"}),
    ],
)
def test_rules_used_per_attention_type(attention_type, unused):
    counts = rules_used(original_layout(_shape(attention_type, depth=2)))

    assert {name for name, count in counts.items() if count == 0} == unused


def test_unknown_key_is_named():
    with pytest.raises(RuleError, match=r"'blocks\.0\.attn\.relative_position_bias' matches no rename rule"):
        rename_keys(["model.cls_token", "model.blocks.0.attn.relative_position_bias"])


def test_overlapping_rules_are_reported_by_name():
    overlapping = (*RULES, Rule("also_head", "head.{param}", "also.{param}"))

    with pytest.raises(RuleError, match=r"more than one rename rule \(head, also_head\)"):
        match_rule("head.weight", overlapping)


def test_mismatched_placeholders_are_refused_at_construction():
    with pytest.raises(ValueError, match="same placeholders"):
        Rule("broken", "blocks.{block}.norm1.{param}", "layer.norm.{param}")


@pytest.mark.parametrize(
    "key, expected",
    [
        ("model.blocks.0.norm1.weight", "blocks.0.norm1.weight"),
        ("module.blocks.0.norm1.weight", "blocks.0.norm1.weight"),
        ("module.model.head.bias", "head.bias"),
        ("model.module.head.bias", "head.bias"),
        ("head.bias", "head.bias"),
        ("blocks.0.model.norm1.weight", "blocks.0.model.norm1.weight"),
        ("head.model.bias", "head.model.bias"),
    ],
    ids=["model", "module", "module-then-model", "model-then-module", "none", "inner-model-kept", "inner-kept"],
)
def test_prefixes_are_stripped_only_at_the_start(key, expected):
    assert strip_prefixes(key) == expected


def test_inner_model_segment_is_not_mangled_into_a_valid_key():
    # The reference script replaced "model." anywhere in a key; here such a key is simply unknown.
    with pytest.raises(RuleError, match=r"'blocks\.0\.model\.norm1\.weight'"):
        rename_keys(["model.blocks.0.model.norm1.weight"])


def test_duplicate_after_prefix_stripping_is_refused():
    with pytest.raises(RuleError, match=r"'model\.head\.bias' and 'module\.head\.bias' are the same key"):
        rename_keys(["model.head.bias", "module.head.bias"])


@pytest.mark.parametrize("attention_type", [DIVIDED, JOINT, SPACE_ONLY])
def test_renaming_is_one_to_one_and_invertible(attention_type):
    keys = list(original_layout(_shape(attention_type)))

    renamed = rename_keys(f"model.{key}" for key in keys)
    inverted = invert_keys(renamed.values())

    assert len(set(renamed.values())) == len(keys)
    assert sorted(inverted.values()) == sorted(keys)
