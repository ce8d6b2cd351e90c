"""A process that imports torch, transformers' TimeSformer and pytest once, then forks a child for each command.

Tests that need a process of their own (a run killed by a signal, two runs at once, pytest run as a user runs it)
would otherwise each start an interpreter and spend seconds importing. One server serves a whole test run: the xdist
controller starts it before its workers, so it loads while they do, and every worker forks from it
(``tests/running.py``). It forks before any thread exists in it, so a child has no other thread's locks, and it exits
when the process that started it is gone.

Run as ``python -m tests.forkserver FOLDER``. It listens on ``FOLDER/socket`` once its imports are done (or writes
``FOLDER/failed`` if they fail). A client sends one JSON line: ``kind`` (``pytest``, ``python`` or ``cli``), ``argv``,
``code``, ``cwd``, ``env`` and the ``stdout`` / ``stderr`` files. The server answers the child's pid on one line, then,
when the child ends, its exit status as subprocess reports it (``-N`` for signal N) on another, and closes.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import traceback
from pathlib import Path

PRELOAD = ["torch", "transformers.models.timesformer.modeling_timesformer", "timesformer_convert.cli", "pytest"]
# How often the server checks that the process that started it is still there, in seconds.
OWNER_CHECK_SECONDS = 0.5


def run_command(command: dict) -> None:
    """In the forked child: take the command's environment, folder and output files, then run it."""
    os.environ.clear()
    os.environ.update(command["env"])
    os.chdir(command["cwd"])
    for descriptor, path in ((1, command["stdout"]), (2, command["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, descriptor)
        os.close(handle)
    kind, argv, code = command["kind"], command["argv"], command["code"]
    if kind == "pytest":
        import pytest

        sys.exit(int(pytest.main(argv)))
    if kind == "python":  # as ``python -c CODE ARGS``
        sys.argv = ["-c", *argv]
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
        return
    from timesformer_convert.cli import script  # the installed command's entry point, signal handling included

    exec(compile(code, "<fault>", "exec"), {"__name__": "__fault__"})
    sys.argv = ["timesformer-convert", *argv]
    sys.exit(script())


def _exit_status(error: SystemExit) -> int:
    """The status the interpreter would exit with for ``error``."""
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)
    return 1


def _child(command: dict, closing: list) -> None:
    """The forked process: run ``command`` and leave without returning to the server's loop."""
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for resource in closing:
            if isinstance(resource, int):
                os.close(resource)
            else:
                resource.close()
        run_command(command)
        status = 0
    except SystemExit as error:
        status = _exit_status(error)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)


def serve(folder: Path, preload: list[str] = PRELOAD) -> None:
    """Import ``preload``, then serve commands until the process that started this one is gone (or SIGTERM), and
    remove ``folder``. If an import fails, say so in ``folder/failed`` for the clients waiting to connect."""
    owner = os.getppid()
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException:
        (folder / "failed").write_text(traceback.format_exc())
        raise
    # What is loaded now lives as long as the server: the collector need not walk it again, neither in a child (whose
    # pages then stay shared with the server) nor when the server exits.
    gc.freeze()
    try:
        _serve(folder, owner)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _serve(folder: Path, owner: int) -> None:
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a child's end wakes the loop below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / "socket"))
    listener.listen(16)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    while os.getppid() == owner:
        ready, _, _ = select.select([listener, wake_read], [], [], OWNER_CHECK_SECONDS)
        if wake_read in ready:
            os.read(wake_read, 4096)
        if listener in ready:
            connection, _ = listener.accept()
            connection.settimeout(10)
            with connection.makefile("r") as lines:
                command = json.loads(lines.readline())
            pid = os.fork()
            if pid == 0:
                _child(command, [listener, connection, *waiting.values(), wake_read, wake_write])
            connection.sendall(f"{pid}\n".encode())
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:  # the client gave up waiting
                    pass
                connection.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
