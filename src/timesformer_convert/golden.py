"""Golden values: recorded outputs of converted models, the input that produced them, and where they came from.

One small JSON file per variant and kind holds one record: the first logits of the clip's row and its top-5 classes,
the output shape, a fingerprint of every hidden state (the embeddings and each block's output), the input protocol
(clip, frame indices, resize, crop, mean, std, dtype), the tolerance, provenance (checksum of the source weights,
converter, torch and transformers versions, date) and whether the values are verified. Two kinds exist:

- ``synthetic``: the converted synthetic checkpoint of a variant (full width, first blocks) on a generated clip at
  the variant's native input. They run offline and catch numerical drift in every run.
- ``real``: a released checkpoint on the spaghetti clip the published logits were computed on.

A record is validated before it is compared: a protocol that disagrees with the variant's native input, an all-zero
placeholder slice or a malformed field is refused with a :class:`GoldenError` naming the file. Records are written
through a temporary file and an atomic rename while a lock is held, so parallel refreshes never lose or interleave a
write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from filelock import FileLock

from .config import ModelShape
from .convert import CONVERTER_VERSION, umask_mode
from .hub import SPAGHETTI_FILE, SPAGHETTI_REPO
from .inference import forward_with_states
from .rules import strip_prefixes
from .variants import ORIGINAL_MEAN, ORIGINAL_STD, Variant, get_variant
from .verify import compare_forward

logger = logging.getLogger(__name__)

KINDS = ("synthetic", "real")
# The seed compared its published logits at this tolerance; the goldens keep it.
DEFAULT_TOLERANCE = 1e-4
RECORDED_LOGITS = 8
TOP_K = 5
FINGERPRINT_VALUES = 5
# Published logits carry four decimals and only three of them exist; records written here carry more.
MIN_LOGITS = 3
SIGNIFICANT_DIGITS = 8
LOCK_TIMEOUT_SECONDS = 600
# Objects of numbers this long or shorter (a hidden-state fingerprint) are written on one line.
ONE_LINE_OBJECT = 160

SPAGHETTI_CLIP = f"spaghetti: {SPAGHETTI_REPO} {SPAGHETTI_FILE} (16 frames, uint8 RGB)"
SPAGHETTI_FRAMES = 16
SEED_FRAMES = 8
SEED_MEAN = (0.5, 0.5, 0.5)
SEED_STD = (0.5, 0.5, 0.5)
SYNTHETIC_CLIP = "synthetic: verify.native_clip(seed=0), uniform noise in [0, 1) normalized with mean and std"

REFRESH_HINT = "pytest --refresh-golden --golden-variant {variant}"
HEAD = "head (final norm and classifier)"


class GoldenError(ValueError):
    """A golden file is missing, unreadable or invalid; the message names the file and what to do."""


class GoldenMismatch(AssertionError):
    """A converted model's outputs differ from its golden record beyond the record's tolerance."""


@dataclass(frozen=True)
class InputProtocol:
    """How the clip a record was computed on was made: which frames, how resized and cropped, how normalized."""

    clip: str
    num_frames: int
    frame_indices: tuple[int, ...]
    resize: int | None
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: str = "float32"

    def as_dict(self) -> dict:
        return {
            "clip": self.clip,
            "num_frames": self.num_frames,
            "frame_indices": list(self.frame_indices),
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "dtype": self.dtype,
        }


def synthetic_protocol(variant: Variant) -> InputProtocol:
    """The input of synthetic goldens: ``verify.native_clip`` at the variant's native frames and crop."""
    return InputProtocol(
        clip=SYNTHETIC_CLIP,
        num_frames=variant.num_frames,
        frame_indices=tuple(range(variant.num_frames)),
        resize=None,
        crop=variant.image_size,
        mean=ORIGINAL_MEAN,
        std=ORIGINAL_STD,
    )


def spaghetti_protocol(variant: Variant) -> InputProtocol:
    """The input of real goldens: the spaghetti clip resized and cropped to the variant's native size, mean and std
    0.5. 8-frame models take the first 8 frames (the protocol of the published logits); others take frames spread
    evenly over the 16, each repeated when the model needs more (96 frames: every frame 6 times)."""
    frames = variant.num_frames
    if frames == SEED_FRAMES:
        indices = tuple(range(SEED_FRAMES))
    else:
        indices = tuple(index * SPAGHETTI_FRAMES // frames for index in range(frames))
    return InputProtocol(
        clip=SPAGHETTI_CLIP,
        num_frames=frames,
        frame_indices=indices,
        resize=variant.image_size,
        crop=variant.image_size,
        mean=SEED_MEAN,
        std=SEED_STD,
    )


def protocol_pixel_values(video, protocol: InputProtocol) -> torch.Tensor:
    """Turn ``video`` (frames, height, width, 3) uint8 RGB into (1, frames, 3, crop, crop) pixel values the way
    ``protocol`` says: pick the frames, resize the short side, center-crop, scale to [0, 1], normalize.

    Raises ValueError when the protocol asks for a frame the video does not have.
    """
    try:
        from transformers import VideoMAEImageProcessorPil as Processor
    except ImportError:
        from transformers import VideoMAEImageProcessor as Processor

    if max(protocol.frame_indices) >= len(video):
        raise ValueError(
            f"the protocol takes frame {max(protocol.frame_indices)} but the clip has {len(video)} frames; "
            f"give the 16-frame clip {SPAGHETTI_REPO}/{SPAGHETTI_FILE}"
        )
    processor = Processor(
        size={"shortest_edge": protocol.resize or protocol.crop},
        crop_size={"height": protocol.crop, "width": protocol.crop},
        image_mean=list(protocol.mean),
        image_std=list(protocol.std),
    )
    frames = [video[index] for index in protocol.frame_indices]
    return processor(frames, return_tensors="pt")["pixel_values"].to(getattr(torch, protocol.dtype))


@dataclass(frozen=True)
class StateFingerprint:
    """A few numbers that change when a hidden state changes: the class token's first values, mean and std."""

    name: str
    cls: tuple[float, ...]
    mean: float
    std: float

    def values(self) -> dict[str, float]:
        named = {f"cls[{index}]": value for index, value in enumerate(self.cls)}
        return {**named, "mean": self.mean, "std": self.std}

    def as_dict(self) -> dict:
        return {"name": self.name, "cls": list(self.cls), "mean": self.mean, "std": self.std}


def state_name(index: int) -> str:
    """Name of hidden state ``index``: 0 is the embeddings, ``k + 1`` the output of block ``k``."""
    return "embeddings" if index == 0 else f"block {index - 1}"


def describe_block(block: int | None) -> str:
    """Say where a divergence starts, given a block index as :func:`verify.first_divergent_block` returns it
    (-1 for the embeddings, None when every block agrees and only the logits differ)."""
    if block is None:
        return HEAD
    return state_name(block + 1)


def _rounded(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def fingerprint(index: int, state: torch.Tensor) -> StateFingerprint:
    """Fingerprint hidden state ``index`` of shape (1, tokens, hidden); statistics are taken in float64."""
    wide = state.detach().to(torch.float64)
    return StateFingerprint(
        name=state_name(index),
        cls=tuple(_rounded(value) for value in wide[0, 0, :FINGERPRINT_VALUES].tolist()),
        mean=_rounded(wide.mean().item()),
        std=_rounded(wide.std().item()),
    )


@dataclass
class Observation:
    """What one forward pass of a converted model produced: the logits and a fingerprint of every hidden state."""

    logits: torch.Tensor
    states: list[StateFingerprint]


@torch.no_grad()
def observe(model, pixel_values: torch.Tensor) -> Observation:
    """Run ``model`` on ``pixel_values`` (1, frames, channels, height, width) at its native shape, once, and return
    the logits as the original computes them with a fingerprint of every hidden state."""
    return observation_of(*forward_with_states(model, pixel_values))


def observation_of(logits: torch.Tensor, hidden_states: list[torch.Tensor]) -> Observation:
    """The golden's view of one forward pass: the logits and a fingerprint of every hidden state."""
    return Observation(logits, [fingerprint(index, state) for index, state in enumerate(hidden_states)])


def state_dict_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the weights: every key without trainer prefixes, sorted, with dtype, shape and bytes. The same
    weights in another checkpoint layout give the same checksum."""
    digest = hashlib.sha256()
    for key, tensor in sorted((strip_prefixes(key), tensor) for key, tensor in state_dict.items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def provenance(source: str, source_sha256: str | None) -> dict[str, str | None]:
    """Where a freshly computed record comes from: the source weights and the versions that computed it."""
    import transformers

    return {
        "source": source,
        "source_sha256": source_sha256,
        "converter": CONVERTER_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": date.today().isoformat(),
    }


PROVENANCE_KEYS = ("source", "source_sha256", "converter", "torch", "transformers", "date")


@dataclass(frozen=True)
class GoldenRecord:
    """One golden file's content. See the module docstring for the fields' meaning."""

    variant: str
    kind: str
    verified: bool
    logits: tuple[float, ...]
    top5: tuple[int, ...] | None
    output_shape: tuple[int, ...]
    protocol: InputProtocol
    provenance: dict[str, str | None]
    tolerance: float = DEFAULT_TOLERANCE
    num_hidden_layers: int | None = None
    hidden_states: tuple[StateFingerprint, ...] | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {
            "variant": self.variant,
            "kind": self.kind,
            "verified": self.verified,
            "note": self.note,
            "tolerance": self.tolerance,
            "output_shape": list(self.output_shape),
            "logits": list(self.logits),
            "top5": list(self.top5) if self.top5 is not None else None,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_states": [state.as_dict() for state in self.hidden_states] if self.hidden_states else None,
            "input": self.protocol.as_dict(),
            "provenance": dict(self.provenance),
        }

    def values(self) -> dict[str, float]:
        """Every compared number by name (logits and hidden-state fingerprints)."""
        named = {f"logits[{index}]": value for index, value in enumerate(self.logits)}
        for state in self.hidden_states or ():
            named.update({f"{state.name} {key}": value for key, value in state.values().items()})
        return named


def new_record(
    variant: Variant,
    kind: str,
    observation: Observation,
    protocol: InputProtocol,
    source: str,
    source_sha256: str | None,
    note: str,
    num_hidden_layers: int,
    tolerance: float = DEFAULT_TOLERANCE,
) -> GoldenRecord:
    """A verified record of ``observation``: the first logits, the top-5 classes and every hidden state."""
    row = observation.logits[0]
    return GoldenRecord(
        variant=variant.name,
        kind=kind,
        verified=True,
        logits=tuple(_rounded(value) for value in row[:RECORDED_LOGITS].tolist()),
        top5=tuple(row.topk(TOP_K).indices.tolist()),
        output_shape=tuple(observation.logits.shape),
        protocol=protocol,
        provenance=provenance(source, source_sha256),
        tolerance=tolerance,
        num_hidden_layers=num_hidden_layers,
        hidden_states=tuple(observation.states),
        note=note,
    )


# --- reading and validating ----------------------------------------------------------------------------------------

RECORD_KEYS = {
    "variant",
    "kind",
    "verified",
    "note",
    "tolerance",
    "output_shape",
    "logits",
    "top5",
    "num_hidden_layers",
    "hidden_states",
    "input",
    "provenance",
}
PROTOCOL_KEYS = {"clip", "num_frames", "frame_indices", "resize", "crop", "mean", "std", "dtype"}
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value, name: str, problems: list[str]) -> tuple[float, ...] | None:
    if not isinstance(value, list) or not all(_is_number(item) for item in value):
        problems.append(f"{name} must be a list of finite numbers")
        return None
    return tuple(float(item) for item in value)


def _ints(value, name: str, problems: list[str]) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(item) for item in value):
        problems.append(f"{name} must be a list of whole numbers")
        return ()
    return tuple(value)


def _protocol(data, variant: Variant, problems: list[str]) -> InputProtocol | None:
    if not isinstance(data, dict):
        problems.append("input must be an object")
        return None
    if set(data) != PROTOCOL_KEYS:
        problems.append(f"input must have exactly the keys {sorted(PROTOCOL_KEYS)}, has {sorted(data)}")
        return None
    indices = _ints(data["frame_indices"], "input.frame_indices", problems)
    mean = _numbers(data["mean"], "input.mean", problems) or ()
    std = _numbers(data["std"], "input.std", problems) or ()
    frames, crop, resize = data["num_frames"], data["crop"], data["resize"]
    if not (_is_int(frames) and _is_int(crop) and (resize is None or _is_int(resize))):
        problems.append("input.num_frames and input.crop must be whole numbers, input.resize a whole number or null")
        return None
    if frames != variant.num_frames or crop != variant.image_size:
        problems.append(
            f"input is {frames} frames at {crop} px but {variant.name} takes {variant.num_frames} frames at "
            f"{variant.image_size} px: a record made at another input cannot be compared"
        )
    if len(indices) != frames or any(index < 0 for index in indices):
        problems.append(f"input.frame_indices must hold {frames} indices >= 0, holds {len(indices)}")
    if resize is not None and resize < crop:
        problems.append(f"input.resize {resize} is smaller than the crop {crop}")
    if len(mean) != 3 or len(std) != 3 or any(value <= 0 for value in std):
        problems.append("input.mean and input.std must hold 3 values each, std > 0")
    if data["dtype"] not in FLOAT_DTYPES or not isinstance(data["clip"], str) or not data["clip"]:
        problems.append(f"input.dtype must be one of {', '.join(FLOAT_DTYPES)} and input.clip a description")
    return InputProtocol(data["clip"], frames, indices, resize, crop, mean, std, data["dtype"])


def _fingerprints(data, problems: list[str]) -> tuple[StateFingerprint, ...] | None:
    if data is None:
        return None
    if not isinstance(data, list):
        problems.append("hidden_states must be a list or null")
        return None
    states = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or set(item) != {"name", "cls", "mean", "std"}:
            problems.append(f"hidden_states[{index}] must have exactly the keys cls, mean, name, std")
            continue
        cls = _numbers(item["cls"], f"hidden_states[{index}].cls", problems) or ()
        if not (_is_number(item["mean"]) and _is_number(item["std"])):
            problems.append(f"hidden_states[{index}].mean and .std must be finite numbers")
            continue
        if item["name"] != state_name(index):
            problems.append(f"hidden_states[{index}] must be named {state_name(index)!r}, is {item['name']!r}")
        states.append(StateFingerprint(item["name"], cls, float(item["mean"]), float(item["std"])))
    return tuple(states)


def record_from_dict(data, path: Path, variant: Variant, kind: str) -> GoldenRecord:
    """Validate the parsed JSON of ``path`` as the ``kind`` record of ``variant``. Raises GoldenError naming the
    file and every problem: wrong keys or types, an all-zero placeholder slice, a protocol that disagrees with the
    variant's native input, an unverified record without a note."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise GoldenError(f"{path}: a golden file holds one JSON object; {_fix(variant.name)}")
    if set(data) != RECORD_KEYS:
        missing, unknown = sorted(RECORD_KEYS - set(data)), sorted(set(data) - RECORD_KEYS)
        raise GoldenError(f"{path}: missing keys {missing}, unknown keys {unknown}; {_fix(variant.name)}")

    if data["variant"] != variant.name or data["kind"] != kind:
        problems.append(f"holds the {data['kind']} record of {data['variant']!r}, expected {kind} of {variant.name}")
    logits = _numbers(data["logits"], "logits", problems)
    if logits is not None and len(logits) < MIN_LOGITS:
        problems.append(f"logits must hold at least {MIN_LOGITS} values")
    elif logits and not any(logits):
        problems.append("logits are an all-zero placeholder, not recorded values")
    output_shape = _ints(data["output_shape"], "output_shape", problems)
    if output_shape and output_shape != (1, variant.num_labels):
        problems.append(f"output_shape {list(output_shape)} is not [1, {variant.num_labels}]")
    top5 = None
    if data["top5"] is not None:
        top5 = _ints(data["top5"], "top5", problems)
        if len(top5) != TOP_K or any(not 0 <= index < variant.num_labels for index in top5):
            problems.append(f"top5 must hold {TOP_K} class indices below {variant.num_labels}")
    tolerance = data["tolerance"]
    if not _is_number(tolerance) or tolerance <= 0:
        problems.append("tolerance must be a positive number")
    if not isinstance(data["verified"], bool):
        problems.append("verified must be true or false")
    if not isinstance(data["note"], str) or (data["verified"] is False and not data["note"].strip()):
        problems.append("note must be text, and an unverified record must say in it why")
    layers = data["num_hidden_layers"]
    if layers is not None and (not _is_int(layers) or layers < 1):
        problems.append("num_hidden_layers must be a positive whole number or null")
    states = _fingerprints(data["hidden_states"], problems)
    if states is not None and _is_int(layers) and len(states) != layers + 1:
        problems.append(f"hidden_states must hold {layers + 1} entries (embeddings and {layers} blocks)")
    record_provenance = data["provenance"]
    if not isinstance(record_provenance, dict) or set(record_provenance) != set(PROVENANCE_KEYS):
        problems.append(f"provenance must have exactly the keys {list(PROVENANCE_KEYS)}")
    elif not all(value is None or isinstance(value, str) for value in record_provenance.values()):
        problems.append("provenance values must be text or null")
    protocol = _protocol(data["input"], variant, problems)

    if problems:
        raise GoldenError(f"{path}: {'; '.join(problems)}; {_fix(variant.name)}")
    return GoldenRecord(
        variant=variant.name,
        kind=kind,
        verified=data["verified"],
        logits=logits,
        top5=top5,
        output_shape=output_shape,
        protocol=protocol,
        provenance=dict(record_provenance),
        tolerance=float(tolerance),
        num_hidden_layers=layers,
        hidden_states=states,
        note=data["note"],
    )


def _fix(variant: str) -> str:
    return f"fix the file or record it again with `{REFRESH_HINT.format(variant=variant)}`"


def golden_path(root: str | os.PathLike, kind: str, variant: str) -> Path:
    """Where the ``kind`` record of ``variant`` lives under the golden folder ``root``."""
    if kind not in KINDS:
        raise ValueError(f"unknown golden kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return Path(root) / kind / f"{variant}.json"


def load_record(path: str | os.PathLike, variant: str, kind: str) -> GoldenRecord:
    """Read and validate the golden file ``path``. Raises GoldenError naming the file when it is missing, is not
    JSON, or is not a valid record of ``variant`` (see :func:`record_from_dict`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise GoldenError(
            f"{path}: no golden file for {variant}; record it with `{REFRESH_HINT.format(variant=variant)}` "
            "and commit it"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise GoldenError(f"{path}: cannot be read as a golden file ({why}); {_fix(variant)}") from e
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise GoldenError(f"{path}: not valid JSON ({e}); {_fix(variant)}") from e
    return record_from_dict(data, path, get_variant(variant), kind)


# --- writing ---------------------------------------------------------------------------------------------------------


def dumps(value, indent: int = 0) -> str:
    """JSON text for a record: one key per line, lists of numbers and small objects on one line, so that a refresh
    shows up as a few changed lines in a diff."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict) and value:
        flat = json.dumps(value)
        if indent > 0 and len(flat) <= ONE_LINE_OBJECT and not any(isinstance(item, dict) for item in value.values()):
            return flat
        items = [f"{inner}{json.dumps(key)}: {dumps(item, indent + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + dumps(item, indent + 1) for item in value) + f"\n{pad}]"
    return json.dumps(value)


def _lock_for(path: Path) -> FileLock:
    # Locks live outside the repository so that no lock file ever shows up beside the goldens.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "timesformer-convert-golden-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{key}.lock"), timeout=LOCK_TIMEOUT_SECONDS)


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.chmod(handle, umask_mode(0o666))
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass
class Refresh:
    """What :func:`write_record` replaced: the previous record (None when missing or invalid) and why."""

    path: Path
    record: GoldenRecord
    previous: GoldenRecord | None
    previous_state: str  # "missing", "invalid" or "valid"
    previous_problem: str = ""

    def largest_change(self) -> float | None:
        """Largest absolute change of a value both records hold; None when there was no valid previous record."""
        if self.previous is None:
            return None
        old, new = self.previous.values(), self.record.values()
        common = old.keys() & new.keys()
        return max((abs(old[name] - new[name]) for name in common), default=None)


def write_record(path: str | os.PathLike, record: GoldenRecord) -> Refresh:
    """Replace the golden file ``path`` with ``record``: under a lock, read what is there, then write a temporary
    file beside it and rename it into place. Returns what was replaced."""
    path = Path(path)
    with _lock_for(path):
        try:
            previous, state, problem = load_record(path, record.variant, record.kind), "valid", ""
        except GoldenError as e:
            state = "missing" if not path.exists() else "invalid"
            previous, problem = None, str(e)
        _write_text_atomically(path, dumps(record.as_dict()) + "\n")
    logger.info("wrote golden %s (previously %s)", path, state)
    return Refresh(path, record, previous, state, problem)


# --- comparing -------------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """A record against an observation: every compared value, what else disagrees, and where it starts."""

    tolerance: float
    rows: list[tuple[str, float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    first_divergent: str | None = None

    @property
    def failing(self) -> list[tuple[str, float, float]]:
        return [row for row in self.rows if not _within(row[1], row[2], self.tolerance)]

    @property
    def max_abs_diff(self) -> float:
        diffs = [abs(expected - actual) for _, expected, actual in self.rows]
        return math.inf if any(math.isnan(diff) for diff in diffs) else max(diffs, default=0.0)

    @property
    def ok(self) -> bool:
        return not self.failing and not self.problems


def _within(expected: float, actual: float, tolerance: float) -> bool:
    """Whether ``actual`` lies within ``tolerance`` of ``expected``; a NaN never does (every comparison with NaN is
    false, so ``abs(diff) > tolerance`` would let it pass)."""
    return abs(expected - actual) <= tolerance


def compare(record: GoldenRecord, observation: Observation) -> Comparison:
    """Compare every value of ``record`` with ``observation`` at the record's tolerance.

    Hidden states are compared in order, then the logits and the top-5 classes; ``first_divergent`` names the first
    hidden state whose fingerprint differs ("embeddings", "block k"), the head when only the logits differ, or None.
    """
    comparison = Comparison(record.tolerance)
    if record.hidden_states is not None:
        if len(record.hidden_states) != len(observation.states):
            comparison.problems.append(
                f"the record holds {len(record.hidden_states)} hidden states, the model produced "
                f"{len(observation.states)}: it was recorded for a model of another depth"
            )
        else:
            for expected, actual in zip(record.hidden_states, observation.states, strict=True):
                actual_values = actual.values()
                rows = [
                    (f"{expected.name} {key}", value, actual_values[key]) for key, value in expected.values().items()
                ]
                comparison.rows.extend(rows)
                if comparison.first_divergent is None and any(not _within(e, a, record.tolerance) for _, e, a in rows):
                    comparison.first_divergent = expected.name

    logits = observation.logits
    if tuple(logits.shape) != record.output_shape:
        comparison.problems.append(f"output shape {list(logits.shape)}, expected {list(record.output_shape)}")
    else:
        row = logits[0]
        comparison.rows.extend((f"logits[{i}]", value, row[i].item()) for i, value in enumerate(record.logits))
        if record.top5 is not None:
            comparison.problems.extend(_top5_problems(record.top5, row, record.tolerance))
    if comparison.first_divergent is None and not comparison.ok:
        comparison.first_divergent = HEAD
    return comparison


def _top5_problems(expected: tuple[int, ...], row: torch.Tensor, tolerance: float) -> list[str]:
    # Classes whose logits lie within the tolerance of each other may swap ranks; only a real change of rank counts.
    top = row.topk(len(expected))
    problems = []
    for rank, index in enumerate(expected):
        if not _within(row[index].item(), top.values[rank].item(), tolerance):
            problems.append(
                f"top-5 rank {rank}: expected class {index} (logit now {row[index].item():.6f}), got class "
                f"{top.indices[rank].item()} ({top.values[rank].item():.6f})"
            )
    return problems


def reference_divergence(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    shape: ModelShape,
    clip: torch.Tensor,
    atol: float,
) -> str:
    """Compare the converted model in ``folder`` with the reference implementation layer by layer on ``clip``
    (original layout) and say where they first differ beyond ``atol``: "embeddings", "block k", the head, or none."""
    result = compare_forward(folder, state_dict, shape, clip, atol=atol)
    if result.agrees():
        return (
            f"none (converted model and reference agree to {atol:g} at every block, largest logit |diff| "
            f"{result.max_abs_diff:.1e}: the change is in what both compute, such as torch numerics or the weights)"
        )
    return describe_block(result.first_divergent_block)


def mismatch_message(
    record: GoldenRecord,
    path: Path,
    comparison: Comparison,
    reference: str,
    source_sha256: str | None = None,
) -> str:
    """The failure text: a summary naming the variant, where the divergence starts (against the golden's hidden
    states and against the reference implementation), the command that re-records the golden, then a table of
    expected against actual values."""
    variant = record.variant
    path = _relative(path)
    lines = [
        f"{variant}: the converted model's outputs differ from the {record.kind} golden {path} beyond "
        f"{record.tolerance:g} (largest |diff| {comparison.max_abs_diff:.3e})",
        f"first divergent block against the golden's hidden states: {comparison.first_divergent}",
        f"first divergent block against the reference implementation: {reference}",
    ]
    recorded = record.provenance
    if source_sha256 and recorded.get("source_sha256") and recorded["source_sha256"] != source_sha256:
        lines.append(
            f"the golden was recorded from other weights (sha256 {recorded['source_sha256'][:12]}, these are "
            f"{source_sha256[:12]})"
        )
    current = provenance("", None)
    changed = [
        f"{name} {recorded.get(name)} -> {current[name]}"
        for name in ("torch", "transformers", "converter")
        if recorded.get(name) != current[name]
    ]
    since = f"changed since: {', '.join(changed)}" if changed else "same torch, transformers and converter versions"
    lines.append(f"recorded {recorded.get('date') or 'on an unknown date'}; {since}")
    lines.append(
        f"if the change is intended: `{REFRESH_HINT.format(variant=variant)}`, then review `git diff {path.parent}`"
    )
    lines.extend(f"  {problem}" for problem in comparison.problems)
    lines.append(f"  {'value':<22} {'expected':>14} {'actual':>14} {'|diff|':>10}")
    shown = [row for row in comparison.rows if row[0].startswith("logits")] + comparison.failing
    seen = set()
    for name, expected, actual in shown:
        if name in seen:
            continue
        seen.add(name)
        flag = "  <--" if abs(expected - actual) > record.tolerance else ""
        lines.append(f"  {name:<22} {expected:>14.7f} {actual:>14.7f} {abs(expected - actual):>10.2e}{flag}")
    return "\n".join(lines)


def _relative(path: Path) -> Path:
    """``path`` relative to the working directory when it lies inside it (shorter messages), else as given."""
    try:
        return Path(path).resolve().relative_to(Path.cwd())
    except ValueError:
        return Path(path)


def gate(
    record: GoldenRecord,
    path: Path,
    observation: Observation,
    protocol: InputProtocol,
    locate: Callable[[], str],
    source_sha256: str | None = None,
) -> Comparison:
    """The gate: compare ``observation`` (computed on ``protocol``) with ``record``. Returns the comparison when every
    value agrees within the record's tolerance. Raises GoldenError when the record was made on another input, and
    GoldenMismatch otherwise, calling ``locate`` to say where the converted model departs from the reference."""
    if record.protocol != protocol:
        raise GoldenError(
            f"{path}: recorded on another input than this run uses ({_protocol_difference(record.protocol, protocol)})"
            f"; {_fix(record.variant)}"
        )
    comparison = compare(record, observation)
    if not comparison.ok:
        raise GoldenMismatch(mismatch_message(record, path, comparison, locate(), source_sha256))
    return comparison


def _protocol_difference(recorded: InputProtocol, current: InputProtocol) -> str:
    old, new = recorded.as_dict(), current.as_dict()
    return ", ".join(f"{key}: recorded {old[key]!r}, now {new[key]!r}" for key in old if old[key] != new[key])
