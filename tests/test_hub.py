"""Hub files (label maps, the spaghetti clip, published conversions) from a warm hub cache, offline.

Each test builds a hub cache in a temporary folder the way ``huggingface_hub`` lays it out
(``<type>s--<owner>--<name>/refs/main`` holding a commit, ``snapshots/<commit>/<file>``) and reads it with
``HF_HUB_OFFLINE=1``; nothing reaches the network.
"""

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.running import Forked
from timesformer_convert.errors import ClipError, ConversionError, DownloadError
from timesformer_convert.hub import (
    HUB_CACHE_VARIABLES,
    SPAGHETTI_FILE,
    SPAGHETTI_REPO,
    hub_cache_dir,
    hub_state_dict,
    read_clip_array,
    spaghetti_clip_file,
)
from timesformer_convert.variants import LABEL_REPO, VARIANTS
from timesformer_convert.video import native_pixel_values

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Put ``files`` into ``cache`` as huggingface_hub stores a downloaded revision of ``repo_id``."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def npy_bytes(array: np.ndarray, tmp_path: Path) -> bytes:
    path = tmp_path / "array.npy"
    np.save(path, array)
    return path.read_bytes()


@pytest.fixture
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(16, 36, 64, 3), dtype=np.uint8)


def test_the_spaghetti_clip_comes_from_a_warm_cache_offline(tmp_path, frames):
    hub_cache = tmp_path / "hub"
    populate_hub_cache(hub_cache, SPAGHETTI_REPO, {SPAGHETTI_FILE: npy_bytes(frames, tmp_path)}, "dataset")

    path = spaghetti_clip_file(cache_dir=hub_cache)
    clip = read_clip_array(path)

    assert path.is_relative_to(hub_cache)
    assert len(clip) == 16 and all(np.array_equal(a, b) for a, b in zip(clip, frames, strict=True))
    large = VARIANTS["timesformer-large-finetuned-k400"]
    assert tuple(native_pixel_values(clip, large).shape) == (1, 96, 3, 224, 224)


def test_a_hub_file_missing_from_the_cache_says_how_to_get_it(tmp_path):
    with pytest.raises(DownloadError, match="not in the Hugging Face hub cache") as error:
        spaghetti_clip_file(cache_dir=tmp_path / "empty")

    assert "pytest --real" in str(error.value) and "HF_HOME" in str(error.value)


def test_hub_home_and_offline_mode_come_from_the_environment(tmp_path, frames):
    home = tmp_path / "hf-home"
    labels = {str(i): f"class {i}" for i in range(400)}
    populate_hub_cache(home / "hub", LABEL_REPO, {"kinetics400-id2label.json": json.dumps(labels).encode()}, "dataset")
    populate_hub_cache(home / "hub", SPAGHETTI_REPO, {SPAGHETTI_FILE: npy_bytes(frames, tmp_path)}, "dataset")
    script = (
        "from timesformer_convert.labels import hub_label_file, read_label_file\n"
        "from timesformer_convert.hub import spaghetti_clip_file, read_clip_array\n"
        "from timesformer_convert.variants import VARIANTS\n"
        "labels = read_label_file(hub_label_file(VARIANTS['timesformer-base-finetuned-k400']), 400)\n"
        "print(labels[399], len(read_clip_array(spaghetti_clip_file())))\n"
    )
    # HF_HOME names the hub cache when the variables that come first are dropped.
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}

    result = Forked.python(script, env=env, drop=HUB_CACHE_VARIABLES).wait()

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["class", "399", "16"]


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"HF_HUB_CACHE": "/a/hub", "HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/a/hub"),
        ({"HUGGINGFACE_HUB_CACHE": "/a/old", "HF_HOME": "/b"}, "/a/old"),
        ({"HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/b/hub"),
        ({"XDG_CACHE_HOME": "/c"}, "/c/huggingface/hub"),
        ({"HOME": "/home/someone"}, "/home/someone/.cache/huggingface/hub"),
    ],
)
def test_the_hub_cache_folder_is_read_from_the_environment_when_used(environment, expected, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    assert hub_cache_dir() == Path(expected)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_the_published_conversion_is_read_from_the_cache(tmp_path, filename):
    variant = VARIANTS["timesformer-base-finetuned-ssv2"]
    tensors = {"timesformer.embeddings.cls_token": torch.randn(1, 1, 8), "classifier.bias": torch.randn(174)}
    saved = tmp_path / filename
    if filename.endswith(".safetensors"):
        save_file(tensors, saved)
    else:
        torch.save(tensors, saved)
    populate_hub_cache(tmp_path / "hub", variant.hub_id, {filename: saved.read_bytes()})

    loaded = hub_state_dict(variant, cache_dir=tmp_path / "hub")

    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)


def test_a_missing_published_conversion_names_both_files(tmp_path):
    with pytest.raises(DownloadError, match="model.safetensors.*pytorch_model.bin"):
        hub_state_dict(VARIANTS["timesformer-base-finetuned-ssv2"], cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((4, 8, 8), dtype=np.uint8), "expected (frames, height, width, 3)"),
        (np.zeros((4, 8, 8, 3), dtype=np.float32), "expected uint8"),
        (np.array([{"frames": 1}], dtype=object), "not a NumPy array file"),
    ],
    ids=["no-channels", "float", "pickled-object"],
)
def test_a_clip_array_that_is_not_frames_is_refused(tmp_path, array, fragment):
    path = tmp_path / "clip.npy"
    np.save(path, array, allow_pickle=True)

    with pytest.raises(ClipError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_clip_array(path)


# --- label maps from the hub cache, as `convert --variant` looks them up ------------------------------------------

K400 = VARIANTS["timesformer-base-finetuned-k400"]


def resolve_hub_labels(hub_cache: Path, monkeypatch):
    """What ``convert --variant`` (without --labels or --fetch-labels) makes of the hub cache ``hub_cache``."""
    from timesformer_convert.cli import _resolve_labels

    for name in HUB_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return _resolve_labels(SimpleNamespace(labels=None, fetch_labels=False), K400, K400.num_labels)


def test_a_label_map_missing_from_the_hub_cache_names_the_folder(tmp_path, monkeypatch, caplog):
    (tmp_path / "hub").mkdir()

    with caplog.at_level(logging.WARNING, logger="timesformer_convert"):
        assert resolve_hub_labels(tmp_path / "hub", monkeypatch) is None

    (warning,) = [record.getMessage() for record in caplog.records]
    assert f"{K400.label_file} not in the hub cache {tmp_path / 'hub'}" in warning
    assert "pass --labels FILE or --fetch-labels" in warning


def test_an_unreadable_hub_cache_folder_is_called_unreadable(tmp_path, monkeypatch, caplog):
    hub_cache = tmp_path / "hub"
    hub_cache.mkdir()
    access = os.access
    # Permissions alone cannot show this when the suite runs as root, which reads any folder.
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: Path(path) != hub_cache and access(path, mode))

    with caplog.at_level(logging.WARNING, logger="timesformer_convert"):
        assert resolve_hub_labels(hub_cache, monkeypatch) is None

    (warning,) = [record.getMessage() for record in caplog.records]
    assert f"cannot read the hub cache folder {hub_cache}" in warning
    assert "not in the hub cache" not in warning


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe"], ids=["not-json", "not-text"])
def test_a_damaged_cached_label_map_names_the_file_and_the_remedy(tmp_path, monkeypatch, data):
    snapshot = populate_hub_cache(tmp_path / "hub", LABEL_REPO, {K400.label_file: data}, "dataset")

    with pytest.raises(ConversionError) as refused:
        resolve_hub_labels(tmp_path / "hub", monkeypatch)

    message = str(refused.value)
    assert message.startswith(f"{snapshot / K400.label_file}: the label file is not valid JSON")
    assert "delete it" in message and "pass --labels FILE" in message
