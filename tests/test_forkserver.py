"""The fork server the process-level tests share (tests/forkserver.py), on a server that preloads nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.running import ROOT, _connect

SERVE = "import sys; from pathlib import Path; from tests.forkserver import serve; serve(Path(sys.argv[1]), {})"


def start_server(folder: Path, preload: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-c", SERVE.format(preload), str(folder)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ask(folder: Path, tmp_path: Path, code: str) -> tuple[int, str]:
    """Run ``python -c CODE`` on the server in ``folder``: its exit status and what it printed."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    command = {"kind": "python", "argv": [], "code": code, "cwd": str(tmp_path), "env": dict(os.environ)}
    with _connect(folder) as connection, connection.makefile("r") as replies:
        connection.sendall(json.dumps({**command, "stdout": str(out), "stderr": str(err)}).encode() + b"\n")
        int(replies.readline())
        status = int(replies.readline())
    return status, out.read_text() + err.read_text()


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    process = start_server(folder, [])
    yield folder
    process.terminate()
    process.wait(timeout=30)


def test_a_child_reports_its_output_and_status_as_subprocess_does(server, tmp_path):
    assert ask(server, tmp_path, "print('out'); import sys; print('err', file=sys.stderr); sys.exit(3)") == (
        3,
        "out\nerr\n",
    )
    assert ask(server, tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")[0] == -signal.SIGKILL
    status, printed = ask(server, tmp_path, "raise KeyError('boom')")
    assert status == 1 and "KeyError: 'boom'" in printed


def test_a_server_whose_imports_fail_is_reported(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    process = start_server(folder, ["a_module_that_is_not_installed"])

    with pytest.raises(RuntimeError, match="could not start:.*a_module_that_is_not_installed"):
        _connect(folder)
    assert process.wait(timeout=30) != 0


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    # A parent that starts the server, waits until it listens and exits without stopping it; the server removes its
    # folder on its way out.
    parent = (
        "import subprocess, sys, time; from pathlib import Path\n"
        f"server = subprocess.Popen([sys.executable, '-c', {SERVE.format([])!r}, sys.argv[1]])\n"
        "while not (Path(sys.argv[1]) / 'socket').exists(): time.sleep(0.01)\n"
    )
    subprocess.run([sys.executable, "-c", parent, str(folder)], cwd=ROOT, check=True, timeout=300)

    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not folder.exists(), "the server outlived the process that started it"
