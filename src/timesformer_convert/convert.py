"""Converting an original TimeSformer checkpoint into a folder that transformers loads with ``from_pretrained``.

The steps: read the state dict safely (memory-mapped), read the model's shape from it, check it against a declared
variant, rename every key by the rule table, check the result against the keys and shapes of transformers' own model
built on the ``meta`` device (no weights are allocated), then stream the tensors to safetensors in a temporary folder
that is moved into place only once complete and re-read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import CONVERTER_VERSION
from .cache import umask_mode
from .checkpoint import read_state_dict
from .config import ModelShape, check_variant, infer_shape
from .errors import ConversionError, CoverageError, RuleError, first_few
from .rules import rename_keys, rules_used, strip_prefixes
from .safetensors_io import DTYPE_CODES, write_safetensors
from .variants import ORIGINAL_MEAN, ORIGINAL_STD, Variant

logger = logging.getLogger(__name__)

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


def check_coverage(
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple],
    source: str,
    origins: Mapping[str, str] | None = None,
) -> None:
    """Raise CoverageError unless ``converted`` has exactly the ``expected`` keys, each with the expected shape.

    The message lists missing, unexpected and shape-mismatched keys, sorted, one kind per line, with counts. With
    ``origins`` (converted key -> checkpoint key) unexpected and mismatched keys also name the checkpoint's key.
    """

    def named(key: str) -> str:
        origin = (origins or {}).get(key)
        return f"{key} (from {origin})" if origin else key

    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(named(key) for key in set(converted) - set(expected))
    mismatched = sorted(
        f"{named(key)}: checkpoint {tuple(converted[key].shape)}, model {expected[key][0]}"
        for key in set(converted) & set(expected)
        if tuple(converted[key].shape) != expected[key][0]
    )
    if missing or unexpected or mismatched:
        lines = [f"{source}: the converted weights do not match transformers' TimesformerForVideoClassification"]
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {kind} ({len(keys)}): " + ", ".join(keys))
        raise CoverageError("\n".join(lines))


def check_tensors(state_dict: Mapping, source: str) -> None:
    """Raise ConversionError naming every entry of ``state_dict`` that cannot be written as a weight: a key that is
    not a string, a value that is not a tensor, a sparse or quantized tensor, one without data (``meta`` device), or
    a dtype other than float32, float16, bfloat16 and float64."""
    problems = []
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            problems.append(f"{key!r} (a {type(key).__name__} key, not a string)")
        elif not isinstance(tensor, torch.Tensor):
            problems.append(f"{key} (a {type(tensor).__name__}, not a tensor)")
        elif tensor.layout != torch.strided:
            problems.append(f"{key} ({str(tensor.layout).removeprefix('torch.')} layout, not dense)")
        elif tensor.device.type == "meta":
            problems.append(f"{key} (no data: saved from the meta device)")
        elif tensor.dtype not in DTYPE_CODES:
            problems.append(f"{key} ({str(tensor.dtype).removeprefix('torch.')})")
    if problems:
        kinds = "/".join(str(dtype).removeprefix("torch.") for dtype in DTYPE_CODES)
        count = "1 entry is" if len(problems) == 1 else f"{len(problems)} entries are"
        raise ConversionError(f"{source}: {count} not dense {kinds} weights: {', '.join(sorted(problems))}")


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str, shown: int = 10) -> None:
    """Raise ConversionError naming the entries that hold NaN or infinite values.

    A model with such a weight produces NaN logits for every input; the checkpoint is damaged (a diverged run or a
    broken copy), and a converted folder would pass for a good one until it is run.
    """
    bad = []
    for key, tensor in state_dict.items():
        # A NaN or infinity anywhere makes the float64 sum non-finite, and finite float16/bfloat16/float32 values
        # cannot overflow a float64 sum: one cheap reduction decides, the per-element count is only for the message.
        if tensor.numel() and not bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
            finite = tensor.isfinite()
            bad.append(f"{key} ({tensor.numel() - int(finite.sum())} of {tensor.numel()})")
    if bad:
        raise ConversionError(
            f"{source}: {len(bad)} weight{'s hold' if len(bad) > 1 else ' holds'} NaN or infinite values: "
            f"{first_few(sorted(bad), shown)}; the checkpoint is damaged, convert a good copy of it"
        )


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
    config.architectures = ["TimesformerForVideoClassification"]  # what the hub's pipelines and model cards read
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
    """Re-read the written weights' header: the same keys and shapes as ``tensors``, and a file of the right length.

    Raises ConversionError naming the file otherwise.
    """
    from safetensors import safe_open

    path = folder / WEIGHTS_NAME
    try:
        with safe_open(path, framework="pt") as handle:
            keys = set(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    except Exception as e:  # safetensors raises its own error type for a file it cannot parse
        raise ConversionError(
            f"{path}: the written weights cannot be read back ({e}); nothing was moved into place"
        ) from e
    if keys != set(tensors):
        raise ConversionError(f"{path}: written keys differ from the converted keys; nothing was moved into place")
    wrong = sorted(key for key in keys if shapes[key] != tuple(tensors[key].shape))
    if wrong:
        raise ConversionError(
            f"{path}: written with the wrong shape: {', '.join(wrong)}; nothing was moved into place"
        )


STAGING_MARK = ".partial-"


def check_output(out_dir: str | os.PathLike, overwrite: bool = False, source: str | os.PathLike | None = None):
    """Refuse an output path whose replacement could lose something. Called before any work and again before writing.

    Raises FileExistsError when ``out_dir`` exists and ``overwrite`` is false. With ``overwrite``, raises
    ConversionError unless ``out_dir`` is a folder holding nothing but the files a conversion writes (or nothing),
    and neither ``source`` nor the current working folder.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        ancestor = next(parent for parent in out_dir.absolute().parents if parent.exists())
        if not ancestor.is_dir():
            raise ConversionError(f"{out_dir}: cannot be created, {ancestor} is not a folder; choose another --out")
        _check_can_write(out_dir, ancestor)
        return
    if not overwrite and not _empty_folder(out_dir):
        raise FileExistsError(f"{out_dir}: already exists; pass --overwrite to replace it, or choose another --out")

    refuse = "--overwrite replaces only an earlier output folder; remove it yourself or choose another --out"
    if out_dir.is_symlink() or not out_dir.is_dir():
        kind = "a symbolic link" if out_dir.is_symlink() else "a file"
        raise ConversionError(f"{out_dir}: is {kind}, not an output folder; {refuse}")
    target = out_dir.resolve()
    protected = {"the current folder": Path.cwd().resolve()}
    if source is not None:
        protected["the checkpoint"] = Path(source).resolve()
    for name, path in protected.items():
        if path == target or target in path.parents:
            raise ConversionError(f"{out_dir}: holds {name} ({path}); {refuse}")
    subfolders = sorted(entry.name for entry in out_dir.iterdir() if entry.is_dir())
    if subfolders:
        raise ConversionError(
            f"{out_dir}: holds folders ({first_few(subfolders)}), which a conversion never writes; {refuse}"
        )
    others = not_output_files(out_dir)
    if others:
        raise ConversionError(f"{out_dir}: holds files a conversion never writes ({first_few(others)}); {refuse}")
    _check_can_write(out_dir, out_dir.absolute().parent)


def _check_can_write(out_dir: Path, folder: Path) -> None:
    """Refuse, before any work rather than after it, an ``out_dir`` that cannot be written: the output is written
    beside it first, as ``.NAME.partial-XXXXXXXX``, so ``folder`` (its parent, or the nearest one that exists) must
    take new entries and that name must fit; the weights' writer needs a UTF-8 path."""
    try:
        str(out_dir.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise ConversionError(
            f"{out_dir}: the path is not valid UTF-8, and the weights cannot be written under it; choose another --out"
        ) from None
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        longest = 255
    name = len(os.fsencode(out_dir.name))
    added = len(f".{STAGING_MARK}") + 8  # the staging name's dot, mark and tempfile's 8 random characters
    if name + added > longest:
        raise ConversionError(
            f"{out_dir}: the name is too long to be written beside it first ({name} bytes, at most "
            f"{longest - added} here); choose a shorter --out"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(f"{out_dir}: cannot be written, {folder} is not writable; choose another --out")


def _empty_folder(path: Path) -> bool:
    """A folder (not a link to one) with nothing in it: made for the output beforehand, nothing to lose."""
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step with Linux's ``renameat2(RENAME_EXCHANGE)``, so that a reader (or a crash) never
    sees neither. Returns False where the system or file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _replace(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the complete ``staging`` folder to ``out_dir``, replacing an existing one (only with ``overwrite``) with
    as small a gap as the system allows: none where paths can be exchanged, else between two renames (the old folder
    then waits in a ``.NAME.old-*`` folder beside it). Without ``overwrite``, ``out_dir`` must be missing or empty
    when the rename happens: a plain rename refuses a folder that is not empty."""
    if not overwrite or not out_dir.exists() or _empty_folder(out_dir):
        try:
            os.replace(staging, out_dir)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another conversion into the same folder finished after the checks; its output stays.
            raise FileExistsError(
                f"{out_dir}: was created by another conversion while this one ran; pass --overwrite to replace it, "
                "or choose another --out"
            ) from e
    elif _exchange(staging, out_dir):
        # ``staging`` now holds the old output, for the caller to delete, unless something else was put in it while
        # this conversion ran: that is not an earlier output's, so it goes back untouched.
        added = not_output_files(staging)
        if added:
            _exchange(staging, out_dir)
            raise _changed_meanwhile(out_dir, added)
    else:
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, retired / "old")
        added = not_output_files(retired / "old")
        if added:
            os.replace(retired / "old", out_dir)
            retired.rmdir()
            raise _changed_meanwhile(out_dir, added)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            os.replace(retired / "old", out_dir)
            retired.rmdir()
            raise
        shutil.rmtree(retired, ignore_errors=True)


def not_output_files(folder: Path) -> list[str]:
    """Names in ``folder`` that a conversion does not write."""
    return [
        entry.name
        for entry in sorted(folder.iterdir())
        if entry.name not in OUTPUT_FILES or (entry.is_dir() and not entry.is_symlink())
    ]


def _changed_meanwhile(out_dir: Path, added: list[str]) -> ConversionError:
    return ConversionError(
        f"{out_dir}: {first_few(added)} appeared in it while this conversion ran, so it was left as it was and "
        "nothing was replaced; move them elsewhere, or choose another --out"
    )


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM off until the block ends, then deliver them as they would have been.

    Guards the few steps that put a finished output in place and delete the one it replaced: an interrupt there could
    otherwise leave the caller believing nothing was written. Python runs signal handlers in the main thread only, so
    elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda number, _frame: arrived.append(number))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


def leftover_staging(out_dir: Path) -> list[Path]:
    """Folders beside ``out_dir`` left by conversions into it that were killed before they finished."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    marks = (f".{out_dir.name}{STAGING_MARK}", f".{out_dir.name}.old-")
    return sorted(path for path in out_dir.parent.iterdir() if path.name.startswith(marks))


def write_output(
    out_dir: Path,
    tensors: Mapping[str, torch.Tensor],
    config,
    image_size: int,
    metadata: Mapping[str, str],
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
    on_complete: Callable[[], None] | None = None,
) -> Path:
    """Write weights, config and preprocessor config to a temporary folder beside ``out_dir`` and move it into place.

    The temporary folder is named ``.NAME.partial-*`` and becomes ``out_dir`` only once every file is written and the
    weights re-read; until then an existing ``out_dir`` is left untouched, and it is replaced only with ``overwrite``
    (see :func:`check_output`). A process killed part-way leaves its ``.NAME.partial-*`` folder behind: nothing reads
    it as output, and it is not deleted by later runs, which cannot tell it from the folder of a conversion still
    running; they log a warning naming it. Raises FileExistsError (without writing anything) when ``out_dir`` exists
    and ``overwrite`` is false, ConversionError when it must not be replaced (see :func:`check_output`, which is
    given ``source``).

    An interrupt (SIGINT or SIGTERM) while the output is moved into place is delivered once that is done, after
    ``on_complete`` is called: a caller can tell an interrupt that left the new output complete from one that left
    nothing written.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite, source)
    leftovers = leftover_staging(out_dir)
    if leftovers:
        logger.warning(
            "%d folder(s) left beside %s by interrupted conversions: %s; they are never used as output, delete them",
            len(leftovers),
            out_dir,
            ", ".join(path.name for path in leftovers),
        )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{STAGING_MARK}", dir=out_dir.parent))
    except OSError as e:
        raise ConversionError(
            f"{out_dir}: cannot write the output folder beside it "
            f"({e.strerror or e}: {e.filename or out_dir.parent}); choose another --out"
        ) from e
    try:
        staging.chmod(umask_mode(0o777))
        write_safetensors(staging / WEIGHTS_NAME, tensors, metadata={"format": "pt", **metadata})
        config.to_json_file(staging / CONFIG_NAME)
        (staging / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_config(image_size), indent=2) + "\n")
        _check_written(staging, tensors)
        with _signals_deferred():
            _replace(staging, out_dir, overwrite)
            if on_complete is not None:
                on_complete()
            shutil.rmtree(staging, ignore_errors=True)  # the output it replaced, if any
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
    check_tensors(state_dict, source)
    if variant is not None and num_frames is None and not any(strip_prefixes(k) == "time_embed" for k in state_dict):
        num_frames = variant.num_frames
    shape = infer_shape(state_dict, num_attention_heads=num_attention_heads, num_frames=num_frames, source=source)
    if shape.num_frames is None:
        # The config would otherwise say 8 frames, which a processor or pipeline then feeds the model.
        raise ConversionError(
            f"{source}: a space-only model has no time embedding to read its frame count from; pass --num-frames N "
            "(the frames per clip it was trained on)"
        )
    if variant is not None:
        check_variant(shape, variant, source)

    # Everything above reads shapes only; building the model's key table and copying tensors come after.
    try:
        mapping = rename_keys(state_dict)
    except RuleError as e:
        raise RuleError(f"{source}: {e}") from e
    renamed = {mapping[key]: tensor for key, tensor in state_dict.items()}
    config = transformers_config(shape, variant, id2label)
    check_coverage(renamed, expected_tensors(config), source, origins={target: key for key, target in mapping.items()})
    check_finite(state_dict, source)
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
    check_output(out_dir, overwrite, source)

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
    write_output(out_dir, tensors, config, shape.image_size, metadata, overwrite=overwrite, source=source)
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
