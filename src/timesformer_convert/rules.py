"""Rename rules from the original TimeSformer state-dict layout to transformers' ``TimesformerForVideoClassification``.

The rules are data: one ordered table of named templates. A template is a dotted key in which ``{block}`` stands for
a block index and ``{param}`` for ``weight`` or ``bias``. Each template is compiled into a regular expression anchored
on the whole key, so a rule matches whole key segments only and never a substring inside a name. Because both sides
are templates, every rule can be applied backwards too, which the tests use to prove the mapping is one-to-one.

Prefixes added by training wrappers (``model.`` from the trainer, ``module.`` from DistributedDataParallel) are
removed by :func:`strip_prefixes` before the rules run, and only at the start of a key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import RuleError

WRAPPER_PREFIXES = ("module.", "model.")

_PLACEHOLDERS = {"block": r"(?P<block>0|[1-9][0-9]*)", "param": r"(?P<param>weight|bias)"}
_PLACEHOLDER_RE = re.compile(r"\{(block|param)\}")


def _compile(template: str) -> re.Pattern[str]:
    pieces = []
    position = 0
    for match in _PLACEHOLDER_RE.finditer(template):
        pieces.append(re.escape(template[position : match.start()]))
        pieces.append(_PLACEHOLDERS[match.group(1)])
        position = match.end()
    pieces.append(re.escape(template[position:]))
    return re.compile("".join(pieces))


@dataclass(frozen=True)
class Rule:
    """One rename: a key that fully matches ``source`` becomes ``target`` with the same placeholders filled in."""

    name: str
    source: str
    target: str
    _source_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _target_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        source_slots = sorted(_PLACEHOLDER_RE.findall(self.source))
        target_slots = sorted(_PLACEHOLDER_RE.findall(self.target))
        if source_slots != target_slots:
            raise ValueError(f"rule {self.name!r}: source and target must use the same placeholders")
        object.__setattr__(self, "_source_re", _compile(self.source))
        object.__setattr__(self, "_target_re", _compile(self.target))

    def apply(self, key: str) -> str | None:
        """Return the renamed key, or None when ``key`` does not fully match this rule's source."""
        match = self._source_re.fullmatch(key)
        return self.target.format(**match.groupdict()) if match else None

    def invert(self, key: str) -> str | None:
        """Return the original key for a converted ``key``, or None when it does not match this rule's target."""
        match = self._target_re.fullmatch(key)
        return self.source.format(**match.groupdict()) if match else None


_BLOCK = "blocks.{block}"
_LAYER = "timesformer.encoder.layer.{block}"

RULES: tuple[Rule, ...] = (
    Rule("cls_token", "cls_token", "timesformer.embeddings.cls_token"),
    Rule("position_embedding", "pos_embed", "timesformer.embeddings.position_embeddings"),
    Rule("time_embedding", "time_embed", "timesformer.embeddings.time_embeddings"),
    Rule("patch_projection", "patch_embed.proj.{param}", "timesformer.embeddings.patch_embeddings.projection.{param}"),
    Rule("spatial_norm", f"{_BLOCK}.norm1.{{param}}", f"{_LAYER}.layernorm_before.{{param}}"),
    Rule("spatial_qkv", f"{_BLOCK}.attn.qkv.{{param}}", f"{_LAYER}.attention.attention.qkv.{{param}}"),
    Rule("spatial_projection", f"{_BLOCK}.attn.proj.{{param}}", f"{_LAYER}.attention.output.dense.{{param}}"),
    Rule("temporal_norm", f"{_BLOCK}.temporal_norm1.{{param}}", f"{_LAYER}.temporal_layernorm.{{param}}"),
    Rule(
        "temporal_qkv",
        f"{_BLOCK}.temporal_attn.qkv.{{param}}",
        f"{_LAYER}.temporal_attention.attention.qkv.{{param}}",
    ),
    Rule(
        "temporal_projection",
        f"{_BLOCK}.temporal_attn.proj.{{param}}",
        f"{_LAYER}.temporal_attention.output.dense.{{param}}",
    ),
    Rule("temporal_fc", f"{_BLOCK}.temporal_fc.{{param}}", f"{_LAYER}.temporal_dense.{{param}}"),
    Rule("mlp_norm", f"{_BLOCK}.norm2.{{param}}", f"{_LAYER}.layernorm_after.{{param}}"),
    Rule("mlp_fc1", f"{_BLOCK}.mlp.fc1.{{param}}", f"{_LAYER}.intermediate.dense.{{param}}"),
    Rule("mlp_fc2", f"{_BLOCK}.mlp.fc2.{{param}}", f"{_LAYER}.output.dense.{{param}}"),
    Rule("final_norm", "norm.{param}", "timesformer.layernorm.{param}"),
    Rule("head", "head.{param}", "classifier.{param}"),
)


def strip_prefixes(key: str, prefixes: Iterable[str] = WRAPPER_PREFIXES) -> str:
    """Remove wrapper prefixes (``module.``, ``model.``, in any nesting) from the start of ``key`` only."""
    prefixes = tuple(prefixes)
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def match_rule(key: str, rules: Iterable[Rule] = RULES) -> tuple[Rule, str]:
    """Return the one rule that renames ``key`` (already stripped of prefixes) and the new key.

    Raises RuleError when no rule or more than one rule matches.
    """
    hits = [(rule, renamed) for rule in rules if (renamed := rule.apply(key)) is not None]
    if not hits:
        raise RuleError(
            f"key {key!r} matches no rename rule: it is not part of the original TimeSformer layout; "
            "remove it from the checkpoint or add a rule for it"
        )
    if len(hits) > 1:
        names = ", ".join(rule.name for rule, _ in hits)
        raise RuleError(f"key {key!r} matches more than one rename rule ({names}); the rule table is ambiguous")
    return hits[0]


def rename_keys(keys: Iterable[str], rules: Iterable[Rule] = RULES) -> dict[str, str]:
    """Map every original key to its transformers key.

    Prefixes are stripped first. Raises RuleError naming the offending keys when keys match no rule (all of them are
    listed), when two source keys are the same after prefix stripping, or when two keys would be renamed to the same
    target.
    """
    rules = tuple(rules)
    renamed: dict[str, str] = {}
    stripped_from: dict[str, str] = {}
    produced_by: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        bare = strip_prefixes(key)
        if bare in stripped_from:
            raise RuleError(
                f"keys {stripped_from[bare]!r} and {key!r} are the same key {bare!r} once wrapper prefixes are "
                "removed; the checkpoint holds two copies of one weight, keep only one"
            )
        stripped_from[bare] = key
        if all(rule.apply(bare) is None for rule in rules):
            unknown.append(key)  # collected, so that the error lists every one
            continue
        _, target = match_rule(bare, rules)
        if target in produced_by:
            raise RuleError(f"keys {produced_by[target]!r} and {key!r} would both become {target!r}")
        produced_by[target] = key
        renamed[key] = target
    if len(unknown) == 1:
        bare = strip_prefixes(unknown[0])
        where = f" (checkpoint key {unknown[0]!r})" if bare != unknown[0] else ""
        raise RuleError(
            f"key {bare!r} matches no rename rule{where}: it is not part of the original TimeSformer layout; "
            "remove it from the checkpoint or add a rule for it"
        )
    if unknown:
        raise RuleError(
            f"{len(unknown)} keys match no rename rule: {', '.join(map(repr, sorted(unknown)))}; they are not part "
            "of the original TimeSformer layout; remove them from the checkpoint or add rules for them"
        )
    return renamed


def invert_keys(keys: Iterable[str], rules: Iterable[Rule] = RULES) -> dict[str, str]:
    """Map transformers keys back to original (prefix-free) keys. Raises RuleError for a key no rule produces."""
    inverted = {}
    for key in keys:
        hits = [source for rule in rules if (source := rule.invert(key)) is not None]
        if len(hits) != 1:
            raise RuleError(f"converted key {key!r} is produced by {len(hits)} rules, expected exactly one")
        inverted[key] = hits[0]
    return inverted


def rules_used(keys: Iterable[str], rules: Iterable[Rule] = RULES) -> dict[str, int]:
    """Count, per rule name, how many of the (prefix-free) ``keys`` it renames."""
    rules = tuple(rules)
    counts = {rule.name: 0 for rule in rules}
    for key in keys:
        rule, _ = match_rule(key, rules)
        counts[rule.name] += 1
    return counts


def as_table(rules: Iterable[Rule] = RULES) -> list[Mapping[str, str]]:
    """Return the rules as a list of plain dicts (name, source, target), for printing or JSON."""
    return [{"name": rule.name, "source": rule.source, "target": rule.target} for rule in rules]
