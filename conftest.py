"""Suite-wide options and the session-scoped fixtures that build and convert each variant once per run.

Expensive artifacts (full-size synthetic checkpoints, their conversions) live in the cache folder under a key made
of the versions that affect them, and are built through :func:`timesformer_convert.cache.build_once`: under
``pytest -n auto`` the first worker that needs one builds it while the others wait on its lock, and a later run
with the same versions reuses it. Each build is appended to ``builds.log`` in that folder and listed at the end of
the run, so "converted exactly once" can be counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from timesformer_convert.cache import build_once, cache_dir
from timesformer_convert.convert import CONVERTER_VERSION, convert_checkpoint
from timesformer_convert.variants import VARIANTS
from timesformer_convert.verify import shallow, variant_shape, write_synthetic_checkpoint

ROOT = Path(__file__).resolve().parent

pytest_plugins = ["tests.plugins.golden", "tests.plugins.summary"]
ORACLE_ENV = "TIMESFORMER_ORACLE_DIR"
DEFAULT_ORACLE = ROOT.parent / "shared" / "oracle"

# Bump when the synthetic weights or the way they are built change, so cached artifacts are rebuilt.
SYNTHETIC_VERSION = "1"
FORWARD_BLOCKS = 2
VARIANT_NAMES = list(VARIANTS)


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


def pytest_configure(config):
    socket.socket.connect = _guarded_connect
    socket.getaddrinfo = _guarded_getaddrinfo
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    config.addinivalue_line("markers", "xdist_group(name): keep tests of one variant on one worker")


def pytest_unconfigure(config):
    socket.socket.connect = _real_connect
    socket.getaddrinfo = _real_getaddrinfo


# --- grouping: tests of one variant run on the worker that already holds it ----------------------------------------


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        variant = callspec.params.get("variant") if callspec else None
        if isinstance(variant, str):
            item.add_marker(pytest.mark.xdist_group(name=variant))


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
            f"no oracle cases in {oracle_dir(metafunc.config)}; pass --oracle-dir DIR or set {ORACLE_ENV} to a folder "
            "of cases written by the original TimeSformer code"
        )
        params = cases or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize("oracle_case", params, ids=cases or ["no-oracle"])


@pytest.fixture
def oracle_case_dir(request, oracle_case) -> Path:
    return oracle_dir(request.config) / oracle_case


# --- cached synthetic checkpoints and conversions ------------------------------------------------------------------


def _suite_key() -> str:
    import transformers

    versions = f"{SYNTHETIC_VERSION}|{CONVERTER_VERSION}|{torch.__version__}|{transformers.__version__}"
    return hashlib.sha256(versions.encode()).hexdigest()[:12]


@pytest.fixture(scope="session")
def suite_cache() -> Path:
    """The cache folder for this combination of converter, torch and transformers versions."""
    folder = cache_dir() / f"suite-{_suite_key()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _log_build(suite_cache: Path, kind: str, name: str, seconds: float) -> None:
    line = json.dumps(
        {
            "kind": kind,
            "name": name,
            "seconds": round(seconds, 2),
            "pid": os.getpid(),
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "time": time.time(),
        }
    )
    with open(suite_cache / "builds.log", "a", encoding="utf-8") as log:
        log.write(line + "\n")


class Artifacts:
    """Builds synthetic checkpoints and conversions on demand, each once per cache key."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _once(self, kind: str, name: str, target: Path, build) -> Path:
        started = time.perf_counter()
        return build_once(
            target, build, on_built=lambda _: _log_build(self.folder, kind, name, time.perf_counter() - started)
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
            lambda staging: write_synthetic_checkpoint(shape, staging),
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


@pytest.fixture(scope="session")
def artifacts(suite_cache) -> Artifacts:
    return Artifacts(suite_cache)
