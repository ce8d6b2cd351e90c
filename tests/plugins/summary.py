"""A per-variant summary printed at the end of the run, gathered from the test reports of every xdist worker.

Every test parametrized by ``variant`` carries a ``variant`` property (added at collection), so its reports say which
variant they belong to wherever they ran. Tests add what the table shows through ``user_properties``:
``check = conversion`` (the variant's conversion tests), ``key_coverage``, ``max_abs_diff`` (against the reference
implementation) and ``golden`` (``{"kind", "status"}``). The properties also land in the JUnit XML.

Columns: conversion status (outcome of the conversion tests), key coverage, largest logit difference against the
reference, golden status per kind, and the seconds the variant's tests took (setup, call and teardown, which
includes building its checkpoints the first time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from timesformer_convert.variants import VARIANTS

from .grouping import scope_of
from .tables import table_lines

VARIANT_PROPERTY = "variant"
CHECK_PROPERTY = "check"
GOLDEN_PROPERTY = "golden"
_SEVERITY = {"passed": 0, "xpassed": 1, "skipped": 2, "xfailed": 2, "failed": 3}


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        variant = callspec.params.get("variant") if callspec else None
        if isinstance(variant, str) and variant in VARIANTS:
            item.user_properties.append((VARIANT_PROPERTY, variant))


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(VariantSummary(), "variant-summary")


def _outcome(report) -> str | None:
    if report.failed:
        return "failed"
    if report.skipped:
        return "xfailed" if hasattr(report, "wasxfail") else "skipped"
    if report.when == "call":
        return "xpassed" if hasattr(report, "wasxfail") else "passed"
    return None


@dataclass
class ReportedTest:
    variant: str
    outcome: str | None = None
    seconds: float = 0.0
    properties: dict = field(default_factory=dict)


class VariantSummary:
    """Folds test reports into one row per variant and prints the table in the terminal summary."""

    def __init__(self):
        self.tests: dict[str, ReportedTest] = {}
        self.workers: dict[str, set[str]] = {}

    def pytest_runtest_logreport(self, report):
        gateway = getattr(getattr(report, "node", None), "gateway", None)  # the xdist worker that ran it
        if gateway is not None:
            self.workers.setdefault(scope_of(report.nodeid), set()).add(gateway.id)
        properties = dict(report.user_properties)
        variant = properties.get(VARIANT_PROPERTY)
        if variant is None:
            return
        test = self.tests.setdefault(report.nodeid, ReportedTest(variant))
        test.seconds += report.duration
        test.properties.update(properties)
        outcome = _outcome(report)
        if outcome is not None and (test.outcome is None or _SEVERITY[outcome] > _SEVERITY[test.outcome]):
            test.outcome = outcome

    def rows(self) -> list[dict[str, str]]:
        rows = []
        for variant in VARIANTS:
            tests = [test for test in self.tests.values() if test.variant == variant]
            if tests:
                rows.append(self._row(variant, tests))
        return rows

    @staticmethod
    def _row(variant: str, tests: list[ReportedTest]) -> dict[str, str]:
        conversion = [test for test in tests if test.properties.get(CHECK_PROPERTY) == "conversion"]
        failed = sum(test.outcome == "failed" for test in conversion)
        if not conversion:
            status = "-"
        elif failed:
            status = f"FAILED ({failed} of {len(conversion)})"
        elif all(test.outcome == "skipped" for test in conversion):
            status = "skipped"
        else:
            status = f"ok ({len(conversion)} tests)"
        properties: dict = {}
        goldens: dict[str, str] = {}
        for test in tests:
            properties.update({key: value for key, value in test.properties.items() if key != GOLDEN_PROPERTY})
            golden = test.properties.get(GOLDEN_PROPERTY)
            if golden:
                goldens[golden["kind"]] = _golden_status(golden, test.outcome)
        diff = properties.get("max_abs_diff")
        return {
            "variant": variant,
            "conversion": status,
            "key coverage": str(properties.get("key_coverage", "-")),
            "max |diff| ref": f"{diff:.2e}" if isinstance(diff, float) else "-",
            "golden synthetic": goldens.get("synthetic", "-"),
            "golden real": goldens.get("real", "-"),
            "seconds": f"{sum(test.seconds for test in tests):.1f}",
        }

    def spread(self) -> dict[str, list[str]]:
        """Units of work (a variant's tests, see grouping.scope_of) that ran on more than one xdist worker."""
        return {scope: sorted(workers) for scope, workers in self.workers.items() if len(workers) > 1}

    def pytest_terminal_summary(self, terminalreporter):
        rows = self.rows()
        if rows:
            terminalreporter.section("per-variant summary")
            header = list(rows[0])
            for line in table_lines(header, [[row[column] for column in header] for row in rows]):
                terminalreporter.write_line(line)
        for scope, workers in self.spread().items():
            terminalreporter.write_line(
                f"ERROR: the tests of {scope} ran on {', '.join(workers)}; they must share a worker "
                "(see tests/plugins/grouping.py)",
                red=True,
            )

    def pytest_sessionfinish(self, session):
        # Spread tests each recompute what one worker holds in memory: the scheduling is broken, so the run fails.
        if self.spread() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _golden_status(golden: dict, outcome: str) -> str:
    if outcome == "failed":
        return "FAILED"
    if outcome == "xfailed":
        return "xfail (unverified)"
    if outcome in ("skipped", "xpassed"):
        return outcome
    status = golden.get("status", "ok")
    diff = golden.get("max_abs_diff")
    return f"{status} ({diff:.1e})" if isinstance(diff, float) else status
