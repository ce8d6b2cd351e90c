"""One fork server per run (tests/forkserver.py), started by the xdist controller.

The workers inherit its folder and fork from it, so its imports are done once per run rather than once per worker,
and they happen while the workers start. A run without workers starts one on its first forked command
(tests/running.py). It is stopped when the run ends.
"""

from __future__ import annotations

import pytest

from tests.running import start_fork_server, stop_fork_server


def _starts_workers(config) -> bool:
    workers = config.getoption("numprocesses", None)
    return not hasattr(config, "workerinput") and isinstance(workers, int) and workers > 0


@pytest.hookimpl(trylast=True)  # after the configure hooks that set the environment the server imports with
def pytest_configure(config):
    if _starts_workers(config):
        start_fork_server()


def pytest_unconfigure(config):
    if _starts_workers(config):
        stop_fork_server()
