"""Golden values in the test suite: where they live, refresh mode, the refresh table, and the real tier's inputs.

Options:
    --refresh-golden        re-record the goldens of the tests that run instead of comparing (narrow with -k or
                            --golden-variant); refused when the CI environment variable is set
    --golden-variant NAME   refresh only this variant (repeatable); other selected goldens are still compared
    --golden-dir DIR        the golden folder (default: tests/golden)
    --spaghetti-clip FILE   the 16-frame spaghetti clip (eating_spaghetti.npy) for the real-checkpoint goldens

The real-checkpoint tier runs when real checkpoints are available: ``--checkpoint-dir DIR`` (or
$TIMESFORMER_CHECKPOINT_DIR) holding the original ``.pyth`` files. ``--real`` and ``--checkpoint-dir`` belong to the
download tier and are looked up here without being declared.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from timesformer_convert.hub import SPAGHETTI_FILE, SPAGHETTI_REPO
from timesformer_convert.variants import VARIANTS

if TYPE_CHECKING:  # timesformer_convert.golden imports torch: where tests run, not in the xdist controller
    from timesformer_convert.golden import GoldenRecord, Refresh

from .tables import table_lines

DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
CHECKPOINT_DIR_ENV = "TIMESFORMER_CHECKPOINT_DIR"
SPAGHETTI_ENV = "TIMESFORMER_SPAGHETTI_CLIP"
REFRESH_PROPERTY = "golden_refresh"
GOLDEN_PROPERTY = "golden"

ENABLE_REAL_HINT = (
    f"pass --real to download the released checkpoints, or --checkpoint-dir=DIR (or set {CHECKPOINT_DIR_ENV}) to a "
    "folder holding the original .pyth files"
)


def pytest_addoption(parser):
    group = parser.getgroup("golden", "golden values")
    group.addoption(
        "--refresh-golden",
        action="store_true",
        default=False,
        help="re-record the golden values of the tests that run instead of comparing them (not allowed under CI)",
    )
    group.addoption(
        "--golden-variant",
        action="append",
        default=[],
        metavar="NAME",
        help="with --refresh-golden: refresh only this variant (repeatable)",
    )
    group.addoption("--golden-dir", default=None, metavar="DIR", help=f"golden folder (default: {DEFAULT_GOLDEN_DIR})")
    group.addoption(
        "--spaghetti-clip",
        default=None,
        metavar="FILE",
        help=f"{SPAGHETTI_FILE} from the hub dataset {SPAGHETTI_REPO} (default: ${SPAGHETTI_ENV}, else the local "
        "Hugging Face cache)",
    )


def pytest_configure(config):
    refresh = config.getoption("--refresh-golden")
    if refresh and os.environ.get("CI"):
        raise pytest.UsageError(
            "--refresh-golden refuses to run while CI is set: goldens are re-recorded by a developer and reviewed, "
            "never by the gate that checks them"
        )
    variants = config.getoption("--golden-variant")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise pytest.UsageError(
            f"--golden-variant {unknown[0]!r} is not a variant; choose from: {', '.join(VARIANTS)}"
        )
    if variants and not refresh:
        raise pytest.UsageError("--golden-variant only narrows --refresh-golden; add --refresh-golden or drop it")
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(RefreshTable(), "golden-refresh-table")


def set_golden_status(node, kind: str, status: str, **details) -> None:
    """Record a golden test's status on its report (one ``golden`` property, replaced on each update) for the
    per-variant summary and the JUnit XML."""
    node.user_properties[:] = [entry for entry in node.user_properties if entry[0] != GOLDEN_PROPERTY]
    node.user_properties.append((GOLDEN_PROPERTY, {"kind": kind, "status": status, **details}))


class GoldenStore:
    """The golden folder of this run and whether a variant's goldens are re-recorded or compared."""

    def __init__(self, config):
        self.root = Path(config.getoption("--golden-dir") or DEFAULT_GOLDEN_DIR)
        self.refresh = bool(config.getoption("--refresh-golden"))
        self.variants = set(config.getoption("--golden-variant"))

    def path(self, kind: str, variant: str) -> Path:
        from timesformer_convert.golden import golden_path

        return golden_path(self.root, kind, variant)

    def refreshing(self, variant: str) -> bool:
        return self.refresh and (not self.variants or variant in self.variants)

    def load(self, kind: str, variant: str) -> GoldenRecord:
        from timesformer_convert.golden import load_record

        return load_record(self.path(kind, variant), variant, kind)

    def rewrite(self, node, record: GoldenRecord) -> Refresh:
        """Write ``record`` to its file and note the change on the test's report for the refresh table."""
        from timesformer_convert.golden import write_record

        refresh = write_record(self.path(record.kind, record.variant), record)
        old = refresh.previous.logits[:3] if refresh.previous else None
        change = refresh.largest_change()
        row = {
            "variant": record.variant,
            "kind": record.kind,
            "file": str(refresh.path),
            "old": refresh.previous_state if old is None else ", ".join(f"{value:.4f}" for value in old),
            "new": ", ".join(f"{value:.4f}" for value in record.logits[:3]),
            "change": "new file" if change is None else f"{change:.2e}",
        }
        node.user_properties.append((REFRESH_PROPERTY, row))
        set_golden_status(node, record.kind, "refreshed")
        return refresh


@pytest.fixture(scope="session")
def golden_store(pytestconfig) -> GoldenStore:
    return GoldenStore(pytestconfig)


class RealInputs:
    """The real tier's inputs: released checkpoints and the spaghetti clip. Each accessor skips the test, saying how
    to provide the input, when it is not available."""

    def __init__(self, config):
        self.real = bool(config.getoption("--real", default=False))
        directory = config.getoption("--checkpoint-dir", default=None) or os.environ.get(CHECKPOINT_DIR_ENV)
        self.checkpoint_dir = Path(directory) if directory else None
        clip = config.getoption("--spaghetti-clip") or os.environ.get(SPAGHETTI_ENV)
        self.clip = Path(clip) if clip else None
        self._video = None

    def require_enabled(self) -> None:
        if self.checkpoint_dir is None and not self.real:
            pytest.skip(f"real checkpoints are not enabled: {ENABLE_REAL_HINT}")

    def checkpoint(self, variant: str) -> Path:
        if self.checkpoint_dir is None:
            pytest.skip(
                "--real is set, but this tier reads released checkpoints from a folder: pass --checkpoint-dir=DIR "
                f"(or set {CHECKPOINT_DIR_ENV}) to the folder the download wrote"
            )
        path = self.checkpoint_dir / VARIANTS[variant].original_file
        if not path.is_file():
            pytest.skip(f"{path}: no such file; put {VARIANTS[variant].original_file} in {self.checkpoint_dir}")
        return path

    def video(self):
        """The spaghetti clip as a (16, height, width, 3) uint8 array."""
        import numpy as np

        if self._video is None:
            path = self.clip or self._cached_clip()
            if path is None or not path.is_file():
                pytest.skip(
                    f"the spaghetti clip is not available offline ({path or 'not in the Hugging Face cache'}): pass "
                    f"--spaghetti-clip=FILE or set {SPAGHETTI_ENV} to {SPAGHETTI_FILE} from the hub dataset "
                    f"{SPAGHETTI_REPO}"
                )
            self._video = np.load(path, allow_pickle=False)
        return self._video

    @staticmethod
    def _cached_clip() -> Path | None:
        from timesformer_convert.errors import DownloadError
        from timesformer_convert.hub import spaghetti_clip_file

        try:
            return spaghetti_clip_file()
        except DownloadError:  # not in the local hub cache
            return None


@pytest.fixture(scope="session")
def real_inputs(pytestconfig) -> RealInputs:
    return RealInputs(pytestconfig)


def pytest_report_teststatus(report, config):
    if report.when == "call" and report.passed and any(name == REFRESH_PROPERTY for name, _ in report.user_properties):
        return "passed", "R", ("REFRESHED", {"yellow": True})
    return None


class RefreshTable:
    """Collects the refresh rows of every test (from any xdist worker) and prints them at the end of the run."""

    def __init__(self):
        self.rows: list[dict] = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call":
            self.rows.extend(value for name, value in report.user_properties if name == REFRESH_PROPERTY)

    def pytest_terminal_summary(self, terminalreporter):
        if not self.rows:
            return
        terminalreporter.section("golden values refreshed")
        header = ["variant", "kind", "old (first 3 logits)", "new (first 3 logits)", "largest change"]
        rows = sorted(self.rows, key=lambda row: (row["kind"], row["variant"]))
        cells = [[row[key] for key in ("variant", "kind", "old", "new", "change")] for row in rows]
        for line in table_lines(header, cells):
            terminalreporter.write_line(line)
        folders = sorted({os.path.relpath(Path(row["file"]).parent.parent) for row in self.rows})
        terminalreporter.write_line(f"review the change with: git diff {' '.join(folders)}")
