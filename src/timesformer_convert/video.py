"""Turning a video into ``pixel_values`` at a converted model's native shape.

1. Decode the first video stream with PyAV (``av``, in the ``video`` and ``test`` extras) into RGB frames.
2. Pick the model's frame count with :func:`sample_indices`: a clip of N frames sampled to T frames takes frame
   ``floor((2 i + 1) N / (2 T))`` for ``i = 0 .. T-1``, the frame under the centre of each of T equal segments of
   the clip. The indices increase, are distinct when N >= T, and repeat each frame about T / N times when N < T.
   Example: 132 frames to 8 gives 8, 24, 41, 57, 74, 90, 107, 123.
3. Preprocess each frame with transformers' ``VideoMAEImageProcessorPil`` (PIL, no torchvision) under exactly the
   settings written to ``preprocessor_config.json`` (:func:`timesformer_convert.convert.preprocessor_config`):
   resize the short side to the crop size (bilinear), centre-crop a square of that size, scale to [0, 1], normalize
   with mean 0.45 and std 0.225 per channel.

The result is a float32 tensor (1, frames, 3, size, size), transformers' layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .convert import preprocessor_config
from .errors import ClipError
from .variants import Variant

logger = logging.getLogger(__name__)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames out of ``total``, by the rule in the module docstring.

    Raises ValueError when either count is not positive.
    """
    if total <= 0 or num_frames <= 0:
        raise ValueError(f"cannot sample {num_frames} frames from a clip of {total}; both must be positive")
    return [((2 * index + 1) * total) // (2 * num_frames) for index in range(num_frames)]


def _open(path: Path):
    import av

    if not path.is_file():
        raise ClipError(f"{path}: no such video file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise ClipError(f"{path}: cannot be opened as a video ({e})") from e
    if not container.streams.video:
        container.close()
        raise ClipError(f"{path}: has no video stream")
    return container


def _decoded(path: Path):
    """Yield the decoded frames of ``path``'s first video stream; ClipError on a decoding failure."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from container.decode(stream)
    except av.FFmpegError as e:
        raise ClipError(f"{path}: the video cannot be decoded ({e})") from e
    finally:
        container.close()


def count_frames(path: str | os.PathLike) -> int:
    """The number of frames in ``path``'s first video stream, counted by decoding (container headers can be wrong).

    Raises ClipError when the file cannot be decoded or holds no frame.
    """
    total = sum(1 for _ in _decoded(Path(path)))
    if total == 0:
        raise ClipError(f"{path}: the video stream holds no frames")
    return total


def read_frames(path: str | os.PathLike, indices: Sequence[int] | None = None) -> list[np.ndarray]:
    """Decode frames of ``path`` as RGB uint8 arrays (height, width, 3): those at ``indices`` (in that order,
    repeats allowed), or all. Raises ClipError when the file cannot be decoded or an index is past its end."""
    path = Path(path)
    wanted = None if indices is None else set(indices)
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    for position, frame in enumerate(_decoded(path)):
        decoded = position + 1
        if wanted is None or position in wanted:
            frames[position] = frame.to_ndarray(format="rgb24")
    if indices is None:
        return [frames[position] for position in sorted(frames)]
    missing = sorted(set(indices) - set(frames))
    if missing:
        raise ClipError(f"{path}: has {decoded} decodable frames; frames {missing} are past its end")
    return [frames[position] for position in indices]


def sample_frames(frames: Sequence[np.ndarray], num_frames: int) -> list[np.ndarray]:
    """Pick ``num_frames`` of ``frames`` by :func:`sample_indices`."""
    return [frames[index] for index in sample_indices(len(frames), num_frames)]


def read_clip(path: str | os.PathLike, num_frames: int) -> list[np.ndarray]:
    """Decode ``num_frames`` frames of the video at ``path``, chosen by :func:`sample_indices`.

    Decodes twice (count, then keep the chosen frames), so a long video is never held in memory whole.
    """
    indices = sample_indices(count_frames(path), num_frames)
    logger.debug("%s: frames %s", path, indices)
    return read_frames(path, indices)


def image_processor(image_size: int):
    """transformers' ``VideoMAEImageProcessorPil`` with the settings written to ``preprocessor_config.json``."""
    from transformers import VideoMAEImageProcessorPil

    settings = {key: value for key, value in preprocessor_config(image_size).items() if key != "image_processor_type"}
    return VideoMAEImageProcessorPil(**settings)


def preprocess(frames: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """Resize, crop and normalize RGB uint8 frames to ``pixel_values`` (1, frames, 3, image_size, image_size)."""
    if not frames:
        raise ClipError("no frames to preprocess")
    bad = sorted({tuple(frame.shape) for frame in frames if frame.ndim != 3 or frame.shape[-1] != 3})
    if bad:
        raise ClipError(f"frames must be (height, width, 3) RGB arrays; got shapes {bad}")
    pixel_values = image_processor(image_size)(list(frames), return_tensors="pt")["pixel_values"]
    expected = (1, len(frames), 3, image_size, image_size)
    if tuple(pixel_values.shape) != expected:
        raise ClipError(f"the image processor returned shape {tuple(pixel_values.shape)}, expected {expected}")
    return pixel_values.to(torch.float32)


def native_pixel_values(frames: Sequence[np.ndarray], variant: Variant) -> torch.Tensor:
    """Frames of a whole clip, sampled to ``variant``'s frame count and preprocessed to its crop size."""
    return preprocess(sample_frames(frames, variant.num_frames), variant.image_size)


def video_pixel_values(path: str | os.PathLike, num_frames: int, image_size: int) -> torch.Tensor:
    """Decode, sample and preprocess the video at ``path`` to (1, num_frames, 3, image_size, image_size)."""
    return preprocess(read_clip(path, num_frames), image_size)
