"""The synthetic artifacts of each variant, built on demand, once per cache key, by whichever process needs them first.

Checkpoints, their conversions and the forward outputs of both implementations live in the suite's cache folder
(conftest.py: ``suite_cache``) and are built through :func:`timesformer_convert.cache.build_once`; each build is
appended to ``builds.log`` there, so a run can count what it built.
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import FORWARD_BLOCKS
from tests.buildlog import record_build
from timesformer_convert.cache import build_once
from timesformer_convert.checkpoint import read_state_dict
from timesformer_convert.convert import convert_checkpoint
from timesformer_convert.variants import VARIANTS
from timesformer_convert.verify import (
    ForwardOutputs,
    converted_outputs,
    native_clip,
    reference_outputs,
    shallow,
    variant_seed,
    variant_shape,
    write_synthetic_checkpoint,
)


class Artifacts:
    """Builds synthetic checkpoints and conversions on demand, each once per cache key."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._converted_outputs: dict[str, ForwardOutputs] = {}

    def _once(self, kind: str, name: str, target: Path, build) -> Path:
        started = time.perf_counter()
        return build_once(
            target, build, on_built=lambda _: record_build(self.folder, kind, name, time.perf_counter() - started)
        )

    def checkpoint(self, variant: str, blocks: int | None = None) -> Path:
        """Path of the synthetic checkpoint of ``variant`` (full depth, or its first ``blocks`` blocks)."""
        shape = variant_shape(VARIANTS[variant])
        if blocks is not None:
            shape = shallow(shape, blocks)
        name = f"{variant}-{shape.num_hidden_layers}blocks"
        return self._once(
            "checkpoint",
            name,
            self.folder / f"{name}.pyth",
            lambda staging: write_synthetic_checkpoint(shape, staging, seed=variant_seed(variant)),
        )

    def converted(self, variant: str, blocks: int | None = None) -> Path:
        """Folder of the conversion of :meth:`checkpoint` (declared as ``variant`` when at full depth)."""
        source = self.checkpoint(variant, blocks)
        declared = VARIANTS[variant] if blocks is None else None
        name = source.stem
        return self._once(
            "conversion",
            name,
            self.folder / f"{name}-converted",
            lambda staging: convert_checkpoint(source, staging, variant=declared),
        )

    def forward_shape(self, variant: str):
        """The full-width, FORWARD_BLOCKS-deep shape used for forward passes at the variant's native input."""
        return shallow(variant_shape(VARIANTS[variant]), FORWARD_BLOCKS)

    def reference_outputs(self, variant: str) -> ForwardOutputs:
        """The reference implementation's logits and hidden states on the variant's native clip, cached on disk:
        they depend only on the synthetic weights, the clip and torch, all part of the cache key."""
        shape = self.forward_shape(variant)
        checkpoint = self.checkpoint(variant, FORWARD_BLOCKS)

        def build(staging: Path) -> None:
            reference_outputs(read_state_dict(checkpoint), shape, native_clip(shape)).save(staging)

        return ForwardOutputs.load(
            self._once("reference", checkpoint.stem, self.folder / f"{checkpoint.stem}-ref.st", build)
        )

    def converted_outputs(self, variant: str) -> ForwardOutputs:
        """The converted model's logits and hidden states on the variant's native clip, computed once per cache key
        and kept on disk like the reference's: what they depend on (the conversion, the clip, torch and transformers'
        TimeSformer code) is all in the key, so a changed converter or library is always run afresh."""
        if variant not in self._converted_outputs:
            folder = self.converted(variant, FORWARD_BLOCKS)
            clip_shape = self.forward_shape(variant)

            def build(staging: Path) -> None:
                converted_outputs(folder, native_clip(clip_shape)).save(staging)

            path = self._once("outputs", folder.name, self.folder / f"{folder.name}-outputs.st", build)
            self._converted_outputs[variant] = ForwardOutputs.load(path)
        return self._converted_outputs[variant]
