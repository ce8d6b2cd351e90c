"""Under ``pytest -n``, every test of one variant runs on one worker.

The worker that first needs a variant converts it and keeps the converted model's outputs in memory; the variant's
other tests should find them there instead of recomputing a forward pass elsewhere. A test belongs to a variant when
its id's parameters name one, as in ``test_x[VARIANT]`` or ``test_y[VARIANT-real]``. Tests of no variant are spread
one by one, except those of a file that must stay on one worker.

xdist's ``--dist loadgroup`` carries groups by appending ``@group`` to node ids, which pytest 9.2 no longer
honours: the tests then spread silently. This scheduler reads the variant from the id itself, so nothing depends on
that. It replaces xdist's under ``--dist loadgroup`` (the suite's default in pytest.ini).
"""

from __future__ import annotations

import re

import pytest
from xdist.scheduler import LoadScopeScheduling

from timesformer_convert.variants import VARIANTS

# Longest names first, so that no name is matched by a shorter one it contains; an "@group" suffix that older pytest
# versions let xdist append is allowed after the parameters.
_VARIANT_IN_PARAMS = re.compile(
    r"\[(?:.*?[-_])?("
    + "|".join(map(re.escape, sorted(VARIANTS, key=len, reverse=True)))
    + r")(?:[-_].*)?\](?:@[^\]]*)?$"
)


def variant_group(nodeid: str) -> str | None:
    """The variant named by the parameters of ``nodeid``, or None."""
    found = _VARIANT_IN_PARAMS.search(nodeid)
    return found.group(1) if found else None


# Files whose tests all read one run made for them: kept on one worker, so that none waits for another's.
ONE_WORKER_FILES = ("tests/test_plain_run.py",)


def scope_of(nodeid: str) -> str:
    """The unit of work ``nodeid`` is scheduled in: its file if listed above, else its variant, else itself."""
    path = nodeid.split("::", 1)[0]
    if path in ONE_WORKER_FILES:
        return path
    return variant_group(nodeid) or nodeid


class VariantScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with the scopes of :func:`scope_of`."""

    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort, so the order is otherwise kept): the scheduler hands out the units with the
    most tests first and units of one size in the order their first test was collected, so this puts the slow
    single tests ahead of the quick ones; a long test started last leaves the other workers idle at the end."""
    if getattr(config.option, "loadgroup", False):  # what an xdist worker under --dist loadgroup is told
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(tryfirst=True)  # before xdist's own choice for the --dist value
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        return VariantScheduling(config, log)
    return None
