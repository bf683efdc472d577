"""Flower ServerApp: FedAvg of DP-trained LoRA adapters, per-round metrics, final export.

``app`` is what ``flwr run`` starts: it takes the resolved fedllm config from the run config
key ``fedllm-config`` (as ``fedllm launch`` sends it), else composes it from conf/ and the
config keys given with ``flwr run --run-config`` (``config_from_run_config``);
``make_server_app(cfg_text)`` builds the same app around a given config for
``fedllm simulate``. Both call ``run_federation``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedllm import models, protocol
from fedllm.config import (ConfigError, FedLLMConfig, compose, from_yaml, participation_cap,
                           run_config_overrides, to_yaml)
from fedllm.data.per_client import run_eval_sequences, run_index
from fedllm.evaluate import evaluate
from fedllm.io import append_jsonl, atomic_write_text, private_dir, read_jsonl
from fedllm.privacy.accounting import (calibrate_user_noise, epsilon, quantized_sensitivity,
                                      user_level_epsilons)
from fedllm.report import EVENTS_FILE, unit_label, write_reports
from fedllm.run_dir import assign_identity, write_config
from fedllm.run_status import RunStopped, clear_stopped, write_stopped
from fedllm.privacy.size_estimate import side_releases
from fedllm.privacy.updates import distributed_noise_std
from fedllm.server.secagg import SecAggPlus
from fedllm.server import checkpoint
from fedllm.server.strategy import (AdapterFedAvg, ServerOptimization, UserDP, UserLevelDP,
                                    cohort_sampler, user_dp_layer)
from fedllm.server.server_opt import ServerOptimizer
from fedllm.server.wire import MeteredGrid
from fedllm.server.strategy_wrapper import find_layer

log = logging.getLogger("fedllm.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_federation(grid, config_from_run_config(dict(context.run_config)))
    except ConfigError as exc:
        log.error("fedllm: %s", exc)  # the one readable line, before Flower's traceback
        raise


def config_from_run_config(run_config: dict) -> str:
    """The run's resolved config (YAML) from Flower's run config: ``fedllm-config`` as
    ``fedllm launch`` sends it, else composed from conf/ and the keys given with
    ``flwr run --run-config``; a fresh run directory and id are filled in here, on the server,
    and the config is saved in the run directory. Raises ConfigError."""
    packed = str(run_config.get(protocol.CONFIG_KEY, ""))
    overrides = run_config_overrides(run_config, ignore=(protocol.CONFIG_KEY,))
    if packed:
        if overrides:
            raise ConfigError(f"{protocol.CONFIG_KEY}: carries the whole config; give no other "
                              f"keys with it (got {', '.join(overrides)})")
        return protocol.decode_config(packed)
    cfg = compose(overrides)
    if cfg.run.resume:
        raise ConfigError("run.resume: continue a run with `fedllm resume RUN_DIR`")
    assign_identity(cfg)
    cfg_text = to_yaml(cfg)
    write_config(Path(cfg.run.dir), cfg_text)
    log.info("fedllm run %s → %s", cfg.run.id, cfg.run.dir)
    return cfg_text


def check_simulated_nodes(grid: Grid, population: int, wait_s: float = 60.0) -> None:
    """Simulation: one SuperNode per client (its partition-id picks the client). Any other
    count would break the plan and the accounting (a sampling rate over clients that cannot
    be sampled), so it is refused with the fix."""
    deadline = time.time() + wait_s
    nodes = len(list(grid.get_node_ids()))
    while time.time() < deadline:  # the simulation registers its nodes as the app starts
        time.sleep(0.5)
        again = len(list(grid.get_node_ids()))
        if again == nodes and nodes > 0:
            break
        nodes = again
    if nodes != population:
        raise ConfigError(
            f"federation.num_clients: this simulation has {nodes} SuperNodes but the data has "
            f"{population} clients; run `flwr run . --federation-config num-supernodes="
            f"{population}` or set federation.num_clients={nodes}")


def make_server_app(cfg_text: str, stop: threading.Event | None = None,
                    finished: threading.Event | None = None) -> ServerApp:
    """The ServerApp of ``fedllm simulate``. ``stop``: set it to end the run at once, without
    finalizing (Ctrl-C); ``finished``: set when the ServerApp has returned or raised."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, cfg_text, stop=stop)
        finally:
            if finished is not None:
                finished.set()

    return server_app


def _record(arrays: "OrderedDict") -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(v)) for k, v in arrays.items()))


class RoundRecorder:
    """Flower ``evaluate_fn``: evaluates the global adapter and appends a metrics row."""

    def __init__(self, cfg: FedLLMConfig, loaded, eval_sequences, strategy: Strategy,
                 run_dir: Path, population: int):
        self.cfg, self.loaded, self.eval_sequences = cfg, loaded, eval_sequences
        self.strategy, self.run_dir, self.population = strategy, run_dir, population
        self.history: list[dict] = []
        self.base: dict | None = None
        self.epsilons: dict[str, float] = {}
        self._round_start = time.time()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 0 and self.base is not None:  # resumed: base already evaluated
            self._round_start = time.time()
            return MetricRecord(self.base)
        server_round += self.strategy.core.round_offset
        current = OrderedDict((k, v.numpy()) for k, v in arrays.items())
        if self.eval_sequences is not None:
            models.load_adapter_state(self.loaded.model, current)
            result = evaluate(self.loaded.model, self.eval_sequences, self.cfg.eval.batch_size,
                              self.loaded.device, base_model=server_round == 0)
        else:
            result = self.strategy.core.federated_evaluate(arrays, server_round,
                                                           self.cfg.federation.client_timeout)
        if server_round == 0:
            self._take_wire_counts()  # base evaluation is not part of round 1
            self.base = result
            log.info("base model: held-out loss %.4f, perplexity %.2f",
                     result["eval_loss"], result["perplexity"])
        else:
            self._write_row(server_round, result)
            checkpoint.save(self.run_dir, server_round, current, self.strategy, self)
        self._round_start = time.time()
        return MetricRecord(result)

    def _take_wire_counts(self) -> tuple[int | None, int | None]:
        take = getattr(self.strategy.core.grid, "take_counts", None)
        return take() if take is not None else (None, None)

    def _write_row(self, server_round: int, result: dict) -> None:
        core = self.strategy.core
        info = core.rounds[-1]
        # The round's releases are on record first: nothing below (accounting) can lose them.
        for release in info.releases:
            append_jsonl(self.run_dir / EVENTS_FILE, {"kind": "release", **release})
        for client_id, reason in info.declined.items():
            append_jsonl(self.run_dir / EVENTS_FILE, {"kind": "declined", "round": server_round,
                                                      "client_id": client_id, "reason": reason})
        for client_id, reason in info.refused.items():
            append_jsonl(self.run_dir / EVENTS_FILE, {"kind": "refused", "round": server_round,
                                                      "client_id": client_id, "reason": reason})

        wire_down, wire_up = self._take_wire_counts()
        # Every client also released its size estimate (and, deployed, its evaluations).
        extra = side_releases(self.cfg, server_round + 1)
        for cid in set(info.accepted) | {c for c in core.events if c not in self.epsilons}:
            if cid in core.events:
                self.epsilons[cid] = epsilon(core.events[cid] + extra, self.cfg.privacy.delta,
                                             self.cfg.privacy.accountant)
        eps_max = max(self.epsilons.values()) if self.epsilons else None
        row = {
            "round": server_round,
            "eval_loss": result["eval_loss"],
            "perplexity": result["perplexity"],
            "num_clients": len(info.accepted),
            "num_sampled": info.sampled,
            "num_rejected": len(info.rejected),
            "num_declined": len(info.declined),
            "num_refused": len(info.refused),
            "aggregate_discarded": info.discarded or None,
            "bytes_up": info.bytes_up,
            "bytes_down": info.bytes_down,
            "wire_bytes_up": wire_up,
            "wire_bytes_down": wire_down,
            "seconds": round(time.time() - self._round_start, 3),
            "epsilon_example_max": eps_max if self.cfg.privacy.example.enabled else None,
        }
        row.update(user_epsilon_columns(self.cfg, self.strategy, self.run_dir, server_round))
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        self.history.append(row)
        eps_text = (f" · ε max {eps_max:.2f} ({unit_label(self.cfg)})"
                    if row["epsilon_example_max"] is not None else "")
        if row["epsilon_user"] is not None:
            eps_text += (f" · user ε {row['epsilon_user']:.2f} (vs the server "
                         f"{row['epsilon_user_vs_server']:.2f})")
        log.info("round %d/%d · %d clients · held-out loss %.4f · ppl %.2f%s · %.0f s",
                 server_round, self.cfg.federation.rounds, row["num_clients"],
                 row["eval_loss"], row["perplexity"], eps_text, row["seconds"])


def user_noise_multiplier(cfg: FedLLMConfig, population: int) -> float:
    user = cfg.privacy.user
    if user.noise_multiplier is not None:
        return float(user.noise_multiplier)
    return calibrate_user_noise(user.target_epsilon, cfg.privacy.delta, cfg.federation.rounds,
                                sampling=cfg.federation.sampling,
                                cohort=cfg.federation.clients_per_round, population=population,
                                accountant=cfg.privacy.accountant)


def make_user_dp(cfg: FedLLMConfig, population: int, adapter_size: int = 0) -> UserDP | None:
    user = cfg.privacy.user
    if not user.enabled:
        return None
    z = user_noise_multiplier(cfg, population)
    if cfg.secagg.enabled and user.noise_multiplier is None:
        z = cover_quantization(cfg, z, adapter_size)
    log.info("user-level DP: z=%.4f on the sum of updates clipped to %g (%s noise), divided by "
             "the expected cohort %d", z, user.clip_norm, user.noise,
             cfg.federation.clients_per_round)
    return UserDP(noise_multiplier=z, clip_norm=user.clip_norm, noise=user.noise,
                  expected_cohort=cfg.federation.clients_per_round,
                  min_survivors=cfg.federation.min_clients)


def cover_quantization(cfg: FedLLMConfig, z: float, adapter_size: int) -> float:
    """SecAgg+ rounding lifts a client's sensitivity slightly above S (``quantized_sensitivity``,
    which the accountant uses): scale a calibrated z so the target ε still holds. The range R
    grows with z under distributed noise, so iterate to the fixed point and check it."""
    user = cfg.privacy.user

    def sensitivity(multiplier: float) -> float:
        dp = UserDP(noise_multiplier=multiplier, clip_norm=user.clip_norm, noise=user.noise,
                    expected_cohort=cfg.federation.clients_per_round,
                    min_survivors=cfg.federation.min_clients)
        return quantized_sensitivity(user.clip_norm, adapter_size, secagg_range(cfg, dp),
                                     cfg.secagg.quantization_bits)

    scaled = z
    for _ in range(100):
        scaled = z * sensitivity(scaled) / user.clip_norm * (1 + 1e-9)
    if scaled * user.clip_norm / sensitivity(scaled) < z:
        raise RuntimeError(f"secagg.quantization_bits={cfg.secagg.quantization_bits} is too coarse "
                           f"for {adapter_size} adapter values: rounding error dominates")
    return scaled


def secagg_range(cfg: FedLLMConfig, user_dp: UserDP | None) -> float:
    """Per-coordinate quantization range: a clipped update has every coordinate within S;
    a distributed noise share adds N(0, sigma^2) per coordinate, so leave 6 sigma of room."""
    if cfg.secagg.clipping_range is not None:
        return float(cfg.secagg.clipping_range)
    margin = 0.0
    if user_dp.noise == "distributed":
        margin = 6 * distributed_noise_std(user_dp.noise_multiplier, user_dp.clip_norm,
                                           user_dp.min_survivors)
    return user_dp.clip_norm + margin


def make_strategy(cfg: FedLLMConfig, cfg_text: str, population: int, adapter_size: int = 0,
                  grid: Grid | None = None,
                  on_user_release: Callable[[int, int], None] | None = None) -> Strategy:
    """The strategy stack for this config: the adapter FedAvg core, wrapped (inside out) by
    SecAgg+, user-level DP and the server optimizer, each only where configured.
    ``grid``: for federated evaluation; ``on_user_release(round, survivors)``: each user-level
    release, before it is applied."""
    user_dp = make_user_dp(cfg, population, adapter_size)
    sampler = cohort_sampler(cfg.federation.clients_per_round, cfg.federation.sampling,
                             user_level=user_dp is not None,
                             participation_cap=participation_cap(cfg, population))
    strategy = AdapterFedAvg(cfg_text=cfg_text, sampler=sampler,
                             min_clients=cfg.federation.min_clients, run_id=cfg.run.id, grid=grid,
                             reconnect_timeout=cfg.federation.reconnect_timeout)
    if cfg.secagg.enabled:
        clip_range = secagg_range(cfg, user_dp)
        log.info("SecAgg+: %s shares, threshold %s, %d-bit quantization on [-%.3g, %.3g]",
                 cfg.secagg.num_shares, cfg.secagg.reconstruction_threshold,
                 cfg.secagg.quantization_bits, clip_range, clip_range)
        strategy = SecAggPlus(strategy, num_shares=cfg.secagg.num_shares,
                              threshold=cfg.secagg.reconstruction_threshold,
                              bits=cfg.secagg.quantization_bits, clip_range=clip_range,
                              timeout=cfg.federation.client_timeout)
    if user_dp is not None:
        strategy = UserLevelDP(strategy, user_dp, on_release=on_user_release)
    return ServerOptimization(strategy, ServerOptimizer(cfg.strategy.name,
                                                        cfg.strategy.server_lr))


def user_epsilon_columns(cfg: FedLLMConfig, strategy: Strategy, run_dir: Path,
                         server_round: int) -> dict:
    """User-level ε so far, for both adversaries, from the run's per-round records. A round
    that released nothing (too few survivors, unmasking failed) is recorded and counted as if
    it had released (conservative: whether it was skipped can depend on who was sampled)."""
    if user_dp_layer(strategy) is None:
        return {"epsilon_user": None, "epsilon_user_vs_server": None}
    if server_round not in strategy.core.user_releases:
        append_jsonl(run_dir / EVENTS_FILE, user_release_record(
            cfg, strategy, server_round, survivors=0, applied=False))
        strategy.core.user_releases.append(server_round)
    records = [r for r in read_jsonl(run_dir / EVENTS_FILE) if r.get("kind") == "user_release"]
    eps = user_level_epsilons(records, cfg.privacy.delta, cfg.privacy.accountant)
    return {"epsilon_user": eps["observers"], "epsilon_user_vs_server": eps["server"]}


def wait_for_nodes(grid: Grid, cfg: FedLLMConfig) -> int:
    """Deployment: wait up to federation.client_timeout for the expected SuperNodes, and, while
    fewer than federation.min_clients are connected, up to federation.reconnect_timeout more;
    then stop (RunStopped: nothing trained or finalized, `run.resume=true` starts it again)."""
    wanted = cfg.federation.num_clients or cfg.federation.clients_per_round
    start = time.time()
    while True:
        connected = len(list(grid.get_node_ids()))
        waited = time.time() - start
        if connected >= wanted or (connected >= cfg.federation.min_clients
                                   and waited > cfg.federation.client_timeout):
            break
        if waited > cfg.federation.client_timeout + cfg.federation.reconnect_timeout:
            raise RunStopped(f"only {connected} SuperNode(s) connected after {waited:.0f} s; "
                             f"federation.min_clients={cfg.federation.min_clients}")
        if getattr(grid, "stop_requested", lambda: False)():
            raise RunStopped("stop requested (interrupt or SIGTERM)")
        time.sleep(1)
    log.info("%d SuperNodes connected (waiting for %d)", connected, wanted)
    return connected


def run_federation(grid: Grid, cfg_text: str, stop: threading.Event | None = None) -> dict:
    """The whole run; raises RunStopped (after writing ``stopped.json``) if it stops before
    its last round: nothing is finalized then, and ``fedllm resume`` continues it."""
    cfg = from_yaml(cfg_text)
    # Counts every message's serialized bytes (metrics: wire_*); stops on ``stop``.
    grid = MeteredGrid(grid, stop=stop)
    run_dir = private_dir(Path(cfg.run.dir))
    try:
        return _run_federation(grid, cfg, cfg_text, run_dir)
    except RunStopped as exc:
        record_stop(cfg, run_dir, str(exc))
        raise
    except (SystemExit, KeyboardInterrupt):
        # A deployed ServerApp is stopped by a signal that Flower's handler turns into
        # SystemExit: `flwr stop`, the SuperLink shutting down, or the SuperLink refusing the
        # ServerApp's task token (401: it ended the run after missing the ServerApp's
        # heartbeat for 60 s; Flower's retry then signals its own process).
        record_stop(cfg, run_dir, "the ServerApp was stopped by a signal: Ctrl-C, SIGTERM, "
                    "`flwr stop`, or a SuperLink that ended its task after missing its "
                    "heartbeat for 60 s")
        raise


def record_stop(cfg: FedLLMConfig, run_dir: Path, reason: str) -> None:
    """``stopped.json``: the run is incomplete and resumable from its last checkpoint."""
    completed = checkpoint.completed_rounds(run_dir)
    write_stopped(run_dir, reason, completed, cfg.federation.rounds)
    log.error("run stopped after %d of %d rounds: %s; resume with `fedllm resume %s` "
              "(deployment: `fedllm launch ... run.resume=true`)", completed,
              cfg.federation.rounds, reason, run_dir)


def _run_federation(grid: MeteredGrid, cfg: FedLLMConfig, cfg_text: str, run_dir: Path) -> dict:
    started = time.time()
    loaded = models.build(cfg.model, seed=cfg.run.seed, device=cfg.model.device)
    if cfg.eval.mode == "server":  # simulation: the server can read the held-out share
        index = run_index(cfg, loaded.tokenizer)  # built by `fedllm simulate`'s preflight
        eval_sequences = run_eval_sequences(cfg, loaded.tokenizer, index)
        population = len(index.clients)
        check_simulated_nodes(grid, population)
    else:  # deployment: data stays on the nodes; the federation is whoever is connected
        eval_sequences, population = None, wait_for_nodes(grid, cfg)
    initial = models.adapter_state(loaded.model)
    cfg, cfg_text = resolve_participation_cap(cfg, cfg_text, population, run_dir)

    def record_user_release(server_round: int, survivors: int) -> None:
        append_jsonl(run_dir / EVENTS_FILE, user_release_record(
            cfg, strategy, server_round, survivors, applied=True))

    strategy = make_strategy(cfg, cfg_text, population,
                             adapter_size=sum(v.size for v in initial.values()), grid=grid,
                             on_user_release=record_user_release)
    recorder = RoundRecorder(cfg, loaded, eval_sequences, strategy, run_dir, population)
    initial, done = prepare_run_files(cfg, run_dir, strategy, recorder, initial)
    if done >= cfg.federation.rounds:
        log.info("all %d rounds were already completed; writing the final files", done)
        return finalize(cfg, run_dir, loaded, initial, strategy, recorder, started)
    result = strategy.start(grid=grid, initial_arrays=_record(initial),
                            num_rounds=cfg.federation.rounds - done,
                            timeout=cfg.federation.client_timeout, evaluate_fn=recorder)
    final = OrderedDict((k, v.numpy()) for k, v in result.arrays.items()) \
        if result.arrays is not None and len(result.arrays) else initial
    return finalize(cfg, run_dir, loaded, final, strategy, recorder, started)


def resolve_participation_cap(cfg: FedLLMConfig, cfg_text: str, population: int, run_dir: Path
                              ) -> tuple[FedLLMConfig, str]:
    """Replace ``max_participations=auto`` by its value for this population, in the config
    that travels to the clients (they calibrate their noise for it and enforce it) and in the
    run's saved config.yaml (the report and a resume read it)."""
    cap = participation_cap(cfg, population)
    if cfg.privacy.example.max_participations == cap:
        return cfg, cfg_text
    cfg.privacy.example.max_participations = cap
    cfg_text = to_yaml(cfg)
    atomic_write_text(run_dir / "config.yaml", cfg_text)
    log.info("participation cap: each client trains in at most %d of %d rounds (noise calibrated "
             "for %d local steps)", cap, cfg.federation.rounds, cap * cfg.train.local_steps)
    return cfg, cfg_text


def enforced_participation_cap(cfg: FedLLMConfig) -> int | None:
    """The participation cap every client enforces itself in this run, or None if none does.

    With example-level DP a client's ledger declines any round beyond
    ``privacy.example.max_participations`` (read as every round while it still says ``auto``,
    as ``clients/app.py:max_participations`` reads it); without it nothing is enforced (the
    server's own sampler cap is not counted: the clients do not check it). The user-level
    accountant may rely on this cap against observers, since it holds whoever is sampled."""
    if not cfg.privacy.example.enabled:
        return None
    cap, rounds = cfg.privacy.example.max_participations, cfg.federation.rounds
    return rounds if cap == "auto" else min(int(cap), rounds)


def user_release_record(cfg: FedLLMConfig, strategy: Strategy, server_round: int,
                        survivors: int, applied: bool) -> dict:
    """One user-level round as the accountant needs it: the population this round's cohort
    was drawn from (its real q), whose updates entered the sum (the server's view), and the
    participation cap the clients enforce themselves (None: every round), which bounds the
    observers' ε before sampling."""
    dp, core = user_dp_layer(strategy).dp, strategy.core
    sensitivity = dp.clip_norm
    secagg = find_layer(strategy, SecAggPlus)
    if secagg is not None:  # SecAgg+: quantization error adds to the clip norm
        dim = sum(v.size for v in core.global_arrays.values())
        sensitivity = quantized_sensitivity(dp.clip_norm, dim, secagg.clip_range, secagg.bits)
    return {"kind": "user_release", "round": server_round, "noise_multiplier": dp.noise_multiplier,
            "clip_norm": dp.clip_norm, "sensitivity": sensitivity, "noise": dp.noise,
            "sampling": cfg.federation.sampling,
            "cohort": dp.expected_cohort, "population": core.sampler.last_pool,
            "min_survivors": dp.min_survivors, "survivors": survivors, "applied": applied,
            "max_participations": enforced_participation_cap(cfg),
            "clients": sorted(core.rounds[-1].accepted) if applied else []}


def prepare_run_files(cfg: FedLLMConfig, run_dir: Path, strategy: Strategy,
                      recorder: RoundRecorder, initial):
    """Fresh run: clear per-run files. Resume: restore the checkpoint, drop later rows.

    Returns (adapter to start from, rounds already completed).
    """
    loaded = checkpoint.load(run_dir) if cfg.run.resume else None
    if loaded is None:
        if cfg.run.resume:
            log.warning("run.resume=true but %s has no checkpoint: starting from round 1", run_dir)
        for name in ("metrics.jsonl", EVENTS_FILE, checkpoint.CHECKPOINT):
            (run_dir / name).unlink(missing_ok=True)
        return initial, 0
    state, arrays = loaded
    if state["run_id"] != cfg.run.id:
        raise checkpoint.CheckpointError("checkpoint belongs to another run id")
    checkpoint.restore(state, strategy, recorder)
    done = int(state["round"])
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["round"] <= done]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    # privacy_events.jsonl is kept whole: releases of the interrupted round stay counted, and
    # a user-level aggregate of that round counts again if the round is re-run (conservative).
    strategy.core.user_releases += [r["round"] for r in read_jsonl(run_dir / EVENTS_FILE)
                               if r.get("kind") == "user_release" and r["round"] > done]
    log.info("resuming %s after round %d of %d", run_dir, done, cfg.federation.rounds)
    return arrays, done


def finalize(cfg: FedLLMConfig, run_dir: Path, loaded, final_arrays, strategy: Strategy,
             recorder: RoundRecorder, started: float) -> dict:
    """Export the adapter (PEFT format) with its model card, the privacy report, a summary."""
    from fedllm import export

    clear_stopped(run_dir)
    models.load_adapter_state(loaded.model, final_arrays)
    adapter_dir = run_dir / "adapter"
    models.unwrap(loaded.model).save_pretrained(adapter_dir)
    export.set_portable_base(adapter_dir, cfg)
    export.write_samples(run_dir, cfg, models.unwrap(loaded.model), loaded.tokenizer)  # card
    report = write_reports(run_dir)
    final_metrics = recorder.history[-1] if recorder.history else None
    ex = report["example_level"]
    summary = {
        "run_dir": str(run_dir),
        "rounds": len(recorder.history),
        "base_eval_loss": recorder.base["eval_loss"] if recorder.base else None,
        "base_perplexity": recorder.base["perplexity"] if recorder.base else None,
        "final_eval_loss": final_metrics["eval_loss"] if final_metrics else None,
        "final_perplexity": final_metrics["perplexity"] if final_metrics else None,
        "epsilon_example_max": ex["max_epsilon"] if ex else None,
        "epsilon_example_median": ex["median_epsilon"] if ex else None,
        "privacy_unit": unit_label(cfg),
        "epsilon_user": report["user_level"]["epsilon"] if report["user_level"] else None,
        "epsilon_user_vs_server": (report["user_level"]["epsilon_vs_server"]
                                   if report["user_level"] else None),
        "population": recorder.population,
        "clients_trained": len(strategy.core.client_params),
        "clients_declined": sum(len(r.declined) for r in strategy.core.rounds),
        "delta": cfg.privacy.delta,
        "seconds": round(time.time() - started, 1),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
