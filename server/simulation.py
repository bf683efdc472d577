"""Run the ServerApp and ClientApp in Flower's simulation runtime, locally or on a Ray cluster.

This is the one place that decides how simulation starts: Flower's Python-level entry point
(``flwr.simulation.run_simulation``), in process, with the Ray backend. It needs no app
directory, so ``fedllm simulate`` works from any directory once fedllm is installed; the
apps are the same objects ``flwr run`` uses in deployment.

Where the clients run (``run.*`` keys, docs/scale-out.md):

* ``run.ray_address=null``: a private Ray instance on this machine (``address="local"``, so
  neither ``RAY_ADDRESS`` nor a cluster started here with ``ray start`` is joined by accident),
  sized to this machine's cores and GPUs.
* ``run.ray_address=auto|host:port``: the driver (this process, which also hosts the
  ServerApp) joins that running cluster; the ClientApps run in Ray actors on its nodes.

Each client actor reserves ``run.client_cpus`` CPUs and ``run.client_gpus`` of a GPU, so as
many clients train at once as those shares fit on the nodes (Flower sizes its actor pool node
by node). Ray sets each actor's ``OMP_NUM_THREADS`` (torch's threads) to its whole CPUs and
hides the GPUs it did not reserve.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import warnings
from dataclasses import dataclass

from fedllm.config import ConfigError, RunConfig, from_yaml

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


@dataclass(frozen=True)
class SimulationResources:
    """Where the simulation's clients run and what each one reserves."""
    address: str            # "local" (a private instance) or the cluster to join
    client_cpus: float
    client_gpus: float
    local_cpus: int = 0     # size of the private instance (unused when joining)
    local_gpus: int = 0
    niceness: int = 0       # the private instance's workers (a joined cluster keeps its own)

    @property
    def joins_cluster(self) -> bool:
        return self.address != "local"


def plan_resources(run: RunConfig, *, cpu_count: int, gpu_count: int) -> SimulationResources:
    """Resolve ``run.*`` into per-client shares; refuse what this machine cannot hold.

    ``gpu_count``: GPUs the clients may use here (0 when none is visible or model.device=cpu).
    """
    if run.ray_address is not None:  # the cluster's nodes are checked once joined
        return SimulationResources(address=run.ray_address, client_cpus=run.client_cpus or 1.0,
                                   client_gpus=run.client_gpus or 0.0)
    gpus = run.client_gpus if run.client_gpus is not None else (
        1.0 / run.parallel_clients if gpu_count else 0.0)
    cpus = run.client_cpus or _cpu_share(cpu_count, run.parallel_clients, gpus, gpu_count)
    if cpus > cpu_count:
        raise ConfigError(f"run.client_cpus: {cpus:g} CPUs per client, but this machine has "
                          f"{cpu_count}: no client would fit")
    if gpus > gpu_count:
        raise ConfigError(f"run.client_gpus: {gpus:g} GPUs per client, but {gpu_count} usable "
                          "GPU(s) here (none: no CUDA device is visible, or model.device=cpu)")
    return SimulationResources(address="local", client_cpus=cpus, client_gpus=gpus,
                               local_cpus=cpu_count, local_gpus=gpu_count,
                               niceness=run.client_niceness)


def _cpu_share(cpu_count: int, parallel_clients: int, client_gpus: float,
               gpu_count: int) -> float:
    """Each client's cores when run.client_cpus is unset: split among the clients meant to run
    at once: ``parallel_clients``, or as many as an explicit GPU share fits on the GPUs. By
    default that is one client with every core: torch parallelizes one step better than two
    clients would share two cores, and memory holds one client model only."""
    at_once = parallel_clients
    if client_gpus and gpu_count:
        at_once = max(math.floor(gpu_count / client_gpus + 1e-9), 1)
    # Rounded down to Ray's resource unit (1e-4), so that at_once shares fit in the cores.
    return max(math.floor(cpu_count / at_once * 1e4) / 1e4, 0.01)


def backend_config(res: SimulationResources, verbose: bool) -> dict:
    """Flower's Ray backend config: ``init_args`` go to ``ray.init``; ``client_resources`` is
    what each ClientApp actor reserves (and so how many run at once)."""
    init_args: dict = {"address": res.address, "logging_level": "ERROR",
                       "log_to_driver": verbose}
    if not res.joins_cluster:  # ray.init refuses sizes when it joins an existing cluster
        init_args.update(num_cpus=res.local_cpus, num_gpus=res.local_gpus,
                         include_dashboard=False,
                         # Ray starts its workers at nice 15 unless told otherwise.
                         _system_config={"worker_niceness": res.niceness})
    return {"client_resources": {"num_cpus": res.client_cpus, "num_gpus": res.client_gpus},
            "init_args": init_args}


def clients_that_fit(nodes: list[dict], client_cpus: float, client_gpus: float) -> int:
    """How many client actors the nodes hold at once, node by node (as Flower sizes its pool).
    ``nodes``: each alive node's Ray resources, e.g. ``{"CPU": 4.0, "GPU": 1.0}``."""
    total = 0
    for resources in nodes:
        fit = math.floor(resources.get("CPU", 0) / client_cpus + 1e-9)
        if client_gpus > 0:
            fit = min(fit, math.floor(resources.get("GPU", 0) / client_gpus + 1e-9))
        total += fit
    return total


def join_cluster(res: SimulationResources, verbose: bool) -> None:
    """Connect this driver to the running cluster, and check that a client fits on a node.

    Connecting here (rather than inside Flower) turns a wrong address into one readable error;
    Flower's backend then finds Ray initialized and uses this connection."""
    import ray

    if res.address != "auto":
        check_reachable(res.address)
    try:
        ray.init(address=res.address, logging_level="ERROR", log_to_driver=verbose,
                 runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
    except Exception as exc:  # ConnectionError, a timeout, a version mismatch ...
        raise ConfigError(f"run.ray_address: cannot join the Ray cluster at {res.address}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                          ) from None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    fit = clients_that_fit(nodes, res.client_cpus, res.client_gpus)
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if fit == 0:
        ray.shutdown()
        raise ConfigError(
            f"run.client_cpus / run.client_gpus: no node of the Ray cluster at {res.address} "
            f"holds one client ({res.client_cpus:g} CPU, {res.client_gpus:g} GPU); its "
            f"{len(nodes)} node(s) have {cpus:g} CPUs and {gpus:g} GPUs in all")
    log.info("Joined the Ray cluster at %s: %d node(s), %g CPUs, %g GPUs; up to %d clients "
             "train at once (%g CPU, %g GPU each)", res.address, len(nodes), cpus, gpus, fit,
             res.client_cpus, res.client_gpus)
    if gpus and not res.client_gpus:
        log.warning("The cluster has GPUs but run.client_gpus=0: clients train on CPU")


def start_local_ray(backend: dict) -> None:
    """The private local Ray instance, started here rather than inside Flower (whose backend
    then finds Ray initialized and uses it, as it does a joined cluster), so that the
    interrupt handlers installed afterwards are fedllm's: ``ray.init`` replaces SIGTERM's
    handler with an abrupt ``sys.exit``, whose teardown shuts Ray down under Flower's worker
    threads (Ray then ends the process with exit code 1)."""
    import ray

    ray.init(runtime_env={"env_vars": local_worker_env()}, **backend["init_args"])


def local_worker_env() -> dict[str, str]:
    """Environment of the private instance's client workers: fedllm's import path, and
    OpenMP threads that sleep at a barrier instead of spinning (unless the user chose
    otherwise). Next to another busy process, torch's spinning threads take turns with it on
    the shared core while the other thread waits: a DP step took 12.4 s instead of 8.0 s with
    one thread, and passive waiting brings it to 8.0 s; on an idle machine it costs about 5%
    (4.5 s against 4.3 s; SmolLM2 soft prompt, B = 16 x 64 tokens, 2 cores)."""
    return {"PYTHONPATH": worker_pythonpath(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast when nothing listens at ``host:port``: ray.init would retry for minutes."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"run.ray_address: nothing answers at {address} ({exc}); start the "
                          "cluster's head with `ray start --head --port PORT` and use its "
                          "host:PORT") from None


def worker_pythonpath() -> str:
    """The driver's import path, for the cluster's workers (what Flower's backend passes when
    it starts Ray itself): they must import fedllm exactly as this process does."""
    path = os.pathsep.join(p for p in sys.path if p)
    extra = os.environ.get("PYTHONPATH")
    return f"{path}{os.pathsep}{extra}" if extra else path


def _local_gpu_count(use_gpu: bool) -> int:
    if not use_gpu:
        return 0
    import torch

    return torch.cuda.device_count()


def simulate(cfg_text: str, num_clients: int, *, use_gpu: bool = False,
             verbose: bool = False) -> None:
    """Run the federation described by ``cfg_text`` (resolved YAML) with ``num_clients``
    virtual SuperNodes. ``use_gpu``: model.device allows CUDA and a GPU is visible here."""
    run = from_yaml(cfg_text).run
    res = plan_resources(run, cpu_count=os.cpu_count() or 1, gpu_count=_local_gpu_count(use_gpu))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        backend = backend_config(res, verbose)
        if res.joins_cluster:
            join_cluster(res, verbose)
        else:
            start_local_ray(backend)
        try:
            _run_flower_simulation(cfg_text, num_clients, backend, verbose)
        finally:
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():  # Flower shuts it down unless it failed
                ray.shutdown()


def _run_flower_simulation(cfg_text: str, num_clients: int, backend: dict, verbose: bool
                           ) -> None:
    from flwr.simulation import run_simulation

    from fedllm.clients.app import app as client_app
    from fedllm.server.app import make_server_app

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
        for handler in flwr_logger.handlers:
            handler.addFilter(_DropKnownNoise())
    stop, finished, interrupted = threading.Event(), threading.Event(), threading.Event()
    try:
        with _interrupts_stop(stop, interrupted):
            run_simulation(server_app=make_server_app(cfg_text, stop, finished),
                           client_app=client_app, num_supernodes=num_clients,
                           backend_config=backend, verbose_logging=verbose)
    except BaseException:
        # Ctrl-C / SIGTERM (or a crash) in this thread: Flower has stopped its runtime, but
        # the ServerApp thread would wait out federation.client_timeout and then record empty
        # rounds. Tell it to stop now (no finalization) and wait for it, so the run directory
        # is left consistent and its lock is released only after the ServerApp is gone.
        stop.set()
        finished.wait(timeout=60)
        if interrupted.is_set():
            raise KeyboardInterrupt("interrupted") from None  # the ServerApp's RunStopped
        raise
    if interrupted.is_set():
        raise KeyboardInterrupt("interrupted")


@contextlib.contextmanager
def _interrupts_stop(stop: threading.Event, interrupted: threading.Event):
    """Ctrl-C and SIGTERM stop the run the same way: the ServerApp is told to stop (``stop``)
    and the run reports an interrupt (``interrupted``), in the main thread only, where
    handlers can be set. A second signal raises KeyboardInterrupt at once.

    The interrupt must not depend on a KeyboardInterrupt reaching this frame: Ray defers a
    SIGINT that arrives inside some of its calls and drops it when the call then fails (as it
    does when the same Ctrl-C has killed its workers). So the signal is also read from a
    wakeup fd, which sees every signal whatever handler is in place, by a watcher thread that
    sets both events."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM) and not interrupted.is_set():
            # Event.set takes a lock: never from the handler itself (it may interrupt a
            # thread holding it), always from a thread.
            threading.Thread(target=lambda: (interrupted.set(), stop.set()), daemon=True).start()

    received = []

    def interrupt(signum, frame):
        # The first signal stops the run in order: the ServerApp stops at once, the clients'
        # steps in flight end, then Flower shuts Ray down. A second one stops it now.
        received.append(signum)
        note(signum)
        if len(received) > 1:
            raise KeyboardInterrupt(f"signal {signum}")

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch() -> None:
        try:
            while data := os.read(read_fd, 64):  # b"": the write end was closed
                for signum in data:
                    note(signum)
        except OSError:
            pass
        finally:
            os.close(read_fd)

    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    threading.Thread(target=watch, daemon=True, name="fedllm-interrupts").start()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the watcher reads b"" and exits
