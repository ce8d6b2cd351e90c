"""Video to native-shape ``pixel_values``: decoding with PyAV, the frame index rule, and the preprocessing route.

Synthetic videos are encoded by the tests with PyAV: lossless FFV1 in Matroska where pixel values must survive
exactly, H.264 in MP4 (what users have) where each frame's grey level identifies it. The real clip is read from
``--video-path`` / ``$TIMESFORMER_VIDEO`` (default ``../shared/clips/bigbuckbunny.mp4``), skipped when absent.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from timesformer_convert.convert import preprocessor_config
from timesformer_convert.errors import ClipError
from timesformer_convert.variants import ORIGINAL_MEAN, ORIGINAL_STD, VARIANTS
from timesformer_convert.video import (
    count_frames,
    image_processor,
    native_pixel_values,
    preprocess,
    read_clip,
    read_frames,
    sample_indices,
    video_pixel_values,
)

NATIVE_SHAPES = sorted({(v.num_frames, v.image_size) for v in VARIANTS.values()})


def write_video(path, frames, codec="ffv1", pix_fmt="bgr0", fps=25):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def grey_frames(count, height=36, width=64):
    """Frame i is a flat grey of level 8 i + 4, far enough apart to survive lossy coding."""
    return [np.full((height, width, 3), 8 * index + 4, dtype=np.uint8) for index in range(count)]


def frame_number(frame) -> int:
    return int(round((float(frame.mean()) - 4) / 8))


# --- the frame index rule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "num_frames", "expected"),
    [
        (132, 8, [8, 24, 41, 57, 74, 90, 107, 123]),
        (16, 8, [1, 3, 5, 7, 9, 11, 13, 15]),
        (16, 16, list(range(16))),
        (4, 8, [0, 0, 1, 1, 2, 2, 3, 3]),
        (1, 3, [0, 0, 0]),
        (10, 1, [5]),
    ],
)
def test_frame_indices_follow_the_documented_rule(total, num_frames, expected):
    assert sample_indices(total, num_frames) == expected


@given(total=st.integers(1, 5000), num_frames=st.integers(1, 200))
def test_frame_indices_are_centred_increasing_and_in_range(total, num_frames):
    indices = sample_indices(total, num_frames)

    assert len(indices) == num_frames
    assert all(0 <= index < total for index in indices)
    assert indices == sorted(indices)
    if total >= num_frames:
        assert len(set(indices)) == num_frames
    # Centred: the clip's first and last frames are left out equally, within one frame.
    assert abs(indices[0] - (total - 1 - indices[-1])) <= 1


@pytest.mark.parametrize(("total", "num_frames"), [(0, 8), (8, 0), (-1, 1)])
def test_sampling_needs_positive_counts(total, num_frames):
    with pytest.raises(ValueError, match="both must be positive"):
        sample_indices(total, num_frames)


# --- decoding --------------------------------------------------------------------------------------------------------


def test_lossless_video_decodes_to_the_exact_frames(tmp_path):
    frames = list(np.random.default_rng(0).integers(0, 256, size=(5, 36, 64, 3), dtype=np.uint8))
    path = write_video(tmp_path / "noise.mkv", frames)

    decoded = read_frames(path)

    assert count_frames(path) == 5
    assert len(decoded) == 5 and all(np.array_equal(a, b) for a, b in zip(decoded, frames, strict=True))
    assert decoded[0].dtype == np.uint8 and decoded[0].shape == (36, 64, 3)


def test_frames_are_picked_by_the_rule_from_an_h264_video(tmp_path):
    path = write_video(tmp_path / "grey.mp4", grey_frames(20), codec="libx264", pix_fmt="yuv420p")

    picked = read_clip(path, 8)

    assert [frame_number(frame) for frame in picked] == sample_indices(20, 8) == [1, 3, 6, 8, 11, 13, 16, 18]


def test_a_short_video_repeats_frames_to_the_native_count(tmp_path):
    path = write_video(tmp_path / "short.mkv", grey_frames(3))

    picked = read_clip(path, 8)

    assert [frame_number(frame) for frame in picked] == [0, 0, 0, 1, 1, 2, 2, 2]


def test_decoded_frames_and_the_video_path_give_the_same_input(tmp_path):
    frames = list(np.random.default_rng(2).integers(0, 256, size=(20, 36, 64, 3), dtype=np.uint8))
    path = write_video(tmp_path / "noise.mkv", frames)
    variant = VARIANTS["timesformer-base-finetuned-k400"]

    assert torch.equal(native_pixel_values(frames, variant), video_pixel_values(path, 8, 224))


def test_frames_past_the_end_are_named(tmp_path):
    path = write_video(tmp_path / "short.mkv", grey_frames(3))

    with pytest.raises(ClipError, match=r"has 3 decodable frames; frames \[5\] are past its end"):
        read_frames(path, [0, 5])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "no such video file"), (b"not a video at all", "cannot be opened as a video")],
    ids=["missing", "text"],
)
def test_what_is_not_a_video_is_refused(tmp_path, content, fragment):
    path = tmp_path / "clip.mp4"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(ClipError, match=fragment) as error:
        video_pixel_values(path, 8, 224)

    assert str(path) in str(error.value)


# --- preprocessing ---------------------------------------------------------------------------------------------------


def test_the_processor_uses_the_settings_written_beside_the_weights():
    settings = json.loads(image_processor(448).to_json_string())

    for key, value in preprocessor_config(448).items():
        if key != "image_processor_type":
            assert settings[key] == value, key


def test_a_converted_folders_preprocessor_config_gives_the_same_input(tmp_path):
    from transformers import VideoMAEImageProcessorPil

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(224)))
    frames = list(np.random.default_rng(1).integers(0, 256, size=(4, 72, 128, 3), dtype=np.uint8))

    loaded = VideoMAEImageProcessorPil.from_pretrained(tmp_path)

    assert torch.equal(loaded(frames, return_tensors="pt")["pixel_values"], preprocess(frames, 224))


@pytest.mark.parametrize("level", [0, 115, 255])
def test_a_flat_frame_is_normalized_with_the_original_mean_and_std(level):
    frames = [np.full((90, 160, 3), level, dtype=np.uint8)] * 2

    pixel_values = preprocess(frames, 224)

    expected = (level / 255 - ORIGINAL_MEAN[0]) / ORIGINAL_STD[0]
    assert pixel_values.dtype == torch.float32
    assert torch.allclose(pixel_values, torch.full_like(pixel_values, expected), atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(360, 640), (640, 360)], ids=["landscape", "portrait"])
def test_the_short_side_is_resized_and_the_centre_cropped(height, width):
    # Red margins of 100 px along the long side; a short-side resize and a centre crop leave only the green middle.
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[..., 1] = 255
    if width > height:
        frame[:, :100] = frame[:, -100:] = (255, 0, 0)
    else:
        frame[:100] = frame[-100:] = (255, 0, 0)

    pixel_values = preprocess([frame], 224)[0, 0]

    green, red = (1 - 0.45) / 0.225, (0 - 0.45) / 0.225
    assert torch.allclose(pixel_values[1], torch.full_like(pixel_values[1], green), atol=1e-5)
    assert torch.allclose(pixel_values[0], torch.full_like(pixel_values[0], red), atol=1e-5)


@pytest.mark.parametrize(("num_frames", "image_size"), NATIVE_SHAPES, ids=[f"{t}x{s}" for t, s in NATIVE_SHAPES])
def test_every_native_shape_is_produced(tmp_path, num_frames, image_size):
    path = write_video(tmp_path / "grey.mp4", grey_frames(12), codec="libx264", pix_fmt="yuv420p")

    pixel_values = video_pixel_values(path, num_frames, image_size)

    assert tuple(pixel_values.shape) == (1, num_frames, 3, image_size, image_size)


def test_frames_that_are_not_rgb_are_refused():
    with pytest.raises(ClipError, match=r"\(height, width, 3\)"):
        preprocess([np.zeros((32, 32), dtype=np.uint8)], 224)


# --- the real clip ---------------------------------------------------------------------------------------------------


def test_the_real_clip_is_decoded_whole(real_video):
    first = read_frames(real_video, [0])[0]

    assert count_frames(real_video) == 132
    assert first.shape == (720, 1280, 3) and first.dtype == np.uint8


@pytest.mark.parametrize(("num_frames", "image_size"), NATIVE_SHAPES, ids=[f"{t}x{s}" for t, s in NATIVE_SHAPES])
def test_the_real_clip_becomes_native_input(real_video, num_frames, image_size):
    pixel_values = video_pixel_values(real_video, num_frames, image_size)

    assert tuple(pixel_values.shape) == (1, num_frames, 3, image_size, image_size)
    assert torch.isfinite(pixel_values).all()
    low, high = (0 - 0.45) / 0.225, (1 - 0.45) / 0.225
    assert low - 1e-5 <= pixel_values.min() and pixel_values.max() <= high + 1e-5
    # Real footage: colour varies within a frame, and the picked frames are not all the same picture.
    assert pixel_values[0, 0].std() > 0.1
    assert (pixel_values[0, 0] - pixel_values[0, -1]).abs().mean() > 0.01
