"""Find and stop process trees by command line: the local Ray cluster, a detached SuperLink.

Used by experiments/ray_local_cluster.py and the tests that start processes which outlive
their parent (`ray start`, `flwr run`'s local SuperLink).
"""

from __future__ import annotations

import os
import re
import time

import psutil


def process_trees(pattern: str | re.Pattern) -> list[int]:
    """Processes whose command line matches ``pattern``, plus all their descendants."""
    tag = re.compile(pattern) if isinstance(pattern, str) else pattern
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] != os.getpid() and tag.search(cmd):
            roots.append(proc)
    own = {p.pid for p in roots}
    for root in roots:
        try:
            own.update(child.pid for child in root.children(recursive=True))
        except psutil.Error:  # ended meanwhile
            continue
    return sorted(own)


def stop(pids: list[int], term_wait: float = 15.0, kill_wait: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left; returns the pids still running (should be none)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for wait, send in ((term_wait, "terminate"), (kill_wait, "kill")):
        for proc in procs:
            try:
                getattr(proc, send)()
            except psutil.NoSuchProcess:
                pass
        # Poll rather than psutil.wait_procs: these are not our children, and a zombie nobody
        # reaps keeps its pid, which wait_procs would wait on until the timeout.
        deadline = time.monotonic() + wait
        while (procs := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not procs:
            break
    return [p.pid for p in procs]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie has ended; only its wait remains
    except psutil.NoSuchProcess:
        return False
