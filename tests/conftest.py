"""Fixtures shared across test files: a loopback HTTP server with the bytes of a small served checkpoint, and one
plain pytest run of this suite whose report several tests read."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.loopback import LoopbackServer
from tests.running import Completed, once_per_run, run_pytest, shared_folder
from tests.test_download import checkpoint_bytes
from tests.test_golden import BASE, PERTURBED_GOLDENS, copy_golden, perturb


@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    return checkpoint_bytes()


@pytest.fixture
def server():
    with LoopbackServer() as running:
        yield running


@dataclass(frozen=True)
class DefaultRun:
    goldens: Path
    result: Completed


@pytest.fixture(scope="session")
def default_run(tmp_path_factory, golden_store) -> DefaultRun:
    """pytest with no options but ``--golden-dir``, run once for all workers: the synthetic gate of the variants in
    PERTURBED_GOLDENS, whose goldens in that folder each have one value moved by 1e-3; a real golden; and the real
    tier's first test of every variant. Tests read from its report what a plain run says about each."""
    goldens = shared_folder(tmp_path_factory) / "perturbed-goldens"

    def make() -> Completed:
        for variant, (value, _) in PERTURBED_GOLDENS.items():
            data, target = copy_golden(golden_store, "synthetic", variant, goldens)
            target.write_text(json.dumps(perturb(data, value, 1e-3), indent=2))
        return run_pytest(
            *(f"tests/test_golden.py::test_synthetic_golden[{variant}]" for variant in PERTURBED_GOLDENS),
            f"tests/test_golden.py::test_real_golden[{BASE}]",
            "tests/test_real.py::test_the_checkpoint_has_the_declared_variants_shape",
            "--golden-dir",
            goldens,
        )

    return DefaultRun(goldens, once_per_run(tmp_path_factory, "default-run", make))
