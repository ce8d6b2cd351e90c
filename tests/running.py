"""Running the command line from a test, and reading its result the way a shell would.

``run_cli`` calls :func:`timesformer_convert.cli.main` in this process, with stdout and stderr captured and the exit
status returned as a subprocess reports it; torch and transformers are imported once, so a run costs what the
command does. ``run_cli_process`` starts a fresh interpreter, for what only a process shows: a fault that kills it,
the installed entry point, and anything a library prints on its own.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from timesformer_convert.cli import main


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
