"""The offline self-check: every released variant, as a synthetic checkpoint, converted and verified.

For each variant: a full-size synthetic checkpoint (all blocks) is converted with the variant declared, which proves
complete key coverage; the safetensors file is re-read and compared bit for bit; then a model of full width and fewer
blocks is converted and its logits on a native-shape clip are compared with the reference implementation's.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import read_state_dict
from .convert import convert_checkpoint, not_output_files, rename_state_dict
from .errors import ConversionError, first_few
from .variants import Variant
from .verify import (
    FORWARD_ATOL,
    compare_forward,
    native_clip,
    roundtrip_mismatches,
    shallow,
    variant_seed,
    variant_shape,
    write_synthetic_checkpoint,
)

logger = logging.getLogger(__name__)


@dataclass
class SelfcheckRow:
    variant: str
    frames: int
    image_size: int
    num_labels: int
    tensors: int = 0
    coverage: str = "-"
    roundtrip: str = "-"
    max_abs_diff: float | None = None
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.coverage == "complete"
            and self.roundtrip == "identical"
            and (self.max_abs_diff is not None and self.max_abs_diff <= FORWARD_ATOL)
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_variant(variant: Variant, work_dir: Path, forward_blocks: int = 1, keep: bool = False) -> SelfcheckRow:
    """Run the three checks for one variant in ``work_dir``; failures are recorded in the row, not raised.

    The checkpoints and conversions are deleted as soon as they are checked (a full-size pair takes about 1 GB),
    unless ``keep``: then they stay in ``work_dir`` for the user to try.
    """
    started = time.perf_counter()
    row = SelfcheckRow(variant.name, variant.num_frames, variant.image_size, variant.num_labels)
    full_shape = variant_shape(variant)
    checkpoint = work_dir / f"{variant.name}.pyth"
    converted = work_dir / variant.name
    try:
        write_synthetic_checkpoint(full_shape, checkpoint, seed=variant_seed(variant.name))
        report = convert_checkpoint(checkpoint, converted, variant=variant, overwrite=True)
        row.tensors = report.num_tensors
        row.coverage = "complete"
        tensors = rename_state_dict(read_state_dict(checkpoint))
        row.roundtrip = "identical" if not roundtrip_mismatches(converted, tensors) else "differs"
        del tensors
        if not keep:
            checkpoint.unlink()
            shutil.rmtree(converted)

        small_shape = shallow(full_shape, forward_blocks)
        small_checkpoint = work_dir / f"{variant.name}-{forward_blocks}blocks.pyth"
        small_converted = work_dir / f"{variant.name}-{forward_blocks}blocks"
        write_synthetic_checkpoint(small_shape, small_checkpoint, seed=variant_seed(variant.name))
        convert_checkpoint(small_checkpoint, small_converted, variant=None, overwrite=True)
        comparison = compare_forward(
            small_converted, read_state_dict(small_checkpoint), small_shape, native_clip(small_shape)
        )
        row.max_abs_diff = max(comparison.max_abs_diff, comparison.max_hidden_diff)
        if not keep:
            small_checkpoint.unlink()
            shutil.rmtree(small_converted)
    except ConversionError as e:
        row.error = str(e).splitlines()[0]
        if row.coverage == "-":
            row.coverage = "failed"
    row.seconds = time.perf_counter() - started
    logger.info("%s: %s in %.1f s", variant.name, "ok" if row.ok else "FAILED", row.seconds)
    return row


def run_selfcheck(
    variants: list[Variant], work_dir: Path, forward_blocks: int = 1, keep: bool = False
) -> list[SelfcheckRow]:
    """Check every variant in turn and return one row each; ``keep`` leaves their files in ``work_dir``.

    Raises ConversionError, before any work, when ``work_dir`` holds something under a name selfcheck writes that is
    not what it wrote there: it replaces only its own conversions."""
    for variant in variants:
        for name in (variant.name, f"{variant.name}-{forward_blocks}blocks"):
            folder = work_dir / name
            if folder.is_symlink() or folder.exists() and not folder.is_dir():
                raise ConversionError(f"{folder}: is not a folder selfcheck wrote; choose another --work-dir")
            foreign = not_output_files(folder) if folder.is_dir() else []
            if foreign:
                raise ConversionError(
                    f"{folder}: holds files selfcheck did not write ({first_few(foreign)}); it replaces only its "
                    "own conversions there; move them elsewhere, or choose another --work-dir"
                )
    return [check_variant(variant, work_dir, forward_blocks, keep) for variant in variants]


def format_table(rows: list[SelfcheckRow]) -> str:
    """A fixed-width table of the rows, one line per variant."""
    header = (
        f"{'variant':<34} {'frames':>6} {'size':>4} {'labels':>6} {'tensors':>7} {'coverage':<9} "
        f"{'round trip':<10} {'max |diff|':>10} {'seconds':>7}  status"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        diff = f"{row.max_abs_diff:.2e}" if row.max_abs_diff is not None else "-"
        status = "ok" if row.ok else f"FAILED {row.error}".strip()
        lines.append(
            f"{row.variant:<34} {row.frames:>6} {row.image_size:>4} {row.num_labels:>6} {row.tensors:>7} "
            f"{row.coverage:<9} {row.roundtrip:<10} {diff:>10} {row.seconds:>7.1f}  {status}"
        )
    return "\n".join(lines)
