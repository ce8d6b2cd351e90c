"""Reading original TimeSformer checkpoints safely.

Checkpoints are unpickled with ``torch.load(weights_only=True)``, which refuses any pickle that would import or call
anything beyond plain tensors and containers; there is no fallback to full unpickling. Before that, the file's first
bytes say what it is: torch's zip format, torch's legacy pickle format, or something else (empty, a web page, a bare
pickle, random bytes), which is refused without reaching ``torch.load``. When a pickle is refused, its instructions
are decoded (never run) to name what it imports. Files in torch's zip format are memory-mapped, so a 486 MB
checkpoint is not read into memory before its tensors are used.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

# Containers the original trainer and common wrappers put the state dict in, in the order they are looked for.
STATE_DICT_ENTRIES = ("model_state", "model", "module", "state_dict")

_SNIFF_BYTES = 512


def describe_text(head: bytes) -> str | None:
    """Say what kind of text page a file starting with ``head`` is, or None when it does not look like text."""
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<")):
        return "an HTML or XML page (the host returned a web page, likely a quota, login or permission page)"
    if stripped.startswith((b"{", b"[")):
        return "a JSON document"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "a text file"
    return None


def check_readable(path: Path) -> int:
    """Check that ``path`` is a non-empty regular file that is not a text page. Return its size in bytes.

    Raises CheckpointError naming the path and what is wrong.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; give the path of a TimeSformer checkpoint (.pyth or .pth)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file; give the .pyth file inside it")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a regular file (a device, socket or pipe); give a checkpoint file")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except PermissionError as e:
        raise CheckpointError(f"{path}: permission denied; make the file readable (chmod u+r) and retry") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy did not complete")
    imports = _text_pickle_imports(path, head)
    if _risky(imports):
        raise CheckpointError(
            f"{path}: is not a plain weights file: it is a Python pickle that imports {', '.join(_risky(imports))}, "
            "which can run code; it was not loaded"
        )
    if imports:
        raise CheckpointError(
            f"{path}: is a bare Python pickle, not a checkpoint in torch.save's format; it was not loaded. Re-save "
            "the weights with torch.save(state_dict) where the file is trusted"
        )
    kind = describe_text(head)
    if kind is not None:
        raise CheckpointError(f"{path}: is {kind}, not a checkpoint ({size} bytes); it was not loaded")
    return size


# --- telling file formats apart without unpickling anything ---------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
# A checkpoint's pickle is tens of KB (its tensors are stored beside it); a scan reads no more than this.
_PICKLE_SCAN_LIMIT = 64 * 2**20
_FOREIGN_SCAN_LIMIT = 2**20
_STRING_OPCODES = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}
# Protocols 0-2 name a few Python 3 modules by their Python 2 names.
_PYTHON2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def pickle_imports(stream: IO[bytes]) -> list[str]:
    """Read one pickle from ``stream`` opcode by opcode, without executing it, and return the globals it imports
    (``module.name``), in order of appearance.

    Uses :func:`pickletools.genops`, which decodes instructions and never builds or calls anything. Raises ValueError
    when the bytes are not a well-formed pickle.
    """
    imports: list[str] = []
    strings: list[str | None] = []  # what each instruction pushed, when it was a string (for STACK_GLOBAL)
    memo: dict[object, str | None] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attribute = str(arg).partition(" ")
            imports.append(f"{_PYTHON2_MODULES.get(module, module)}.{attribute}")
        elif name == "STACK_GLOBAL":
            module, attribute = strings[-2:] if len(strings) >= 2 else (None, None)
            imports.append(f"{module}.{attribute}" if module and attribute else "an object named at run time")
        if name in _STRING_OPCODES:
            strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        elif name in _PUT_OPCODES:
            memo[arg if name != "MEMOIZE" else len(memo)] = strings[-1] if strings else None
        elif name in _GET_OPCODES:
            strings.append(memo.get(arg))
        elif name not in ("FRAME", "PROTO", "STOP"):
            strings.append(None)
    return imports


def _risky(imports: list[str]) -> list[str]:
    """The imports a plain torch state dict never needs: anything outside torch and ``collections.OrderedDict``."""
    plain = ("torch.", "collections.OrderedDict")
    return sorted({name for name in imports if not name.startswith(plain)})


def _text_pickle_imports(path: Path, head: bytes) -> list[str]:
    """Imports of a pickle that does not start like a torch checkpoint (a raw ``pickle.dump`` of any protocol, which
    may look like text), or an empty list when ``path`` is not such a pickle."""
    if head.startswith(_ZIP_MAGIC) or _is_legacy_torch(head):
        return []
    try:
        with path.open("rb") as handle:
            imports = pickle_imports(io.BytesIO(handle.read(_FOREIGN_SCAN_LIMIT)))
    except (ValueError, OSError, EOFError):
        return []
    # Text that happens to decode as opcodes names no importable module; a real pickle's imports are dotted names.
    return [name for name in imports if _NAME_RE.fullmatch(name)] if imports else []


def _is_legacy_torch(head: bytes) -> bool:
    """Whether ``head`` starts with the pickled magic number of torch's legacy (pre-1.6, non-zip) format."""
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(head)):
            if opcode.name in ("LONG1", "LONG", "LONG4", "INT"):
                return arg == torch.serialization.MAGIC_NUMBER
            if opcode.name not in ("PROTO", "FRAME"):
                return False
    except ValueError:
        return False
    return False


def _zip_pickle(path: Path, size: int) -> str:
    """Name of the pickle inside a torch zip checkpoint. Raises CheckpointError for a truncated or foreign zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        # A zip's directory sits at its end, so a cut-off download loses it first.
        detail = "its directory at the end is missing: the file was cut off" if not zipfile.is_zipfile(path) else e
        raise CheckpointError(
            f"{path}: is a zip archive that is truncated or corrupt ({size} bytes; {detail}); it was not loaded. "
            "Download or copy it again"
        ) from e
    pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{path}: is a zip archive but not a PyTorch checkpoint ({len(pickles)} data.pkl among its "
            f"{len(names)} entries, expected 1); it was not loaded"
        )
    return pickles[0]


def _check_zip_records(path: Path, size: int) -> bool:
    """Check every record of a torch zip checkpoint against its CRC-32; return whether all are stored uncompressed.

    torch memory-maps records as they lie in the file, so a compressed record (a checkpoint re-zipped by another tool)
    would be read as garbage weights: such a file is loaded into memory instead. Raises CheckpointError naming the
    first damaged record.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            stored = all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path}: is a torch zip archive that is truncated or corrupt ({size} bytes; {_first_line(e)}); it was "
            "not loaded. Download or copy it again"
        ) from e
    if damaged is not None:
        raise CheckpointError(
            f"{path}: is a torch zip archive whose record {damaged} is damaged (its CRC-32 does not match); it was "
            "not loaded. Download or copy it again"
        )
    if not stored:
        logger.info("%s: compressed records, so the checkpoint is read into memory instead of memory-mapped", path)
    return stored


def _scan_checkpoint_pickle(path: Path, is_zip: bool) -> list[str] | None:
    """Imports of a torch checkpoint's main pickle, or None when that pickle is not well formed."""
    try:
        if is_zip:
            name = _zip_pickle(path, 0)
            with zipfile.ZipFile(path) as archive, archive.open(name) as handle:
                return pickle_imports(io.BytesIO(handle.read(_PICKLE_SCAN_LIMIT)))
        # The legacy format is a sequence of pickles: magic number, protocol, system info, then the object.
        with path.open("rb") as handle:
            stream = io.BytesIO(handle.read(_PICKLE_SCAN_LIMIT))
        imports: list[str] = []
        for _ in range(4):
            imports += pickle_imports(stream)
        return imports
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, CheckpointError):
        return None


def load_checkpoint(path: str | os.PathLike) -> object:
    """Unpickle a checkpoint with ``weights_only=True``, memory-mapped when the file is in torch's zip format (with
    every record checked against its CRC-32 first).

    Returns whatever object the file holds (usually a dict). Raises CheckpointError for a missing, unreadable, empty,
    text, truncated or corrupt file, and for a pickle that asks for anything other than plain weights. Nothing in the
    file is executed: formats are told apart by their first bytes and by decoding pickle instructions, never by
    running them, and ``torch.load`` runs only with ``weights_only=True``. There is no unsafe fallback.
    """
    path = Path(path)
    size = check_readable(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"{path}: its name is not valid UTF-8, and torch opens files by UTF-8 names only; rename the file, or "
            "give it through a link whose name is UTF-8"
        ) from None
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    is_zip = head.startswith(_ZIP_MAGIC)
    mappable = False
    if is_zip:
        _zip_pickle(path, size)
        mappable = _check_zip_records(path, size)
    elif not _is_legacy_torch(head):
        raise CheckpointError(
            f"{path}: is not a PyTorch checkpoint: it starts with neither torch's zip signature nor its legacy "
            f"pickle header ({size} bytes); it was not loaded. Download or copy it again"
        )

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except pickle.UnpicklingError as e:
        raise _refusal(path, is_zip, e) from e
    except Exception as e:  # a damaged pickle fails inside torch's restricted unpickler with almost any type
        why = "a torch zip archive" if is_zip else "a legacy torch checkpoint"
        raise CheckpointError(
            f"{path}: is {why} that is truncated or corrupt ({size} bytes; {_first_line(e)}); it was not loaded. "
            "Download or copy it again"
        ) from e


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _refusal(path: Path, is_zip: bool, error: pickle.UnpicklingError) -> CheckpointError:
    """The error for a checkpoint ``torch.load(weights_only=True)`` refused, saying what its pickle asks for."""
    imports = _scan_checkpoint_pickle(path, is_zip)
    if imports is None:
        return CheckpointError(
            f"{path}: is a torch checkpoint whose pickle is corrupt ({_first_line(error)}); it was not loaded. "
            "Download or copy it again"
        )
    risky = _risky(imports)
    asks = f"imports {', '.join(risky)}, which can run code" if risky else f"is refused ({_first_line(error)})"
    return CheckpointError(
        f"{path}: is not a plain weights file: its pickle {asks}; it was not loaded. Re-save the weights alone "
        "with torch.save(model.state_dict()) where the file is trusted"
    )


def extract_state_dict(checkpoint: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the state dict inside a loaded checkpoint.

    Accepts ``{"model_state": sd, ...}`` (the original trainer's layout), ``{"model": sd}``, ``{"module": sd}``,
    ``{"state_dict": sd}`` and a bare state dict; other entries (optimizer state, epoch, cfg) are ignored.
    Raises CheckpointError when no state dict is found or an entry is not a tensor.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: holds a {type(checkpoint).__name__}, not a dict of weights")
    state_dict = checkpoint
    if not _is_state_dict(checkpoint):
        for entry in STATE_DICT_ENTRIES:
            if isinstance(checkpoint.get(entry), Mapping):
                state_dict = checkpoint[entry]
                logger.debug("state dict found under %r", entry)
                break
        else:
            entries = ", ".join(sorted(map(str, checkpoint))) or "nothing"
            raise CheckpointError(
                f"{source}: no state dict found; expected one of the entries {', '.join(STATE_DICT_ENTRIES)} "
                f"or a bare state dict, found: {entries}"
            )
    bad = sorted(str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if bad:
        raise CheckpointError(f"{source}: state dict entries are not tensors: {', '.join(bad)}")
    if not state_dict:
        raise CheckpointError(f"{source}: the state dict is empty")
    return dict(state_dict)


def _is_state_dict(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(value, torch.Tensor) for value in mapping.values())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``path`` safely and return its state dict (see :func:`load_checkpoint` and :func:`extract_state_dict`)."""
    return extract_state_dict(load_checkpoint(path), source=str(path))
