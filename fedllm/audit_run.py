"""Canary audit of the example-level DP-SGD mechanism (``fedllm audit``).

The game (one run, Steinke, Nasr & Jagielski 2023; the math is in ``fedllm.privacy.audit``):

1. Draw ``audit.canaries`` random token sequences of ``train.seq_len`` tokens and flip a fair
   coin for each: heads, it is inserted into the canary client's training data (the largest
   client of the configured data, or no other data with ``audit.client_data=false``); tails,
   it is held out.
2. Train that client with fedllm's own ``local_round`` — the clients' real DP-SGD code path:
   Poisson sampling at q = batch / client size, per-sample clipping, Gaussian noise — for
   ``federation.rounds`` × ``train.local_steps`` steps, i.e. as if it were sampled in every
   round (the plan the noise is calibrated for). Training runs in this process, not via Ray.
3. Score every canary by how much training lowered its loss (loss before − loss after: the
   adversary sees the client's released adapter, as the server does), guess in/out for the
   top/bottom scores and turn the number of correct guesses into an ε lower bound.
4. Compare with the ε claimed for that same client and mechanism (PLD/RDP accountant over
   the steps it ran, the per-client example-level ε of the privacy report).

``audit.runs=R`` (R ≥ 8) runs the multi-run variant instead: R independent trainings, each with
one canary included with probability 1/2, and a Clopper-Pearson threshold test.

``audit.break_mechanism`` (TEST / DRILL ONLY) feeds the real code path a broken mechanism —
``noise``: noise multiplier 0; ``clipping``: clipping bound 10⁶ with the noise std kept at
z·C — while the claim stays the configured one. The audit must flag it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fedllm import models
from fedllm.config import ConfigError, FedLLMConfig, min_client_sequences
from fedllm.privacy import audit as audit_math
from fedllm.privacy.accounting import PrivacyEvent, calibrate_noise, epsilon
from fedllm.privacy.dpsgd import per_sequence_losses
from fedllm.report import unit_description
from fedllm.train import example_sample_rate, local_round

log = logging.getLogger(__name__)

NO_CLIP = 1e6  # "clipping disabled": far above any per-sample gradient norm here
AUDIT_FILE = "audit.json"
ROC_FILE = "audit_roc.png"
CITATIONS = {
    "one_run": "Steinke, Nasr & Jagielski, Privacy Auditing with One (1) Training Run, "
               "NeurIPS 2023 (arXiv:2305.08846)",
    "multi_run": "Jagielski, Ullman & Oprea, Auditing Differentially Private Machine Learning: "
                 "How Private is Private SGD?, NeurIPS 2020; Nasr et al., Adversary "
                 "Instantiation, IEEE S&P 2021",
}


@dataclass
class Mechanism:
    """What the client claims (z, C) and what the audit actually runs (may be broken)."""
    noise_multiplier: float
    max_grad_norm: float
    run_noise_multiplier: float
    run_max_grad_norm: float


def mechanism(cfg: FedLLMConfig, num_sequences: int) -> Mechanism:
    ex = cfg.privacy.example
    if ex.noise_multiplier is not None:
        z = float(ex.noise_multiplier)
    else:  # as a client calibrates: ε ≤ target over every planned step at its own q
        q = example_sample_rate(cfg.train.batch_size, num_sequences)
        z = calibrate_noise(ex.target_epsilon, cfg.privacy.delta, steps=planned_steps(cfg),
                            sample_rate=q, accountant=cfg.privacy.accountant)
    c = ex.max_grad_norm
    broken = cfg.audit.break_mechanism
    if broken == "noise":
        return Mechanism(z, c, 0.0, c)
    if broken == "clipping":
        return Mechanism(z, c, z * c / NO_CLIP, NO_CLIP)  # same noise std z*C, no clipping
    return Mechanism(z, c, z, c)


def planned_steps(cfg: FedLLMConfig) -> int:
    return cfg.federation.rounds * cfg.train.local_steps


def make_canaries(count: int, seq_len: int, vocab_size: int, generator: torch.Generator
                  ) -> torch.Tensor:
    """Uniformly random token sequences: unlike natural text, only memorization lowers their
    loss, so they separate members from non-members as well as inputs can."""
    return torch.randint(0, vocab_size, (count, seq_len), generator=generator)


@torch.no_grad()
def canary_losses(model, canaries: torch.Tensor, batch_size: int, device: torch.device
                  ) -> np.ndarray:
    model.eval()
    out = [per_sequence_losses(model, part.to(device)).float().cpu()
           for part in torch.split(canaries, batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


def train_client(loaded: models.LoadedModel, start: "dict[str, np.ndarray]",
                 train_data: torch.Tensor, cfg: FedLLMConfig, mech: Mechanism
                 ) -> "dict[str, np.ndarray]":
    """``federation.rounds`` local rounds of the real client code path, each starting from
    the previous result (one client: FedAvg's average is its own delta)."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.privacy.example.max_grad_norm = mech.run_max_grad_norm
    adapter = {k: v.copy() for k, v in start.items()}
    for server_round in range(1, cfg.federation.rounds + 1):
        result = local_round(loaded, adapter, train_data, run_cfg,
                             noise_multiplier=mech.run_noise_multiplier,
                             seed=None,  # OS CSPRNG, as on a client
                             server_round=server_round)
        adapter = {k: adapter[k] + cfg.strategy.server_lr * result.delta[k] for k in adapter}
    models.load_adapter_state(loaded.model, adapter)
    return adapter


def _game(loaded, start, base_data: torch.Tensor, canaries: torch.Tensor,
          included: np.ndarray, cfg: FedLLMConfig, mech: Mechanism | None
          ) -> tuple[np.ndarray, Mechanism, int]:
    """Train with the included canaries; returns (scores, mechanism, client size). Without
    ``mech`` the noise is calibrated for the client's actual size, as a client does."""
    device = loaded.device
    train_data = torch.cat([base_data, canaries[torch.from_numpy(included)]])
    mech = mech or mechanism(cfg, max(len(train_data), 1))
    models.load_adapter_state(loaded.model, start)
    before = canary_losses(loaded.model, canaries, cfg.eval.batch_size, device)
    train_client(loaded, start, train_data, cfg, mech)
    after = canary_losses(loaded.model, canaries, cfg.eval.batch_size, device)
    models.load_adapter_state(loaded.model, start)
    return before - after, mech, len(train_data)


def run_audit(cfg: FedLLMConfig, loaded: models.LoadedModel | None = None) -> dict:
    """Run the configured audit; returns the ``audit.json`` document."""
    if not cfg.privacy.example.enabled:
        raise ConfigError("privacy.example.enabled: the audit tests example-level DP-SGD; "
                          "enable it (there is no ε to check otherwise)")
    started = time.time()
    a = cfg.audit
    loaded = loaded or models.build(cfg.model, seed=cfg.run.seed, device=cfg.model.device)
    base_data = _client_data(cfg, loaded) if a.client_data else None
    seq_len = cfg.train.seq_len
    if base_data is None:
        base_data = torch.zeros((0, seq_len), dtype=torch.long)
    gen = torch.Generator().manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    start = models.adapter_state(loaded.model)
    vocab = len(loaded.tokenizer)

    if a.runs == 1:
        method = "one_run"
        canaries = make_canaries(a.canaries, seq_len, vocab, gen)
        included = rng.random(a.canaries) < 0.5
        scores, mech, n = _game(loaded, start, base_data, canaries, included, cfg, None)
        sizes = [n]
        result = audit_math.one_run_audit(included, scores, cfg.privacy.delta, a.confidence)
        detail = result.to_dict()
    else:
        method = "multi_run"
        included = rng.random(a.runs) < 0.5
        if len(base_data) == 0:
            raise ConfigError("audit.client_data: a multi-run audit (audit.runs > 1) trains "
                              "one canary per run and needs the client's data with it")
        # One mechanism for every run: z for the client with its canary.
        mech = mechanism(cfg, len(base_data) + 1)
        scores, sizes = np.zeros(a.runs), []
        for i in range(a.runs):
            canary = make_canaries(1, seq_len, vocab, gen)
            s, _, n = _game(loaded, start, base_data, canary, included[i:i + 1], cfg, mech)
            scores[i] = s[0]
            sizes.append(n)
        result = audit_math.threshold_audit(included, scores, cfg.privacy.delta, a.confidence)
        detail = result.to_dict()

    # The claim: the per-client example-level ε of this client's mechanism (the privacy
    # report's number), at the smallest client size the game produced (largest q, largest ε:
    # the most lenient claim, so a flag is never an artefact of q = batch / client size).
    q = example_sample_rate(cfg.train.batch_size, max(min(sizes), 1))
    claim_event = PrivacyEvent(noise_multiplier=mech.noise_multiplier, steps=planned_steps(cfg),
                               sampling="poisson", sample_rate=q)
    claimed = epsilon([claim_event], cfg.privacy.delta, cfg.privacy.accountant)
    fpr, tpr, _ = audit_math.roc_curve(included, scores)
    lower = detail["epsilon_lower_bound"]
    violated = lower > claimed
    doc = {
        "method": method,
        "citation": CITATIONS[method],
        "status": "violation" if violated else "consistent",
        "flag": bool(violated),
        "epsilon_lower_bound": lower,
        "claimed_epsilon": claimed,
        "confidence": a.confidence,
        "delta": cfg.privacy.delta,
        "accountant": cfg.privacy.accountant,
        "unit": unit_description(cfg) + ", example level",
        "claimed_mechanism": {"noise_multiplier": mech.noise_multiplier,
                              "max_grad_norm": mech.max_grad_norm, "sample_rate": q,
                              "steps": planned_steps(cfg), "sampling": "poisson"},
        "break_mechanism": a.break_mechanism,
        "ran_mechanism": {"noise_multiplier": mech.run_noise_multiplier,
                          "max_grad_norm": mech.run_max_grad_norm},
        "canaries": int(len(included)),
        "canaries_included": int(np.sum(included)),
        "client_sequences": sizes[0] if len(sizes) == 1 else
        {"min": int(min(sizes)), "max": int(max(sizes))},
        "client_data": a.client_data,
        "adapter": cfg.model.adapter,
        "model": cfg.model.name,
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.train.local_steps,
        "score": "canary loss before training minus after (higher: more likely included)",
        "test": detail,
        "auc": audit_math.auc(fpr, tpr),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "in_process": True,
        "seconds": round(time.time() - started, 1),
    }
    log.info("audit (%s): ε lower bound %.3f vs claimed ε %.3f at δ=%g (%s) — %s",
             method, lower, claimed, cfg.privacy.delta,
             f"break_mechanism={a.break_mechanism}", doc["status"])
    return doc


def _client_data(cfg: FedLLMConfig, loaded) -> torch.Tensor:
    from fedllm.data.federated import build_federated_data

    data = build_federated_data(cfg.data, loaded.tokenizer, seq_len=cfg.train.seq_len,
                                min_sequences=min_client_sequences(cfg),
                                num_clients=cfg.federation.num_clients, seed=cfg.run.seed)
    client = data.clients[0]  # the largest client (clients are ordered by size)
    log.info("audit: canaries join client %s (%d training sequences)", client.client_id,
             len(client.train))
    return client.train


def summary_line(doc: dict) -> str:
    verdict = ("VIOLATION: the mechanism leaks more than its claimed ε"
               if doc["flag"] else "consistent with the claim (an audit cannot prove privacy)")
    lb = doc["epsilon_lower_bound"]
    return (f"empirical ε lower bound {'inf' if math.isinf(lb) else f'{lb:.3f}'} "
            f"({doc['confidence']:.0%} confidence) vs claimed ε {doc['claimed_epsilon']:.3f} "
            f"at δ={doc['delta']:g}: {verdict}")
