"""What a plain ``pytest`` run reports, read from one such run of this suite made for these tests.

The run has no options but ``--golden-dir``: a folder where the synthetic goldens of PERTURBED_GOLDENS each have one
value moved by 1e-3. It runs those variants' synthetic gates, one real golden, and the real tier's first test of
every variant. It is made once per session (tests/running.py, ``once_per_run``), and the scheduler keeps this
file's tests on one worker (tests/plugins/grouping.py), so no worker waits for another's run.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.running import ROOT, Completed, failure_section, once_per_run, run_pytest, shared_folder
from tests.test_golden import BASE, PERTURBED_GOLDENS, copy_golden, perturb
from timesformer_convert.golden import golden_path
from timesformer_convert.variants import VARIANTS


@dataclass(frozen=True)
class PlainRun:
    goldens: Path
    result: Completed


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory, golden_store) -> PlainRun:
    goldens = shared_folder(tmp_path_factory) / "perturbed-goldens"

    def make() -> Completed:
        for variant, (value, _) in PERTURBED_GOLDENS.items():
            data, target = copy_golden(golden_store, "synthetic", variant, goldens)
            target.write_text(json.dumps(perturb(data, value, 1e-3), indent=2))
        return run_pytest(
            *(f"tests/test_golden.py::test_synthetic_golden[{variant}]" for variant in PERTURBED_GOLDENS),
            f"tests/test_golden.py::test_real_golden[{BASE}]",
            "tests/test_real.py::test_the_checkpoint_has_the_declared_variants_shape",
            "--golden-dir",
            goldens,
        )

    return PlainRun(goldens, once_per_run(tmp_path_factory, "plain-run", make))


def shown_as(path: Path) -> Path:
    """``path`` as the run prints it: relative to the checkout, where it runs, when it lies inside it (a TMPDIR
    inside the checkout), else as given."""
    return path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path


def skip_lines(result: Completed) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("SKIPPED [")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "value", "divergent"),
    [(variant, *moved) for variant, moved in PERTURBED_GOLDENS.items()],
    ids=[f"{variant}-{value.split(' ')[0].split('[')[0]}" for variant, (value, _) in PERTURBED_GOLDENS.items()],
)
def test_golden_perturbed_by_1e3_fails_the_run(variant, value, divergent, plain_run):
    # plain_run's golden folder holds this variant's golden with ``value`` moved by 1e-3.
    result = plain_run.result
    section = failure_section(result.stdout, f"test_synthetic_golden[{variant}]")
    target = shown_as(golden_path(plain_run.goldens, "synthetic", variant))

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{variant}: the converted model's outputs differ from the synthetic golden {target}" in section
    assert f"first divergent block against the golden's hidden states: {divergent}" in section
    assert "first divergent block against the reference implementation: none" in section
    assert f"--refresh-golden --golden-variant {variant}" in section
    assert f"{len(PERTURBED_GOLDENS)} failed" in result.stdout.splitlines()[-1]


def test_real_goldens_skip_with_how_to_enable_them(plain_run):
    skips = skip_lines(plain_run.result)

    (line,) = [line for line in skips if "real checkpoints are not enabled" in line]
    assert line.startswith("SKIPPED [1] ") and "pass --real" in line and "--checkpoint-dir=DIR" in line, line


def test_the_real_tier_is_off_by_default_and_says_how_to_enable_it(plain_run):
    skips = skip_lines(plain_run.result)

    (line,) = [line for line in skips if "real tier is off" in line]
    assert line.startswith(f"SKIPPED [{len(VARIANTS)}] "), line
    assert "enable the real tier with --real" in line and "--checkpoint-dir" in line, line
