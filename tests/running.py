"""Running the command line, or pytest itself, from a test, and reading the result the way a shell would.

``run_cli`` calls :func:`timesformer_convert.cli.main` in this process, with stdout and stderr captured and the exit
status returned as a subprocess reports it; torch and transformers are imported once, so a run costs what the
command does. ``run_cli_process`` starts a fresh interpreter, for what only a process shows: a fault that kills it,
the installed entry point, and anything a library prints on its own. ``run_pytest`` runs this suite as a user or a CI
job does, and ``once_per_run`` lets the tests of every xdist worker share one such run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from timesformer_convert.cache import build_once
from timesformer_convert.cli import main

ROOT = Path(__file__).resolve().parents[1]
# Variables of the calling run that must not leak into a run started from a test: xdist's and pytest's own, CI
# (which --refresh-golden refuses) and the real tier's checkpoint folder.
PRIVATE_VARIABLES = ("PYTEST_", "CI", "TIMESFORMER_CHECKPOINT")


@dataclass(frozen=True)
class Completed:
    """What ``subprocess.run`` would report for the same command."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cwd: Path | str | None = None) -> Completed:
    """``timesformer-convert ARGS`` in this process, in ``cwd`` (default: the current folder)."""
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse's usage errors and --help
            status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    return Completed(argv, status, stdout.getvalue(), stderr.getvalue())


def run_cli_process(*args, code: str = "", cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """``timesformer-convert ARGS`` in a fresh interpreter that first runs ``code`` (which may install a fault)."""
    program = f"import sys\nfrom timesformer_convert.cli import main\n{code}\nsys.exit(main())\n"
    return subprocess.run(
        [sys.executable, "-c", program, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


def run_pytest(
    *args, env: dict[str, str] | None = None, drop: tuple[str, ...] = (), timeout: float = 1800
) -> Completed:
    """``pytest ARGS`` on this repository in a fresh process, without the cache provider and with skip reasons
    shown; ``env`` is added to this process's environment, less the variables starting with PRIVATE_VARIABLES or
    ``drop``."""
    hidden = PRIVATE_VARIABLES + drop
    environment = {key: value for key, value in os.environ.items() if not key.startswith(hidden)}
    environment.update(env or {})
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *map(str, args)]
    result = subprocess.run(argv, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    return Completed(argv, result.returncode, result.stdout, result.stderr)


def shared_folder(tmp_path_factory) -> Path:
    """This run's temporary folder that every xdist worker sees (each worker's own lies inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_run(tmp_path_factory, name: str, make: Callable[[], Completed]) -> Completed:
    """``make()``, run by the first test of this pytest run that asks, on whichever xdist worker; the others wait
    for it and read its result. Kept in the run's temporary folder, so the next run makes it afresh."""
    target = shared_folder(tmp_path_factory) / f"{name}.json"
    build_once(target, lambda staging: staging.write_text(json.dumps(asdict(make()))))
    return Completed(**json.loads(target.read_text()))
