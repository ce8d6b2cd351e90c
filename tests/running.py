"""Running the command line, or pytest itself, from a test, and reading the result the way a shell would.

``run_cli`` calls :func:`timesformer_convert.cli.main` in this process, with stdout and stderr captured and the exit
status returned as a subprocess reports it; torch and transformers are imported once, so a run costs what the
command does. ``run_cli_process`` runs it in a process of its own, for what only a process shows: a fault that kills
it, a run beside another. ``run_pytest`` runs this suite as a user or a CI job does, and ``once_per_run`` lets the
tests of every xdist worker share one such run.

Those processes are forked from the run's fork server (tests/forkserver.py), which has imported torch, transformers'
TimeSformer and pytest once for all workers: a child starts in milliseconds rather than the seconds a new interpreter
spends on imports, and has none of this process's threads or state. What the server's imports read from the
environment (huggingface_hub reads ``HF_*``) is fixed when it starts, so a run that changes those variables gets a
new interpreter instead (the hub cache's folder excepted: this package reads it when used). So does
``run_cli_interpreter``, for what only a new interpreter shows: what a library prints while it is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from timesformer_convert.cache import build_once
from timesformer_convert.cli import main
from timesformer_convert.hub import HUB_CACHE_VARIABLES

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


def run_cli_process(*args, code: str = "", cwd: Path | str | None = None, timeout: float = 300) -> Completed:
    """``timesformer-convert ARGS`` in a process of its own that first runs ``code`` (which may install a fault)."""
    return Forked.cli(args, code=code, cwd=cwd).wait(timeout)


def run_cli_interpreter(*args, cwd: Path | str | None = None) -> Completed:
    """``timesformer-convert ARGS`` in a new interpreter, which imports everything itself."""
    argv = [sys.executable, "-m", "timesformer_convert.cli", *map(str, args)]
    result = subprocess.run(argv, cwd=cwd, env=_cli_environment(), capture_output=True, text=True, timeout=300)
    return Completed(argv, result.returncode, result.stdout, result.stderr)


def run_pytest(*args, env: dict[str, str] | None = None, drop: tuple[str, ...] = (), timeout: float = 1800):
    """``pytest ARGS`` on this repository in a process of its own, without the cache provider (nor the hypothesis
    and anyio plugins) and with skip reasons shown; ``env`` is added to this process's environment, less the
    variables starting with PRIVATE_VARIABLES or ``drop``."""
    hidden = PRIVATE_VARIABLES + drop
    environment = {key: value for key, value in os.environ.items() if not key.startswith(hidden)}
    environment.update(env or {})
    # The runs started from tests select no property-based or async tests: their plugins' imports are skipped.
    argv = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio", "-rs", *map(str, args)]
    if Forked.can_run_with(environment):
        return Forked.pytest(argv, environment).wait(timeout)
    command = [sys.executable, "-m", "pytest", *argv]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    return Completed(command, result.returncode, result.stdout, result.stderr)


def _cli_environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


# --- processes forked from the server that has done the slow imports (tests/forkserver.py) -------------------------

SERVER_ENV = "TIMESFORMER_SUITE_FORK_SERVER"  # the server's folder, inherited by xdist workers and forked runs
SERVER_START_SECONDS = 300
# Read from the environment while the server imports (huggingface_hub's settings); a child cannot change them. The
# hub cache's folder is the exception: this package reads it when it asks for a file (hub.hub_cache_dir).
READ_ON_IMPORT = ("HF_",)
READ_WHEN_USED = ("HF_HOME", *HUB_CACHE_VARIABLES)
_started: list[subprocess.Popen] = []


def start_fork_server() -> None:
    """Start a fork server for this process and every process it starts later (they inherit its folder through
    SERVER_ENV). It loads in the background; the first command waits for it."""
    folder = Path(tempfile.mkdtemp(prefix="fork-server-"))
    imported = {key: value for key, value in os.environ.items() if key.startswith(READ_ON_IMPORT)}
    (folder / "environment.json").write_text(json.dumps(imported))
    with open(folder / "server.log", "w") as log:
        command = [sys.executable, "-m", "tests.forkserver", str(folder)]
        _started.append(subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
    os.environ[SERVER_ENV] = str(folder)


def stop_fork_server() -> None:
    """Stop the server this process started, if any (it would stop by itself once this process is gone)."""
    while _started:
        server = _started.pop()
        server.terminate()
        server.wait(timeout=30)
    folder = os.environ.pop(SERVER_ENV, None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def _server_folder() -> Path:
    folder = os.environ.get(SERVER_ENV)
    if not folder or not Path(folder).is_dir():  # a run without an xdist controller starts its own on first use
        start_fork_server()
        atexit.register(stop_fork_server)
        folder = os.environ[SERVER_ENV]
    return Path(folder)


@functools.cache
def _server_environment(folder: Path) -> dict[str, str]:
    return json.loads((folder / "environment.json").read_text())


def _connect(folder: Path) -> socket.socket:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(str(folder / "socket"))
            return connection
        except (FileNotFoundError, ConnectionRefusedError):
            connection.close()
        if (folder / "failed").exists():
            traceback = (folder / "failed").read_text()
            raise RuntimeError(f"the fork server could not start: {traceback.splitlines()[-1]}\n{traceback}")
        if time.monotonic() > deadline:
            log = folder / "server.log"
            raise TimeoutError(f"the fork server in {folder} did not listen within {SERVER_START_SECONDS} s: {log}")
        time.sleep(0.02)


class Forked:
    """One command in a process forked from the fork server; ``wait`` returns what it printed and its exit status
    (minus the signal's number when a signal ended it, as subprocess reports)."""

    def __init__(self, kind: str, argv: list[str], code: str, cwd, env: dict[str, str]):
        if not self.can_run_with(env):
            raise ValueError("the environment changes HF_* variables the fork server read on import")
        self.argv = argv
        self._folder = tempfile.TemporaryDirectory(prefix="forked-")
        self._out, self._err = (os.path.join(self._folder.name, name) for name in ("stdout", "stderr"))
        command = {"kind": kind, "argv": argv, "code": code, "cwd": str(cwd or os.getcwd()), "env": env}
        self._connection = _connect(_server_folder())
        self._connection.sendall(json.dumps({**command, "stdout": self._out, "stderr": self._err}).encode() + b"\n")
        self._replies = self._connection.makefile("r")
        self.pid = int(self._replies.readline())

    @classmethod
    def can_run_with(cls, env: dict[str, str]) -> bool:
        """Whether ``env`` agrees with the server's on the variables read on import."""
        server = _server_environment(_server_folder())
        names = {key for key in (*env, *server) if key.startswith(READ_ON_IMPORT) and key not in READ_WHEN_USED}
        return all(env.get(name) == server.get(name) for name in names)

    @classmethod
    def cli(cls, args, code: str = "", cwd=None) -> Forked:
        return cls("cli", [str(arg) for arg in args], code, cwd, _cli_environment())

    @classmethod
    def pytest(cls, argv: list[str], env: dict[str, str]) -> Forked:
        return cls("pytest", argv, "", ROOT, env)

    @classmethod
    def python(cls, code: str, *args, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> Forked:
        """``python -c CODE ARGS``, with ``env`` added to this process's environment, less the variables starting
        with ``drop``."""
        environment = {key: value for key, value in os.environ.items() if not (drop and key.startswith(drop))}
        return cls("python", [str(arg) for arg in args], code, None, {**environment, **(env or {})})

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> Completed:
        self._connection.settimeout(timeout)
        try:
            status = self._replies.readline()
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"{' '.join(self.argv)} did not finish in {timeout} s") from None
        finally:
            self._replies.close()
            self._connection.close()
        with self._folder:
            printed = (Path(path).read_text() if os.path.exists(path) else "" for path in (self._out, self._err))
            stdout, stderr = printed
        return Completed(self.argv, int(status), stdout, stderr)


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


def failure_section(output: str, test: str) -> str:
    """What pytest printed for the failure of ``test``: from its ``___ test ___`` header to the next header."""
    lines = output.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("_") and f" {test} " in line]
    assert starts, f"no failure section for {test} in:\n{output}"
    section = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith(("___", "===")):
            break
        section.append(line)
    return "\n".join(section)


class Options:
    """Stands in for pytest's config in the option checks that run when pytest starts."""

    def __init__(self, **options):
        self.options = {f"--{name.replace('_', '-')}": value for name, value in options.items()}

    def getoption(self, name):
        return self.options[name]
