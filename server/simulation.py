"""Run the ServerApp and ClientApp in Flower's simulation runtime on this machine.

This is the one place that decides how simulation starts: Flower's Python-level entry point
(``flwr.simulation.run_simulation``), in process, with the Ray backend. It needs no app
directory, so ``fedllm simulate`` works from any directory once fedllm is installed; the
apps are the same objects ``flwr run`` uses in deployment.
"""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger("fedllm.server")


class _DropKnownNoise(logging.Filter):
    """Flower warnings that are expected here and would only confuse a user."""

    KNOWN = ("DEPRECATED FEATURE", "deprecated feature", "fraction_evaluate is set to 0.0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(k in record.getMessage() for k in self.KNOWN)


def set_offline_env(flwr_home: str) -> None:
    os.environ.setdefault("FLWR_HOME", flwr_home)
    for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "RAY_DEDUP_LOGS": "0"}.items():
        os.environ.setdefault(key, value)


def simulate(cfg_text: str, num_clients: int, *, num_cpus: int | None = None,
             use_gpu: bool = False, verbose: bool = False, parallel_clients: int = 1) -> None:
    from flwr.simulation import run_simulation

    from fedllm.clients.app import app as client_app
    from fedllm.server.app import make_server_app

    cpus = num_cpus or os.cpu_count() or 1
    # By default one client at a time gets every core: torch parallelizes one step better than
    # two clients would share two cores, and memory holds one client model only.
    per_client = max(cpus / parallel_clients, 0.01)
    backend_config = {
        "client_resources": {"num_cpus": per_client,
                             "num_gpus": 1.0 / parallel_clients if use_gpu else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if use_gpu else 0,
                      "include_dashboard": False, "logging_level": "ERROR",
                      "log_to_driver": verbose},
    }
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
        for handler in flwr_logger.handlers:
            handler.addFilter(_DropKnownNoise())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        run_simulation(server_app=make_server_app(cfg_text), client_app=client_app,
                       num_supernodes=num_clients, backend_config=backend_config,
                       verbose_logging=verbose)
