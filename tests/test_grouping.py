"""Which tests share a worker under ``pytest -n``: all of one variant's, found from the test id."""

import pytest

from tests.plugins.grouping import ONE_WORKER_FILES, VariantScheduling, variant_group


@pytest.mark.parametrize(
    ("nodeid", "group"),
    [
        ("tests/test_variants.py::test_config[timesformer-hr-finetuned-k600]", "timesformer-hr-finetuned-k600"),
        ("tests/test_golden.py::test_file[timesformer-large-finetuned-ssv2-real]", "timesformer-large-finetuned-ssv2"),
        ("tests/test_golden.py::test_run[timesformer-base-finetuned-ssv2-block-0]", "timesformer-base-finetuned-ssv2"),
        ("tests/test_x.py::test_y[real-timesformer-base-finetuned-k400]", "timesformer-base-finetuned-k400"),
        (
            "tests/test_x.py::test_y[timesformer-base-finetuned-k400]@timesformer-base-finetuned-k400",
            "timesformer-base-finetuned-k400",
        ),
        ("tests/test_rules.py::test_rule[timesformer-base-finetuned-k4000]", None),
        ("tests/test_rules.py::test_rule[xtimesformer-base-finetuned-k400]", None),
        ("tests/test_rules.py::test_rule[blocks.0.attn.qkv]", None),
        ("tests/test_timesformer-base-finetuned-k400.py::test_plain", None),
    ],
)
def test_the_group_is_the_variant_named_in_the_parameters(nodeid, group):
    assert variant_group(nodeid) == group


def test_tests_of_one_variant_form_one_scope_and_the_rest_spread():
    split = VariantScheduling._split_scope
    same = [
        "tests/test_variants.py::test_a[timesformer-hr-finetuned-ssv2]",
        "tests/test_golden.py::test_b[timesformer-hr-finetuned-ssv2-synthetic]",
    ]
    assert {split(None, nodeid) for nodeid in same} == {"timesformer-hr-finetuned-ssv2"}
    loose = ["tests/test_cli.py::test_a", "tests/test_cli.py::test_b"]
    assert [split(None, nodeid) for nodeid in loose] == loose


def test_the_tests_of_a_one_worker_file_form_one_scope_whatever_variant_they_name():
    split = VariantScheduling._split_scope
    (path,) = ONE_WORKER_FILES
    nodeids = [f"{path}::test_a[timesformer-base-finetuned-k400-logits]", f"{path}::test_b"]

    assert {split(None, nodeid) for nodeid in nodeids} == {path}
