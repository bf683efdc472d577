"""A run's identity and its config file, in one place: where a run directory is made, how a
run id is drawn, and how ``config.yaml`` is written (atomically). ``fedllm simulate`` (api),
``fedllm launch`` (cli) and a ServerApp started by ``flwr run`` all go through here.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

CONFIG_FILE = "config.yaml"


def default_run_dir() -> Path:
    """``runs/<timestamp>`` under the working directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def assign_identity(cfg) -> None:
    """Fill ``cfg.run.dir`` (absolute; a fresh ``runs/<timestamp>`` when unset) and
    ``cfg.run.id`` (a fresh 16-hex id when unset), in place."""
    cfg.run.dir = str(Path(cfg.run.dir or default_run_dir()).expanduser().resolve())
    cfg.run.id = cfg.run.id or uuid.uuid4().hex[:16]


def write_config(run_dir: Path, cfg_text: str) -> Path:
    """``config.yaml`` of the run, written atomically (the directory is created)."""
    from fedllm.io import atomic_write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, cfg_text)
    return run_dir / CONFIG_FILE
