"""On-disk cache of calibrated noise multipliers, shared by clients, processes and runs.

Calibrating z for a target ε costs a search over many accountant evaluations; every client
with the same (q, steps, δ, target ε, accountant, sampling) gets the same answer, in this run
and the next. One small JSON file per key, written atomically (temporary file + rename), so
concurrent clients never read a partial entry; a corrupt or foreign file is a miss.

Location: ``$FEDLLM_CALIBRATION_CACHE`` if set (``off`` disables the cache), else
``$FEDLLM_CACHE/calibration``, else ``~/.cache/fedllm/calibration``. Deleting the directory
clears it. A cached z is only a hint: ``accounting.calibrate_noise`` re-checks it with a
pessimistic accountant before using it, so a stale or edited entry can cost utility, never
privacy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is disabled."""
    explicit = os.environ.get("FEDLLM_CALIBRATION_CACHE")
    if explicit:
        return None if explicit.lower() == "off" else Path(explicit).expanduser()
    root = os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm")
    return Path(root).expanduser() / "calibration"


def _entry_path(directory: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return directory / f"{digest}.json"


def load(key: dict) -> float | None:
    """The cached noise multiplier for ``key``, or None."""
    directory = cache_dir()
    if directory is None:
        return None
    try:
        entry = json.loads(_entry_path(directory, key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict):
        return None
    z = entry.get("noise_multiplier")
    # The full key is stored and compared: a hash collision or a foreign file is a miss.
    if entry.get("key") != key or not accepted_number(z):
        return None
    return float(z)


def accepted_number(z) -> bool:
    return isinstance(z, (int, float)) and not isinstance(z, bool) and 0 < z < float("inf")


def store(key: dict, noise_multiplier: float, epsilon: float) -> None:
    """Save a verified calibration; an unwritable cache is skipped, never an error."""
    directory = cache_dir()
    if directory is None:
        return
    entry = {"key": key, "noise_multiplier": noise_multiplier, "epsilon": epsilon}
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, sort_keys=True)
        os.replace(tmp, _entry_path(directory, key))  # atomic on POSIX and Windows
    except OSError as exc:
        log.debug("calibration cache not written (%s): %s", directory, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
