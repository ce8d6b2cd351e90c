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
