"""Reading a model's hyper-parameters from the tensor shapes of an original checkpoint.

Everything but the head count is visible in the shapes: hidden size (class token), depth (block indices), frames (time
embedding), image size (position embedding), patch size (patch projection), classes (head), MLP width (fc1) and the
attention type (temporal blocks present: divided; time embedding alone: joint; neither: space-only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import ConversionError, VariantMismatchError
from .rules import strip_prefixes
from .variants import Variant

DIVIDED, JOINT, SPACE_ONLY = "divided_space_time", "joint_space_time", "space_only"
ATTENTION_TYPES = (DIVIDED, JOINT, SPACE_ONLY)

# Up to a million blocks: a longer index is no block of a real model (and may not even convert to an int).
_BLOCK_RE = re.compile(r"blocks\.(0|[1-9][0-9]{0,5})\.")


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters of one TimeSformer, as read from a checkpoint."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_frames: int | None
    image_size: int
    patch_size: int
    num_labels: int
    attention_type: str

    def transformers_config(self, **overrides):
        """Build a ``TimesformerConfig`` for this shape; ``overrides`` are passed through (labels, for example)."""
        from transformers import TimesformerConfig

        return TimesformerConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            num_frames=self.num_frames if self.num_frames is not None else 8,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_labels=self.num_labels,
            attention_type=self.attention_type,
            layer_norm_eps=1e-6,
            qkv_bias=True,
            hidden_act="gelu",
            **overrides,
        )


def _require(state_dict: Mapping[str, torch.Tensor], key: str, source: str, layout: str) -> torch.Tensor:
    """The tensor at ``key``, checked to have as many dimensions as ``layout`` names (e.g. "(1, frames, hidden)"),
    none of them empty, since the model's shape is read from them."""
    if key not in state_dict:
        raise ConversionError(f"{source}: required key {key!r} is missing; this is not a complete TimeSformer model")
    tensor = state_dict[key]
    if tensor.ndim != layout.count(",") + 1 or 0 in tensor.shape:
        raise ConversionError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {layout}")
    return tensor


def _missing_blocks(blocks: list[int], shown: int = 10) -> str:
    """Describe the gaps in sorted block indices, listing at most ``shown`` of them (an index may be huge)."""
    present = set(blocks)
    count = blocks[-1] + 1 - len(blocks)
    first = [index for index in range(len(blocks) + shown) if index not in present][:shown]
    more = f" and {count - len(first)} more" if count > len(first) else ""
    return f"{count} blocks are missing ({', '.join(map(str, first))}{more})"


def infer_shape(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    num_frames: int | None = None,
    source: str = "checkpoint",
) -> ModelShape:
    """Read a ``ModelShape`` from an original state dict (keys may carry ``model.``/``module.`` prefixes).

    ``num_attention_heads`` defaults to hidden/64. ``num_frames`` is needed only for space-only models, which have no
    time embedding to read it from. Raises ConversionError naming the key when a shape is missing or inconsistent.
    """
    bare = {strip_prefixes(key): tensor for key, tensor in state_dict.items()}

    hidden = _require(bare, "cls_token", source, "(1, 1, hidden)").shape[-1]
    patch_weight = _require(bare, "patch_embed.proj.weight", source, "(hidden, channels, patch, patch)")
    if patch_weight.shape[-1] != patch_weight.shape[-2]:
        raise ConversionError(
            f"{source}: 'patch_embed.proj.weight' has shape {tuple(patch_weight.shape)}, "
            "expected (hidden, channels, patch, patch)"
        )
    patch = int(patch_weight.shape[-1])

    positions = _require(bare, "pos_embed", source, "(1, 1 + patches, hidden)").shape[1] - 1
    side = math.isqrt(positions)
    if side == 0 or side * side != positions:
        raise ConversionError(f"{source}: 'pos_embed' holds {positions} patch positions, which is not a square grid")

    head = _require(bare, "head.weight", source, "(classes, hidden)")
    blocks = sorted({int(m.group(1)) for key in bare if (m := _BLOCK_RE.match(key))})
    if not blocks:
        raise ConversionError(f"{source}: no transformer blocks ('blocks.N.*' keys) found")
    if blocks != list(range(len(blocks))):
        raise ConversionError(f"{source}: {_missing_blocks(blocks)}; block indices must run from 0 without gaps")
    fc1 = _require(bare, "blocks.0.mlp.fc1.weight", source, "(mlp, hidden)")

    has_time = "time_embed" in bare
    has_temporal = any(".temporal_" in key for key in bare)
    if has_temporal and not has_time:
        raise ConversionError(
            f"{source}: temporal attention blocks present but no 'time_embed'; the checkpoint is incomplete"
        )
    attention_type = DIVIDED if has_temporal else JOINT if has_time else SPACE_ONLY

    if has_time:
        read_frames = int(_require(bare, "time_embed", source, "(1, frames, hidden)").shape[1])
        if num_frames is not None and num_frames != read_frames:
            raise VariantMismatchError(
                f"{source}: the time embedding holds {read_frames} frames but {num_frames} were asked for"
            )
        num_frames = read_frames

    heads = num_attention_heads if num_attention_heads is not None else max(hidden // 64, 1)
    if heads <= 0 or hidden % heads:
        raise ConversionError(
            f"{source}: hidden size {hidden} is not divisible by {heads} attention heads; "
            "pass --num-attention-heads with a divisor of it"
        )

    return ModelShape(
        hidden_size=int(hidden),
        num_hidden_layers=len(blocks),
        num_attention_heads=int(heads),
        intermediate_size=int(fc1.shape[0]),
        num_frames=num_frames,
        image_size=side * patch,
        patch_size=patch,
        num_labels=int(head.shape[0]),
        attention_type=attention_type,
    )


def check_variant(shape: ModelShape, variant: Variant, source: str = "checkpoint") -> None:
    """Raise VariantMismatchError naming every field where the checkpoint's shape and the declared variant differ."""
    expected = {
        "num_frames": variant.num_frames,
        "image_size": variant.image_size,
        "num_labels": variant.num_labels,
        "hidden_size": variant.hidden_size,
        "num_hidden_layers": variant.num_hidden_layers,
        "attention_type": variant.attention_type,
    }
    wrong = [
        f"{field}: checkpoint {getattr(shape, field)}, {variant.name} declares {value}"
        for field, value in expected.items()
        if getattr(shape, field) != value
    ]
    if wrong:
        raise VariantMismatchError(
            f"{source}: does not match variant {variant.name} ({'; '.join(wrong)}); check that the file is that "
            "variant's checkpoint, or convert it without --variant"
        )
