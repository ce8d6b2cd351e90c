"""The per-variant summary folds test reports (as xdist hands them to the controller) into one row per variant."""

import pytest

from tests.plugins.summary import VariantSummary

K400, SSV2 = "timesformer-base-finetuned-k400", "timesformer-base-finetuned-ssv2"


def report(name, variant, when="call", outcome="passed", duration=1.0, properties=(), **extra):
    return pytest.TestReport(
        nodeid=f"tests/test_x.py::{name}[{variant}]",
        location=("tests/test_x.py", 1, name),
        keywords={},
        outcome=outcome,
        longrepr=None if outcome == "passed" else "why",
        when=when,
        duration=duration,
        user_properties=[("variant", variant), *properties],
        **extra,
    )


def fold(*reports):
    summary = VariantSummary()
    for each in reports:
        summary.pytest_runtest_logreport(each)
    return {row["variant"]: row for row in summary.rows()}


def test_rows_gather_properties_outcomes_and_seconds():
    conversion = ("check", "conversion")
    rows = fold(
        report("coverage", K400, "setup", duration=2.0, properties=[conversion]),
        report("coverage", K400, properties=[conversion, ("key_coverage", "249/249")]),
        report("logits", K400, properties=[conversion, ("max_abs_diff", 2.5e-6)]),
        report("golden", K400, properties=[("golden", {"kind": "synthetic", "status": "ok", "max_abs_diff": 3e-8})]),
        report("real", K400, outcome="skipped", properties=[("golden", {"kind": "real", "status": "pending"})]),
        report("coverage", SSV2, properties=[conversion]),
        report("logits", SSV2, "teardown", outcome="failed", properties=[conversion]),
        report("golden", SSV2, outcome="failed", properties=[("golden", {"kind": "synthetic", "status": "pending"})]),
        report("real", SSV2, outcome="skipped", wasxfail="unverified", properties=[("golden", {"kind": "real"})]),
    )

    assert rows[K400] == {
        "variant": K400,
        "conversion": "ok (2 tests)",
        "key coverage": "249/249",
        "max |diff| ref": "2.50e-06",
        "golden synthetic": "ok (3.0e-08)",
        "golden real": "skipped",
        "seconds": "6.0",
    }
    assert rows[SSV2]["conversion"] == "FAILED (1 of 2)"
    assert rows[SSV2]["golden synthetic"] == "FAILED"
    assert rows[SSV2]["golden real"] == "xfail (unverified)"
    assert rows[SSV2]["key coverage"] == "-" and rows[SSV2]["max |diff| ref"] == "-"


def test_reports_of_no_variant_are_left_out():
    summary = VariantSummary()
    unrelated = report("rules", K400)
    unrelated.user_properties = []

    summary.pytest_runtest_logreport(unrelated)

    assert summary.rows() == []


class Node:
    """Stands in for the xdist worker controller that the controller sets on each report."""

    def __init__(self, worker):
        self.gateway = type("Gateway", (), {"id": worker})()


class Session:
    def __init__(self, exitstatus):
        self.exitstatus = exitstatus


def test_a_variant_spread_over_workers_is_named_and_fails_the_run():
    summary = VariantSummary()
    for name, variant, worker in [("a", K400, "gw0"), ("b", K400, "gw0"), ("a", SSV2, "gw0"), ("b", SSV2, "gw1")]:
        each = report(name, variant)
        each.node = Node(worker)
        summary.pytest_runtest_logreport(each)
    session = Session(pytest.ExitCode.OK)

    summary.pytest_sessionfinish(session)

    assert summary.spread() == {SSV2: ["gw0", "gw1"]}
    assert session.exitstatus == pytest.ExitCode.TESTS_FAILED


def test_one_worker_per_variant_or_no_workers_leaves_the_run_alone():
    summary = VariantSummary()
    for name, variant, worker in [("a", K400, "gw0"), ("b", K400, "gw0"), ("a", SSV2, "gw1"), ("c", SSV2, None)]:
        each = report(name, variant)
        if worker:
            each.node = Node(worker)
        summary.pytest_runtest_logreport(each)
    # A test of K400 whose id does not name it is a unit of its own: the scheduler may send it anywhere.
    unnamed = report("d", K400)
    unnamed.nodeid, unnamed.node = "tests/test_x.py::d[hr-with-8-frames]", Node("gw1")
    summary.pytest_runtest_logreport(unnamed)
    session = Session(pytest.ExitCode.OK)

    summary.pytest_sessionfinish(session)

    assert summary.spread() == {} and session.exitstatus == pytest.ExitCode.OK
