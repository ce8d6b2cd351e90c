"""Suite-wide options and the session-scoped fixtures that build and convert each variant once per run.

Expensive artifacts (full-size synthetic checkpoints, their conversions) live in the cache folder under a key made
of the versions that affect them, and are built through :func:`timesformer_convert.cache.build_once`: under
``pytest -n auto`` the first worker that needs one builds it while the others wait on its lock, and a later run
with the same versions reuses it (tests/artifacts.py). Each build is appended to ``builds.log`` in that folder and
counted at the end of the run (tests/buildlog.py), so "converted exactly once" can be checked.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.buildlog import builds_since, describe_builds
from timesformer_convert import CONVERTER_VERSION
from timesformer_convert.cache import cache_dir
from timesformer_convert.variants import VARIANTS

ROOT = Path(__file__).resolve().parent
RUN_STARTED_ENV = "TIMESFORMER_SUITE_RUN_STARTED"
# Suite folders of other version keys kept besides the current one; older ones are removed at the start of a run.
KEEP_OTHER_SUITE_FOLDERS = 1
ORACLE_ENV = "TIMESFORMER_ORACLE_DIR"
DEFAULT_ORACLE = ROOT.parent / "shared" / "oracle"

# Bump when the synthetic weights or the way they are built change, so cached artifacts are rebuilt.
SYNTHETIC_VERSION = "2"
FORWARD_BLOCKS = 1
VARIANT_NAMES = list(VARIANTS)

pytest_plugins = [
    "tests.plugins.real",
    "tests.plugins.golden",
    "tests.plugins.grouping",
    "tests.plugins.summary",
    "tests.plugins.processes",
    "tests.plugins.ending",
]


def pytest_addoption(parser):
    group = parser.getgroup("timesformer", "TimeSformer conversion suite")
    group.addoption(
        "--oracle-dir",
        default=None,
        help=f"folder of oracle cases written by the original code (default: ${ORACLE_ENV}, else {DEFAULT_ORACLE})",
    )


# --- network guard: nothing in this suite may reach a host other than loopback --------------------------------------

_LOOPBACK = ("127.", "::1", "localhost", "0:0:0:0:0:0:0:1")
_real_connect = socket.socket.connect
_real_getaddrinfo = socket.getaddrinfo


def _is_loopback(address) -> bool:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        return host.startswith(_LOOPBACK) or host == "::ffff:127.0.0.1"
    return isinstance(address, (str, bytes))  # AF_UNIX sockets are local


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise ConnectionRefusedError(f"test tried to reach {address!r}; only loopback hosts are allowed in this suite")
    return _real_connect(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host)
    if host is not None and not name.startswith(_LOOPBACK):
        raise OSError(f"test tried to resolve {name!r}; only loopback hosts are allowed in this suite")
    return _real_getaddrinfo(host, *args, **kwargs)


def check_oracle_dir(config) -> None:
    """A folder named on the command line must exist: a mistyped one must not turn the ground-truth tests into
    skips."""
    configured = config.getoption("--oracle-dir")
    if configured and not Path(configured).is_dir():
        what = "is not a folder" if Path(configured).exists() else "does not exist"
        raise pytest.UsageError(f"--oracle-dir {configured}: {what}; give the folder of oracle cases")


def pytest_configure(config):
    check_oracle_dir(config)
    # --real (tests/plugins/real.py) is the one explicit request to download the released files from the internet.
    if not config.getoption("--real"):
        socket.socket.connect = _guarded_connect
        socket.getaddrinfo = _guarded_getaddrinfo
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # share the cores between workers instead of oversubscribing them with torch's threads
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if not hasattr(config, "workerinput"):  # the controller; xdist workers inherit the variable
        os.environ[RUN_STARTED_ENV] = str(time.time())
        _prune_suite_folders()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_unconfigure(config):
    socket.socket.connect = _real_connect
    socket.getaddrinfo = _real_getaddrinfo


# --- oracle ---------------------------------------------------------------------------------------------------------


def oracle_dir(config) -> Path:
    configured = config.getoption("--oracle-dir") or os.environ.get(ORACLE_ENV)
    return Path(configured) if configured else DEFAULT_ORACLE


def oracle_cases(config) -> list[str]:
    root = oracle_dir(config)
    return sorted(path.parent.name for path in root.glob("*/case.json")) if root.is_dir() else []


def pytest_generate_tests(metafunc):
    if "oracle_case" in metafunc.fixturenames:
        cases = oracle_cases(metafunc.config)
        reason = (
            f"no oracle cases in {oracle_dir(metafunc.config)}; pass --oracle-dir=DIR or set {ORACLE_ENV} to a folder "
            "of cases written by the original TimeSformer code"
        )
        params = cases or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize("oracle_case", params, ids=cases or ["no-oracle"])


@pytest.fixture
def oracle_case_dir(request, oracle_case) -> Path:
    return oracle_dir(request.config) / oracle_case


# --- cached synthetic checkpoints and conversions ------------------------------------------------------------------


@functools.cache
def _suite_key() -> str:
    """Versions that shape the cached artifacts, plus a digest of the package's own sources: a changed rule or writer
    must never be tested against conversions an older version made, even if nobody bumped CONVERTER_VERSION.
    torch and transformers are located, not imported: a run that needs no model should not pay for loading them."""
    import timesformer_convert

    version = importlib.metadata.version
    transformers_root = Path(importlib.util.find_spec("transformers").origin).parent
    digest = hashlib.sha256(
        f"{SYNTHETIC_VERSION}|{CONVERTER_VERSION}|{version('torch')}|{version('transformers')}".encode()
    )
    sources = sorted(Path(timesformer_convert.__file__).parent.glob("*.py"))
    # transformers' TimeSformer code too, which an editable transformers install can change under the same version.
    sources += sorted((transformers_root / "models" / "timesformer").glob("*.py"))
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


def _suite_folder() -> Path:
    return cache_dir() / f"suite-{_suite_key()}"


def _prune_suite_folders() -> None:
    """Bound the cache: keep the current suite folder and the most recent other one, delete older ones."""
    current = _suite_folder()
    others = sorted(
        (p for p in current.parent.glob("suite-*") if p.is_dir() and p != current),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for stale in others[KEEP_OTHER_SUITE_FOLDERS:]:
        shutil.rmtree(stale, ignore_errors=True)


@pytest.fixture(scope="session")
def suite_cache() -> Path:
    """The cache folder for this combination of converter, torch and transformers versions."""
    folder = _suite_folder()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput") or RUN_STARTED_ENV not in os.environ:
        return
    folder = _suite_folder()
    if not folder.exists():
        return
    built = describe_builds(builds_since(folder, float(os.environ[RUN_STARTED_ENV])))
    terminalreporter.write_sep("-", "synthetic artifacts")
    terminalreporter.write_line(f"built this run: {built}; cache: {folder}")


@pytest.fixture(scope="session")
def artifacts(suite_cache):
    """The synthetic checkpoints, conversions and forward outputs of each variant (tests/artifacts.py)."""
    from tests.artifacts import Artifacts  # imports torch and transformers, which the xdist controller never needs

    return Artifacts(suite_cache)
