"""How a run ended, when it did not complete: ``stopped.json`` in its run directory.

A run that stops before its last round (Ctrl-C, SIGTERM, its SuperNodes gone for longer than
``federation.reconnect_timeout``, a round in which no node answered) raises ``RunStopped`` in
the ServerApp. Nothing is finalized: no adapter, no summary; the last checkpoint stands and
``fedllm resume RUN_DIR`` continues from it (clients resend any release of the interrupted
round from their copies, so every round is trained exactly once). The reason is written here
so that every caller (CLI, Python API, ``fedllm launch``) can say truthfully what happened.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

STOPPED_FILE = "stopped.json"


class RunStopped(RuntimeError):
    """The run stopped before completing; it can be resumed from its last checkpoint."""


def write_stopped(run_dir: Path, reason: str, rounds_done: int, rounds: int) -> None:
    from fedllm.io import atomic_write_text

    atomic_write_text(Path(run_dir) / STOPPED_FILE, json.dumps(
        {"reason": reason, "rounds_completed": rounds_done, "rounds": rounds,
         "time": time.time()}, indent=1) + "\n")


def read_stopped(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STOPPED_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def clear_stopped(run_dir: Path) -> None:
    (Path(run_dir) / STOPPED_FILE).unlink(missing_ok=True)


def stopped_message(run_dir: Path, info: dict | None) -> str:
    """One line for the user: what stopped, how far it got, how to finish it."""
    if info is None:
        return f"the run in {run_dir} ended without a result; resume it with `fedllm resume {run_dir}`"
    return (f"run stopped after {info['rounds_completed']} of {info['rounds']} rounds "
            f"({info['reason']}); nothing was finalized: finish it with "
            f"`fedllm resume {run_dir}`")
