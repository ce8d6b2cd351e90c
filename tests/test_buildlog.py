"""The record of what a run built, and the line that reports it: a build done twice in one run must show."""

import time

from tests.buildlog import builds_since, describe_builds, record_build


def _build_all(folder, variants):
    for name in variants:
        record_build(folder, "checkpoint", f"{name}.pyth", 1.0)
        record_build(folder, "conversion", name, 1.0)
        record_build(folder, "reference", name, 1.0)
        record_build(folder, "outputs", name, 1.0)


def test_a_run_counts_only_its_own_builds(tmp_path):
    _build_all(tmp_path, ["base", "hr"])
    started = time.time()
    _build_all(tmp_path, ["large"])

    entries = builds_since(tmp_path, started)

    assert [(entry["kind"], entry["name"]) for entry in entries] == [
        ("checkpoint", "large.pyth"),
        ("conversion", "large"),
        ("reference", "large"),
        ("outputs", "large"),
    ]
    assert describe_builds(entries) == "1 checkpoints, 1 conversions, 2 forward passes (each once)"


def test_a_build_repeated_in_one_run_is_named(tmp_path):
    started = time.time()
    _build_all(tmp_path, ["base", "hr"])
    record_build(tmp_path, "conversion", "hr", 1.0)

    line = describe_builds(builds_since(tmp_path, started))

    assert line == "2 checkpoints, 2 conversions, 4 forward passes (REPEATED: conversion hr x2)"


def test_a_run_that_built_nothing_says_so(tmp_path):
    assert builds_since(tmp_path, 0.0) == []
    assert describe_builds([]) == "nothing, everything was read from the cache"
