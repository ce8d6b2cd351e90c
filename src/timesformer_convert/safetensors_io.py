"""A streaming safetensors writer.

``safetensors.torch.save_file`` first copies every tensor into one bytes object; for a 486 MB model that doubles the
peak memory. This writer lays out the header from shapes alone, then writes each tensor's bytes straight from its
(possibly memory-mapped) storage. The format: 8-byte little-endian header length, a JSON header mapping names to
dtype, shape and byte offsets (padded with spaces to a multiple of 8), then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata=None) -> int:
    """Write ``tensors`` (floating point, any layout) to ``path`` in safetensors format and return the file size.

    Tensors are written in sorted key order. Raises ValueError for a dtype safetensors is not used for here.
    """
    if sys.byteorder != "little":  # the format is little-endian; torch stores native order
        raise RuntimeError("writing safetensors on a big-endian machine is not supported")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; only floating-point weights are written")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    with Path(path).open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            if tensors[name].numel():
                handle.write(_raw_bytes(tensors[name]))
    return 8 + len(encoded) + offset
