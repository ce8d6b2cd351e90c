"""Converting an original TimeSformer checkpoint into a folder that transformers loads with ``from_pretrained``.

The steps: read the state dict safely (memory-mapped), read the model's shape from it, check it against a declared
variant, rename every key by the rule table, check the result against the keys and shapes of transformers' own model
built on the ``meta`` device (no weights are allocated), then stream the tensors to safetensors in a temporary folder
that is moved into place only once complete and re-read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import read_state_dict
from .config import ModelShape, check_variant, infer_shape
from .errors import ConversionError, CoverageError
from .rules import rename_keys, rules_used, strip_prefixes
from .safetensors_io import DTYPE_CODES, write_safetensors
from .variants import ORIGINAL_MEAN, ORIGINAL_STD, Variant

logger = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
OUTPUT_FILES = (WEIGHTS_NAME, CONFIG_NAME, PREPROCESSOR_NAME)


@dataclass
class ConversionReport:
    """What a conversion read, produced and checked."""

    source: str
    output: str | None
    shape: ModelShape
    variant: str | None
    num_tensors: int
    num_parameters: int
    rules_used: dict[str, int] = field(default_factory=dict)
    labels: str = "none"
    seconds: float = 0.0


def expected_tensors(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Keys, shapes and dtypes of transformers' ``TimesformerForVideoClassification`` for ``config``.

    The model is built on the ``meta`` device, so no memory is allocated for its weights.
    """
    from transformers import TimesformerForVideoClassification

    with torch.device("meta"):
        model = TimesformerForVideoClassification(config)
    return {key: (tuple(tensor.shape), tensor.dtype) for key, tensor in model.state_dict().items()}


def check_coverage(converted: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], source: str) -> None:
    """Raise CoverageError unless ``converted`` has exactly the ``expected`` keys, each with the expected shape.

    The message lists missing, unexpected and shape-mismatched keys, sorted, one kind per line, with counts.
    """
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(converted[key].shape)}, model {expected[key][0]}"
        for key in set(converted) & set(expected)
        if tuple(converted[key].shape) != expected[key][0]
    )
    if missing or unexpected or mismatched:
        lines = [f"{source}: the converted weights do not match transformers' TimesformerForVideoClassification"]
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {kind} ({len(keys)}): " + ", ".join(keys))
        raise CoverageError("\n".join(lines))


def rename_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an original state dict to transformers' layout. Tensors are not touched."""
    mapping = rename_keys(state_dict)
    return {mapping[key]: tensor for key, tensor in state_dict.items()}


def prepare_tensors(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Return tensors ready to write: floating point, contiguous, none sharing storage with another.

    Raises ConversionError naming the keys of non-floating-point tensors.
    """
    wrong_dtype = sorted(f"{key} ({t.dtype})" for key, t in state_dict.items() if t.dtype not in DTYPE_CODES)
    if wrong_dtype:
        raise ConversionError(f"{source}: weights must be floating point; these are not: {', '.join(wrong_dtype)}")
    ready = {}
    seen_storage: set[tuple[int, int]] = set()
    for key, tensor in state_dict.items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if storage in seen_storage or not tensor.is_contiguous():
            logger.debug("copying %s (shared storage or non-contiguous)", key)
            tensor = tensor.contiguous().clone()
        seen_storage.add(storage)
        ready[key] = tensor
    return ready


def transformers_config(shape: ModelShape, variant: Variant | None, id2label: Mapping[int, str] | None):
    """The ``TimesformerConfig`` written beside the weights, with labels when they are known."""
    overrides = {}
    if id2label:
        labels = {int(index): str(label) for index, label in id2label.items()}
        overrides = {"id2label": labels, "label2id": {label: index for index, label in labels.items()}}
    config = shape.transformers_config(**overrides)
    if variant is not None:
        config.num_frames = variant.num_frames if shape.num_frames is None else shape.num_frames
    return config


def preprocessor_config(image_size: int) -> dict:
    """The image-processor settings of the original evaluation: resize the short side and center-crop to the native
    size, scale to [0, 1], normalize with the original training mean and std."""
    return {
        "image_processor_type": "VideoMAEImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 2,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(ORIGINAL_MEAN),
        "image_std": list(ORIGINAL_STD),
    }


def _check_written(folder: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(tensors):
            raise ConversionError(f"{folder / WEIGHTS_NAME}: written keys differ from the converted keys")
        for key in keys:
            if tuple(handle.get_slice(key).get_shape()) != tuple(tensors[key].shape):
                raise ConversionError(f"{folder / WEIGHTS_NAME}: {key} was written with the wrong shape")


def write_output(
    out_dir: Path,
    tensors: Mapping[str, torch.Tensor],
    config,
    image_size: int,
    metadata: Mapping[str, str],
    overwrite: bool = False,
) -> Path:
    """Write weights, config and preprocessor config to a temporary folder beside ``out_dir`` and move it into place.

    An existing ``out_dir`` is replaced only with ``overwrite``; until the new folder is complete the old one is left
    untouched. Raises FileExistsError (without writing anything) when ``out_dir`` exists and ``overwrite`` is false.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; pass --overwrite to replace it, or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_safetensors(staging / WEIGHTS_NAME, tensors, metadata={"format": "pt", **metadata})
        config.to_json_file(staging / CONFIG_NAME)
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_config(image_size), indent=2) + "\n")
        _check_written(staging, tensors)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, retired / "old")
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    variant: Variant | None = None,
    num_attention_heads: int | None = None,
    num_frames: int | None = None,
    id2label: Mapping[int, str] | None = None,
    source: str = "checkpoint",
):
    """Convert an in-memory original state dict. Returns ``(tensors, config, shape, rules_used)``, checked against
    transformers' model. Raises ConversionError (or a subclass) naming the file and keys on any problem."""
    if variant is not None and num_frames is None and not any(strip_prefixes(k) == "time_embed" for k in state_dict):
        num_frames = variant.num_frames
    shape = infer_shape(state_dict, num_attention_heads=num_attention_heads, num_frames=num_frames, source=source)
    if variant is not None:
        check_variant(shape, variant, source)

    renamed = rename_state_dict(state_dict)
    config = transformers_config(shape, variant, id2label)
    check_coverage(renamed, expected_tensors(config), source)
    tensors = prepare_tensors(renamed, source)

    counts = rules_used(strip_prefixes(key) for key in state_dict)
    return tensors, config, shape, counts


def convert_checkpoint(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    variant: Variant | None = None,
    num_attention_heads: int | None = None,
    num_frames: int | None = None,
    id2label: Mapping[int, str] | None = None,
    overwrite: bool = False,
    extra_metadata: Mapping[str, str] | None = None,
) -> ConversionReport:
    """Convert the checkpoint file ``source`` into the folder ``out_dir`` and return a report.

    Nothing is written unless every check passes. Raises ConversionError (or a subclass) for a bad checkpoint and
    FileExistsError when ``out_dir`` exists and ``overwrite`` is false.
    """
    started = time.perf_counter()
    source = Path(source)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; pass --overwrite to replace it, or choose another --out")

    state_dict = read_state_dict(source)
    tensors, config, shape, counts = convert_state_dict(
        state_dict, variant, num_attention_heads, num_frames, id2label, source=str(source)
    )
    metadata = {
        "converter_version": CONVERTER_VERSION,
        "source_file": source.name,
        "variant": variant.name if variant else "",
        **(extra_metadata or {}),
    }
    write_output(out_dir, tensors, config, shape.image_size, metadata, overwrite=overwrite)
    report = ConversionReport(
        source=str(source),
        output=str(out_dir),
        shape=shape,
        variant=variant.name if variant else None,
        num_tensors=len(tensors),
        num_parameters=sum(t.numel() for t in tensors.values()),
        rules_used=counts,
        labels="yes" if id2label else "none",
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "converted %s -> %s: %d tensors, %d parameters", source, out_dir, report.num_tensors, report.num_parameters
    )
    return report
