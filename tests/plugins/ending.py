"""The last seconds of a run, which every run pays whatever it tested.

- Each pytest process (the xdist controller and every worker) has imported torch and transformers, whose objects
  the interpreter's final garbage collections walk one by one: about a second per process, spent after the last
  test. Nothing needs collecting once pytest is done, so the heap is frozen (:func:`gc.freeze`) and those
  collections skip it. Memory is returned to the system when the process exits, as before.
- Hypothesis's terminal summary imports hypothesis, which the controller has not imported (its workers ran the
  tests): more than a second before the summary prints. The controller imports it in the background as soon as
  the first worker finishes, while the others still run.
"""

from __future__ import annotations

import gc
import importlib
import threading

import pytest

# What the hypothesis plugin's terminal summary imports (it reads which observation files a run wrote).
HYPOTHESIS_SUMMARY_MODULE = "hypothesis.internal.observability"
_IMPORTING = pytest.StashKey[threading.Thread]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    gc.freeze()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    config = node.config
    if config.pluginmanager.has_plugin("hypothesispytest") and _IMPORTING not in config.stash:
        thread = threading.Thread(target=importlib.import_module, args=(HYPOTHESIS_SUMMARY_MODULE,), daemon=True)
        config.stash[_IMPORTING] = thread
        thread.start()
