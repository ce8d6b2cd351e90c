"""Proving a conversion right: synthetic checkpoints, safetensors round trips and forward comparisons.

These are the checks the test suite and ``timesformer-convert selfcheck`` run. A synthetic checkpoint is written by
the reference implementation in the original trainer's layout; converting it and comparing the converted model's
logits with the reference's on the variant's native input shape proves the rename rules and the config right
without any download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import ModelShape
from .convert import WEIGHTS_NAME
from .inference import forward_with_states, load_converted, to_pixel_values
from .reference import reference_model, synthetic_checkpoint
from .variants import Variant

logger = logging.getLogger(__name__)

# Logits of a 768-wide model accumulate float32 rounding differently in the two implementations; on the synthetic
# checkpoints the largest difference seen is about 2e-6. The oracle's small models must agree to 1e-5.
FORWARD_ATOL = 1e-4


def variant_shape(variant: Variant, num_hidden_layers: int | None = None) -> ModelShape:
    """The ``ModelShape`` a variant declares, optionally with fewer blocks (for quick forward passes)."""
    return ModelShape(
        hidden_size=variant.hidden_size,
        num_hidden_layers=num_hidden_layers or variant.num_hidden_layers,
        num_attention_heads=variant.num_attention_heads,
        intermediate_size=variant.intermediate_size,
        num_frames=variant.num_frames,
        image_size=variant.image_size,
        patch_size=variant.patch_size,
        num_labels=variant.num_labels,
        attention_type=variant.attention_type,
    )


def save_atomically(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name beside ``path`` and rename it into place, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def variant_seed(name: str) -> int:
    """A stable seed per variant, so that no two variants' synthetic checkpoints share weights: a mix-up between
    variants (one cached file reused for another) then changes every value."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def write_synthetic_checkpoint(shape: ModelShape, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a deterministic synthetic checkpoint for ``shape`` in the original trainer's layout."""
    return save_atomically(synthetic_checkpoint(shape, seed), path)


def native_clip(shape: ModelShape, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A deterministic normalized clip in the original layout (batch, channels, frames, height, width)."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch, 3, shape.num_frames, shape.image_size, shape.image_size)
    return (torch.rand(size, generator=generator) - 0.45) / 0.225


def roundtrip_mismatches(folder: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensor in ``folder``'s safetensors file is not bit-identical to ``tensors``; empty when all are."""
    from safetensors import safe_open

    wrong = []
    with safe_open(Path(folder) / WEIGHTS_NAME, framework="pt") as handle:
        if set(handle.keys()) != set(tensors):
            return sorted(set(handle.keys()) ^ set(tensors))
        for key, tensor in tensors.items():
            loaded = handle.get_tensor(key)
            if loaded.dtype != tensor.dtype or loaded.shape != tensor.shape or not torch.equal(loaded, tensor):
                wrong.append(key)
    return wrong


@dataclass
class ForwardOutputs:
    """Logits (one row per clip) and hidden states (input of every block, then the last block's output)."""

    logits: torch.Tensor
    hidden_states: list[torch.Tensor]

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {"logits": self.logits.contiguous()}
        tensors.update({f"hidden_states.{i}": state.contiguous() for i, state in enumerate(self.hidden_states)})
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ForwardOutputs:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        count = sum(key.startswith("hidden_states.") for key in tensors)
        return cls(tensors["logits"], [tensors[f"hidden_states.{i}"] for i in range(count)])


@dataclass
class ForwardComparison:
    """How far the converted model's outputs are from the reference's, and where they first diverge."""

    max_abs_diff: float
    max_hidden_diff: float
    first_divergent_block: int | None
    atol: float

    def agrees(self) -> bool:
        return self.max_abs_diff <= self.atol and self.max_hidden_diff <= self.atol

    @property
    def divergence(self) -> str:
        """Where the outputs first differ beyond tolerance, in words."""
        if self.first_divergent_block is None:
            return "no hidden state differs; the divergence is in the final norm or the head"
        if self.first_divergent_block < 0:
            return "the embeddings (patch, position or time embedding)"
        return f"block {self.first_divergent_block}"


def first_divergent_block(ours: list[torch.Tensor], theirs: list[torch.Tensor], atol: float) -> int | None:
    """Index of the first block whose output differs beyond ``atol`` (-1 for the embeddings), or None."""
    for index, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a.shape != b.shape or not (a - b).abs().max().item() <= atol:  # a NaN diverges too
            return index - 1
    return None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.shape == b.shape else float("inf")


def compare_outputs(actual: ForwardOutputs, expected: ForwardOutputs, atol: float = FORWARD_ATOL) -> ForwardComparison:
    """Compare logits and every hidden state of ``actual`` against ``expected``."""
    hidden = [_max_diff(a, b) for a, b in zip(actual.hidden_states, expected.hidden_states, strict=False)]
    if len(actual.hidden_states) != len(expected.hidden_states):
        hidden.append(float("inf"))
    return ForwardComparison(
        max_abs_diff=_max_diff(actual.logits, expected.logits),
        max_hidden_diff=max(hidden, default=0.0),
        first_divergent_block=first_divergent_block(actual.hidden_states, expected.hidden_states, atol),
        atol=atol,
    )


@torch.no_grad()
def reference_outputs(state_dict: dict[str, torch.Tensor], shape: ModelShape, clip: torch.Tensor) -> ForwardOutputs:
    """Run the reference implementation built from the original ``state_dict`` on ``clip`` (original layout)."""
    logits, states = reference_model(state_dict, shape)(clip, return_hidden_states=True)
    return ForwardOutputs(logits, states)


@torch.no_grad()
def converted_outputs(folder: str | os.PathLike, clip: torch.Tensor) -> ForwardOutputs:
    """Run the converted model in ``folder`` on ``clip`` (original layout, converted to transformers' layout)."""
    logits, states = forward_with_states(load_converted(folder), to_pixel_values(clip))
    return ForwardOutputs(logits, states)


def compare_forward(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    shape: ModelShape,
    clip: torch.Tensor,
    atol: float = FORWARD_ATOL,
) -> ForwardComparison:
    """Run the converted model in ``folder`` and the reference built from ``state_dict`` on ``clip`` and compare
    their logits and hidden states."""
    return compare_outputs(converted_outputs(folder, clip), reference_outputs(state_dict, shape, clip), atol)


def shallow(shape: ModelShape, num_hidden_layers: int) -> ModelShape:
    """The same model with only its first ``num_hidden_layers`` blocks."""
    return replace(shape, num_hidden_layers=min(num_hidden_layers, shape.num_hidden_layers))
