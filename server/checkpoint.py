"""Server checkpoints: one file per run, rewritten atomically after every completed round.

``checkpoint.npz`` holds the global adapter tensors and, under ``__state__``, a JSON document
with the round number, the strategy's state (sampling RNG, per-client privacy events, rounds
whose user-level aggregate was released) and the recorder's history. A crash leaves the last
complete checkpoint; resuming continues from the round after it.
"""

from __future__ import annotations

import io
import json
import random
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedllm.io import atomic_write_bytes
from fedllm.privacy.accounting import PrivacyEvent

CHECKPOINT = "checkpoint.npz"
STATE_KEY = "__state__"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save(run_dir: Path, server_round: int, arrays: "OrderedDict[str, np.ndarray]",
         strategy, recorder) -> None:
    """``strategy``: the whole stack (its core holds the bookkeeping)."""
    from fedllm.server.strategy import server_optimizer

    core = strategy.core
    state = {
        "version": VERSION,
        "round": server_round,
        "run_id": core.run_id,
        # OS entropy (the server's cohorts) has no state to save; a seeded test RNG does.
        "rng": None if isinstance(core.rng, random.SystemRandom)
        else _rng_to_json(core.rng.getstate()),
        "sampler": core.sampler.state(),
        "events": {cid: [e.to_dict() for e in evs] for cid, evs in core.events.items()},
        "client_params": core.client_params,
        "user_releases": core.user_releases,
        "rounds": [asdict(r) for r in core.rounds],
        "history": recorder.history,
        "base": recorder.base,
        "epsilons": recorder.epsilons,
        "order": list(arrays),
    }
    # Server optimizer state (FedAdam/FedYogi moments, FedAvgM momentum): resumed exactly.
    optimizer = server_optimizer(strategy)
    opt_state = optimizer.state_arrays() if optimizer is not None else {}
    state["server_opt_order"] = list(opt_state)
    buf = io.BytesIO()
    payload = {f"a{i}": np.asarray(v) for i, v in enumerate(arrays.values())}
    payload.update({f"s{i}": np.asarray(v) for i, v in enumerate(opt_state.values())})
    np.savez(buf, **payload, **{STATE_KEY: np.frombuffer(json.dumps(state).encode(), np.uint8)})
    atomic_write_bytes(Path(run_dir) / CHECKPOINT, buf.getvalue())


def load(run_dir: Path) -> tuple[dict, "OrderedDict[str, np.ndarray]"] | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            state = json.loads(bytes(data[STATE_KEY]).decode())
            arrays = OrderedDict((name, data[f"a{i}"].copy())
                                 for i, name in enumerate(state["order"]))
            state["server_opt_arrays"] = {name: data[f"s{i}"].copy() for i, name in
                                          enumerate(state.get("server_opt_order", []))}
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has unsupported version {state.get('version')}")
    return state, arrays


def restore(state: dict, strategy, recorder) -> None:
    from fedllm.server.strategy import RoundInfo, server_optimizer

    core = strategy.core
    if state["rng"] is not None and not isinstance(core.rng, random.SystemRandom):
        core.rng.setstate(_rng_from_json(state["rng"]))
    core.sampler.restore(state.get("sampler", {}))
    core.events = {cid: [PrivacyEvent.from_dict(e) for e in evs]
                   for cid, evs in state["events"].items()}
    core.client_params = state["client_params"]
    core.user_releases = list(state["user_releases"])
    core.rounds = [RoundInfo(**r) for r in state["rounds"]]
    core.round_offset = int(state["round"])
    optimizer = server_optimizer(strategy)
    if optimizer is not None:
        optimizer.load_state_arrays(state.get("server_opt_arrays", {}))
    recorder.history = state["history"]
    recorder.base = state["base"]
    recorder.epsilons = state["epsilons"]


def _rng_to_json(rng_state) -> list:
    version, internal, gauss = rng_state
    return [version, list(internal), gauss]


def _rng_from_json(data: list):
    return (data[0], tuple(data[1]), data[2])


def completed_rounds(run_dir: Path) -> int:
    """The last round the checkpoint holds (0 without one, or if it cannot be read)."""
    try:
        loaded = load(run_dir)
    except CheckpointError:
        return 0
    return int(loaded[0]["round"]) if loaded else 0
