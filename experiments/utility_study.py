"""What moves utility under DP at fixed epsilon and compute: a systematic study (issue 10).

Run: python experiments/utility_study.py [--only NAME ...] [--epsilon 8] [--write]
Each configuration is the demo (SmolLM2-135M, LoRA, the bundled plays' natural clients,
3 rounds x 3 clients) plus hydra overrides. To afford many configurations on 2 cores the
federation runs in one process: the same fedllm pieces as `fedllm simulate` (data
partitioning, `fedllm.train.local_round` = the clients' DP-SGD with Poisson sampling,
per-client noise calibrated exactly as the ClientApp does, unweighted FedAvg of deltas, the
server optimizer of `fedllm.server.server_opt`), minus Flower's transport. Same sampled clients in
every configuration (seeded), fresh DP noise. Results append to
experiments/results/utility_study.jsonl; --write turns them into a BENCHMARKS.md section.
The winners are then confirmed with real `fedllm simulate` runs (experiments/bench_utility.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

RESULTS = ROOT / "experiments" / "results" / "utility_study.jsonl"

# Every configuration starts from the demo as it was before this study (LoRA r=8 on q,v,
# AdamW 2e-3, batch 8, 4 local steps, C=1), pinned here so the commands stay reproducible
# after the study changed the demo's defaults. name -> overrides on top of it.
OLD_DEMO = ["adapter=lora", "model.lora.r=8", "model.lora.alpha=16", "train.lr=2e-3",
            "train.batch_size=8", "train.physical_batch_size=null", "train.local_steps=4",
            "train.optimizer=adamw", "privacy.example.max_grad_norm=1.0"]
BASELINE: list[str] = []
STUDY: dict[str, list[str]] = {
    "demo defaults (r=8 q,v, AdamW 2e-3, B=8, 4 steps, C=1)": BASELINE,
    "r=1": ["model.lora.r=1", "model.lora.alpha=2"],
    "FFA-LoRA (B only), r=8": ["model.lora.freeze_a=true"],
    "FFA-LoRA, r=1": ["model.lora.freeze_a=true", "model.lora.r=1", "model.lora.alpha=2"],
    "B=32, 1 step (same compute)": ["train.batch_size=32", "train.local_steps=1"],
    "B=16, 2 steps (same compute)": ["train.batch_size=16", "train.local_steps=2"],
    "B=32, 4 steps (4x compute)": ["train.batch_size=32", "train.local_steps=4",
                                   "train.physical_batch_size=16"],
    "B=32, 4 steps, FFA-LoRA r=1, lr 5e-3": ["train.batch_size=32", "train.local_steps=4",
                                             "train.physical_batch_size=16",
                                             "model.lora.freeze_a=true", "model.lora.r=1",
                                             "model.lora.alpha=2", "train.lr=5e-3"],
    "B=32, 4 steps, FFA-LoRA r=1, lr 2e-2": ["train.batch_size=32", "train.local_steps=4",
                                             "train.physical_batch_size=16",
                                             "model.lora.freeze_a=true", "model.lora.r=1",
                                             "model.lora.alpha=2", "train.lr=2e-2"],
    "B=32, 4 steps, prompt tuning, lr 2e-1": ["train.batch_size=32", "train.local_steps=4",
                                              "train.physical_batch_size=16",
                                              "adapter=prompt_tuning", "train.lr=2e-1"],
    "B=32, 4 steps, r=8, lr 1e-2": ["train.batch_size=32", "train.local_steps=4",
                                    "train.physical_batch_size=16", "train.lr=1e-2"],
    "B=32, 4 steps, FFA-LoRA r=1, C=0.25, lr 2e-2": [
        "train.batch_size=32", "train.local_steps=4", "train.physical_batch_size=16",
        "model.lora.freeze_a=true", "model.lora.r=1", "model.lora.alpha=2", "train.lr=2e-2",
        "privacy.example.max_grad_norm=0.25"],
    "B=32, 4 steps, prompt tuning, lr 5e-2": ["train.batch_size=32", "train.local_steps=4",
                                              "train.physical_batch_size=16",
                                              "adapter=prompt_tuning", "train.lr=5e-2"],
    "B=32, 4 steps, r=8, C=0.5": ["train.batch_size=32", "train.local_steps=4",
                                  "train.physical_batch_size=16",
                                  "privacy.example.max_grad_norm=0.5"],
    "B=32, 4 steps, prompt tuning, lr 5e-1": ["train.batch_size=32", "train.local_steps=4",
                                              "train.physical_batch_size=16",
                                              "adapter=prompt_tuning", "train.lr=5e-1"],
    "B=32, 4 steps, prompt tuning 16 tokens, lr 2e-1": [
        "train.batch_size=32", "train.local_steps=4", "train.physical_batch_size=16",
        "adapter=prompt_tuning", "model.prompt_tuning.num_virtual_tokens=16", "train.lr=2e-1"],
    "lr 5e-3": ["train.lr=5e-3"],
    "lr 1e-2": ["train.lr=1e-2"],
    "SGD+momentum lr 0.5, C=0.1": ["train.optimizer=sgd", "train.lr=0.5",
                                   "privacy.example.max_grad_norm=0.1"],
    "SGD+momentum lr 0.1, C=1": ["train.optimizer=sgd", "train.lr=0.1"],
    "8 steps": ["train.local_steps=8"],
    "server FedAdam lr 1e-2": ["strategy.name=fedadam", "strategy.server_lr=1e-2"],
    "server lr 2": ["strategy.server_lr=2.0"],
    "prompt tuning, 8 tokens, lr 2e-2": ["adapter=prompt_tuning", "train.lr=2e-2"],
    "prompt tuning, 8 tokens, lr 2e-1": ["adapter=prompt_tuning", "train.lr=2e-1"],
    "q,k,v,o,up,down targets": ["model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,up_proj,down_proj]"],
}


def run_config(name: str, overrides: list[str], private: bool, epsilon: float, cache: dict,
               *, prefix: list[str] = OLD_DEMO, repeat: int = 0) -> dict:
    """One federation, in process. ``repeat`` seeds the cohort sampling only (model init and
    data split stay those of run.seed), so repeats differ in their clients and DP noise, and a
    configuration and its non-private twin see the same clients."""
    from fedllm import models
    from fedllm.config import compose, min_client_sequences, participation_cap, to_yaml
    from fedllm.data.federated import build_federated_data
    from fedllm.evaluate import evaluate
    from fedllm.privacy.accounting import epsilon as eps_of
    from fedllm.privacy.participation import CohortSampler
    from fedllm.server.server_opt import ServerOptimizer
    from fedllm.train import local_round

    privacy = [f"privacy.example.target_epsilon={epsilon:g}"] if private else ["privacy=none"]
    cfg = compose([*prefix, *overrides, *privacy])
    started = time.time()
    model_key = to_yaml(cfg.model)
    if cache.get("model_key") != model_key:
        cache.pop("loaded", None)
        cache["loaded"] = models.build(cfg.model, seed=cfg.run.seed, device=cfg.model.device)
        cache["model_key"] = model_key
        cache["initial"] = models.adapter_state(cache["loaded"].model)
    loaded, initial = cache["loaded"], cache["initial"]
    data_key = (to_yaml(cfg.data), cfg.train.seq_len, min_client_sequences(cfg))
    if cache.get("data_key") != data_key:
        cache["data"] = build_federated_data(
            cfg.data, loaded.tokenizer, seq_len=cfg.train.seq_len,
            min_sequences=min_client_sequences(cfg), num_clients=cfg.federation.num_clients,
            seed=cfg.run.seed)
        cache["data_key"] = data_key
        cache.pop("base", None)
    data = cache["data"]
    eval_seqs = data.eval_sequences(cfg.eval.max_sequences)
    if "base" not in cache:
        models.load_adapter_state(loaded.model, initial)
        cache["base"] = evaluate(loaded.model, eval_seqs, cfg.eval.batch_size, loaded.device,
                                 base_model=True)
    server = ServerOptimizer(cfg.strategy.name, cfg.strategy.server_lr)
    # As the ServerApp does: resolve the participation cap, sample only clients under it.
    cap = participation_cap(cfg, len(data.clients))
    cfg.privacy.example.max_participations = cap
    sampler = CohortSampler(cohort=cfg.federation.clients_per_round,
                            sampling=cfg.federation.sampling, cap=cap, narrow=True,
                            rng=random.Random(cfg.run.seed + 1000 * repeat))
    weights = dict(initial)
    events: dict[str, list] = {}
    estimates: dict[str, int] = {}  # each client's one DP size estimate in this run
    for server_round in range(1, cfg.federation.rounds + 1):
        chosen = sampler.sample(range(len(data.clients)))
        deltas = []
        for index in chosen:
            client = data.clients[index]
            q, z, size = client_mechanism(cfg, client, estimates)
            res = local_round(loaded, weights, client.train, cfg, noise_multiplier=z,
                              seed=None, server_round=server_round,
                              sample_rate=q)
            deltas.append(res.delta)
            if res.event is not None:
                events.setdefault(client.client_id, [size]).append(res.event)
        average = {k: np.mean([d[k] for d in deltas], axis=0) for k in weights}
        weights = server.step(weights, average)
    models.load_adapter_state(loaded.model, weights)
    final = evaluate(loaded.model, eval_seqs, cfg.eval.batch_size, loaded.device)
    eps = max((eps_of(e, cfg.privacy.delta, cfg.privacy.accountant) for e in events.values()),
              default=None)
    return {"name": name, "private": private, "target_epsilon": epsilon if private else None,
            "overrides": overrides, "repeat": repeat, "participation_cap": cap,
            "rounds": cfg.federation.rounds, "cohort": cfg.federation.clients_per_round, "base_loss": cache["base"]["eval_loss"],
            "final_loss": final["eval_loss"], "base_ppl": cache["base"]["perplexity"],
            "final_ppl": final["perplexity"], "epsilon_max": eps,
            "gain_nats": cache["base"]["eval_loss"] - final["eval_loss"],
            "seconds": round(time.time() - started, 1),
            "trainable": sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)}


def client_mechanism(cfg, client, estimates: dict) -> tuple[float, float, object]:
    """(q, z, size event) as a client runs it: q from its one DP size estimate (drawn once per
    run, as with a fresh ledger per run directory), z calibrated after that release."""
    from fedllm.clients.app import noise_multiplier_for
    from fedllm.privacy.size_estimate import noisy_size, size_event
    from fedllm.train import example_sample_rate

    size = size_event(cfg.privacy.example.size_noise)
    if not cfg.privacy.example.enabled:
        return 1.0, 0.0, size
    if client.client_id not in estimates:
        estimates[client.client_id] = noisy_size(len(client.train),
                                                 cfg.privacy.example.size_noise)
    q = example_sample_rate(cfg.train.batch_size, estimates[client.client_id])
    return q, noise_multiplier_for(cfg, q, (size,)), size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="names (or unique prefixes) to run")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--modes", nargs="+", choices=("dp", "np"), default=["dp"],
                        help="dp: with example-level DP at --epsilon; np: without privacy")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md from results")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--reference-gain", type=float, default=None,
                        help="--write: a measured non-private gain (nats) to compare against")
    parser.add_argument("--reference", default="", help="--write: where that gain comes from")
    args = parser.parse_args()
    if args.write:
        return write_tables(args.reference_gain, args.reference)
    names = [n for n in STUDY if not args.only or any(n.startswith(o) for o in args.only)]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    for name in names:
        for private in [mode == "dp" for mode in args.modes]:
            row = run_config(name, [*STUDY[name], *args.extra], private, args.epsilon, cache)
            with open(args.results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def write_tables(reference_gain: float | None = None, reference: str = "") -> None:
    from benchmarks_md import write_section

    rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    latest = {}
    for r in rows:  # the latest result per (name, private, epsilon)
        latest[(r["name"], r["private"], r["target_epsilon"])] = r
    nonprivate = {r["name"]: r for r in latest.values() if not r["private"]}
    best_np = max([r["gain_nats"] for r in nonprivate.values()] +
                  ([reference_gain] if reference_gain else []), default=None)
    lines = []
    for r in sorted((r for r in latest.values() if r["private"]),
                    key=lambda r: (r["target_epsilon"], -r["gain_nats"])):
        np_row = nonprivate.get(r["name"])
        same = f"{100 * r['gain_nats'] / np_row['gain_nats']:.0f}%" if np_row and \
            np_row["gain_nats"] > 0 else "—"
        best = f"{100 * r['gain_nats'] / best_np:.0f}%" if best_np else "—"
        cmd = "python experiments/utility_study.py --modes dp np --only '" + r["name"] + "'"
        lines.append(f"| {r['name']} | {r['target_epsilon']:g} | {r['epsilon_max']:.2f} | "
                     f"{r['trainable']:,} | {r['base_ppl']:.2f} → {r['final_ppl']:.2f} | "
                     f"{r['gain_nats']:+.4f} | "
                     f"{format(np_row['gain_nats'], '+.4f') if np_row else '—'} | {same} | {best} | "
                     f"`{cmd}` |")
    write_section("utility_study", "\n".join([
        "## Utility study: what moves held-out loss under DP (issue 10)",
        "",
        "Command: `python experiments/utility_study.py --modes dp np` then `--write` (one "
        "process: fedllm's data, DP-SGD `local_round`, per-client noise calibration and "
        "FedAvg without Flower's transport; demo setup: SmolLM2-135M, 3 rounds x 3 natural "
        "clients, seq 64, δ = 1e-5). *Gain*: base − final held-out loss (nats). *Kept*: DP "
        "gain / non-private gain of the same configuration, and / the best non-private gain "
        "in the table" + (f" or of the reference, {reference} ({reference_gain:+.4f} nats)"
                          if reference_gain else "") +
        ". One run per row (DP noise differs between runs); rows sorted by DP gain.",
        "",
        "| configuration | target ε | ε max | trainable | perplexity | DP gain | non-private "
        "gain | kept (same) | kept (best) | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]))


if __name__ == "__main__":
    main()
