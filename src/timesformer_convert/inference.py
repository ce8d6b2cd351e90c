"""Running a converted model the way the original ran.

transformers' TimeSformer takes clips as (batch, frames, channels, height, width) and reads the frame count and image
size from its config, so every forward pass must use the model's native shape. For ``space_only`` models it returns one
row of logits per frame; :func:`original_logits` gives the single row per clip that the original computes.
"""

from __future__ import annotations

import os

import torch

from .config import SPACE_ONLY


def load_converted(folder: str | os.PathLike):
    """Load a converted folder as ``TimesformerForVideoClassification`` in eval mode."""
    from transformers import TimesformerForVideoClassification

    return TimesformerForVideoClassification.from_pretrained(folder).eval()


def to_pixel_values(clip_bcthw: torch.Tensor) -> torch.Tensor:
    """Reorder an original-layout clip (batch, channels, frames, height, width) to transformers' layout."""
    return clip_bcthw.permute(0, 2, 1, 3, 4).contiguous()


def check_native_input(model, pixel_values: torch.Tensor) -> None:
    """Raise ValueError when ``pixel_values`` (batch, frames, channels, height, width) is not the model's native
    shape; a TimeSformer forward pass at any other shape is wrong or fails with an opaque reshape error."""
    config = model.config
    _, frames, channels, height, width = pixel_values.shape
    expected_frames = config.num_frames if config.attention_type != SPACE_ONLY else frames
    expected = (expected_frames, config.num_channels, config.image_size, config.image_size)
    if (frames, channels, height, width) != expected:
        raise ValueError(
            f"input of {frames} frames x {channels} x {height} x {width} does not match the model's native "
            f"{expected[0]} frames x {expected[1]} x {expected[2]} x {expected[3]}; resample the clip to that shape"
        )


@torch.no_grad()
def forward_with_states(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass returning the original's logits (see :func:`original_logits`) and the hidden states: the
    input of every encoder block, then the output of the last block (before the final norm)."""
    check_native_input(model, pixel_values)
    outputs = model(pixel_values=pixel_values, output_hidden_states=True)
    states = list(outputs.hidden_states)
    if model.config.attention_type != SPACE_ONLY:
        return outputs.logits, states

    batch, frames = pixel_values.shape[:2]
    tokens = states[-1].reshape(batch, frames, *states[-1].shape[1:]).mean(dim=1)
    return model.classifier(model.timesformer.layernorm(tokens)[:, 0]), states


@torch.no_grad()
def original_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits as the original TimeSformer computes them, one row per clip, from a converted model.

    For divided and joint space-time attention this is the model's own output. For ``space_only``, where transformers
    classifies every frame separately, the final encoder tokens are averaged over frames before the last layer norm
    and the head, as the original does. ``pixel_values`` is (batch, frames, channels, height, width) at the model's
    native shape. Returns a (batch, num_labels) tensor. Raises ValueError for any other input shape.
    """
    check_native_input(model, pixel_values)
    if model.config.attention_type != SPACE_ONLY:
        return model(pixel_values=pixel_values).logits
    return forward_with_states(model, pixel_values)[0]
