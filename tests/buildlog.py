"""The suite's record of what it built: one JSON line per build in ``builds.log`` in the suite's cache folder.

Kept free of torch and of the suite's fixtures, so the xdist controller and ``benchmarks/bench.py`` can read it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

LOG_NAME = "builds.log"


def record_build(folder: Path, kind: str, name: str, seconds: float) -> None:
    """Append one build (``kind`` is checkpoint, conversion or forward) to the log in ``folder``."""
    line = json.dumps(
        {
            "kind": kind,
            "name": name,
            "seconds": round(seconds, 2),
            "pid": os.getpid(),
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "time": time.time(),
        }
    )
    with open(folder / LOG_NAME, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def builds_since(folder: Path, started: float) -> list[dict]:
    """Entries of the log in ``folder`` written at or after ``started`` (a time.time() value)."""
    log = folder / LOG_NAME
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [entry for entry in entries if entry["time"] >= started]


def describe_builds(entries: list[dict]) -> str:
    """What a run built, counted by kind, naming anything built more than once (each build should happen once per
    run, whichever worker needs it first)."""
    if not entries:
        return "nothing, everything was read from the cache"
    counts = Counter((entry["kind"], entry["name"]) for entry in entries)
    repeated = sorted(f"{kind} {name} x{count}" for (kind, name), count in counts.items() if count > 1)
    kinds = Counter(kind for kind, _ in counts)
    return (
        f"{kinds['checkpoint']} checkpoints, {kinds['conversion']} conversions, "
        f"{kinds['reference'] + kinds['outputs']} forward passes "
        f"({'each once' if not repeated else 'REPEATED: ' + ', '.join(repeated)})"
    )
