"""Wire audit (``fedllm audit audit.mode=wire``): the canary game on every field a client sends.

The model audit (``fedllm.audit_run``) scores the adapter a client releases. This one plays the
server, which sees more: every field of every reply (``fedllm.protocol``). For R independent
trials it flips a coin, adds one random-token canary to the client's training data *and* to its
held-out share on heads, and asks the client's real reply code (``answer_train``,
``answer_evaluate``: policy, ledger, size estimate, DP-SGD, DP evaluation) for round 1 of a
fresh run with a fresh ledger. Then, per field:

  * the update (``arrays.*``): scored by how much it lowers the canary's loss;
  * every scalar field: scored by its value, both ways, and by its distance from its value on
    D alone (one reference trial: the adversary knows D); Bonferroni over the three;

and a threshold test over the R trials (``fedllm.privacy.audit.threshold_audit``) turns the
scores into an empirical ε lower bound, next to the field's claim:

  * ``noised update``: ε of the ledger's training release and the size estimate it uses;
  * ``public``: ε of everything the client released (such a field derives from those values);
  * ``DP statistic``: ε of its own ledger entry;
  * a field the protocol does not list: 0 (it should not be sent at all).

A lower bound above the claim is a broken claim. R trials bound what can be detected (about
ln(R/2) at best); an audit can flag a leak, never prove privacy.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord

from fedllm import models, protocol
from fedllm.audit_run import _client_data, canary_losses, make_canaries
from fedllm.config import FedLLMConfig
from fedllm.data.federated import ClientData
from fedllm.privacy import audit as audit_math
from fedllm.privacy.accounting import epsilon
from fedllm.privacy.ledger import Ledger

log = logging.getLogger(__name__)

WIRE_FILE = "audit_wire.json"
CLIENT_ID = "wire-audit"
DEFAULT_TRIALS = 32


def run_wire_audit(cfg: FedLLMConfig, loaded: models.LoadedModel | None = None,
                   base_data: torch.Tensor | None = None) -> dict:
    """Play R trials and score every reply field; returns the ``audit_wire.json`` document."""
    started = time.time()
    a = cfg.audit
    trials = a.runs if a.runs > 1 else DEFAULT_TRIALS
    loaded = loaded or models.build(cfg.model, seed=cfg.run.seed, device=cfg.model.device)
    if base_data is None:
        base_data = _client_data(cfg, loaded)
    start = models.adapter_state(loaded.model)
    gen = torch.Generator().manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    included = rng.random(trials) < 0.5
    included[0], included[1] = True, False  # both outcomes, whatever the seed
    values: dict[str, list[float]] = {}
    claims: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedllm-wire-audit-") as scratch:
        # The adversary knows D (the neighbouring datasets are D and D + canary): one
        # reference trial on D alone gives each field's value to measure distances from.
        reference = _reply_fields(cfg, Path(scratch) / "reference", -1, loaded, start,
                                  ClientData(client_id=CLIENT_ID, train=base_data,
                                             eval=base_data[:8]), None)[0]
        for i in range(trials):
            canary = make_canaries(1, cfg.train.seq_len, len(loaded.tokenizer), gen)
            client = ClientData(
                client_id=CLIENT_ID,
                train=torch.cat([base_data, canary]) if included[i] else base_data,
                eval=torch.cat([base_data[:8], canary]) if included[i] else base_data[:8])
            fields, book = _reply_fields(cfg, Path(scratch) / f"trial-{i}", i, loaded, start,
                                         client, canary)
            for name, value in fields.items():
                values.setdefault(name, []).append(_number(value))
                claims.setdefault(name, []).append(_claim(name, book, cfg))
    rows = {name: _score_field(name, included, vals, claims[name], cfg,
                               _number(reference[name]) if name in reference else None)
            for name, vals in values.items() if len(vals) == trials}
    broken = sorted(n for n, r in rows.items() if r["violation"])
    doc = {
        "method": "wire",
        "trials": trials,
        "included": int(included.sum()),
        "confidence": a.confidence,
        "delta": cfg.privacy.delta,
        "status": "violation" if broken else "consistent",
        "flag": bool(broken),
        "broken_fields": broken,
        "fields": rows,
        "adversary": "the server: it reads every field of every reply (train and evaluate)",
        "score": "update: canary loss before minus after; scalars: the value (both ways) and "
                 "its distance from the value on D alone",
        "seconds": round(time.time() - started, 1),
    }
    return doc


def _reply_fields(cfg: FedLLMConfig, ledger_dir: Path, index: int, loaded, start: dict,
                  client: ClientData, canary: torch.Tensor | None) -> tuple[dict, Ledger]:
    """Every field of the train and evaluate replies of one fresh run, and its ledger."""
    from fedllm.clients.app import answer_evaluate, answer_train

    trial = _trial_config(cfg, ledger_dir, index)
    update, metrics, record = answer_train(trial, loaded, client, {}, 1, start, ConfigRecord({}))
    evaluation = answer_evaluate(trial, loaded, client, {}, 1, start)
    fields = {f"{protocol.METRICS_RECORD}.{k}": v for k, v in dict(metrics).items()}
    fields.update({f"{protocol.CLIENT_RECORD}.{k}": v for k, v in dict(record).items()})
    fields.update({f"eval.{protocol.METRICS_RECORD}.{k}": v for k, v in evaluation.items()})
    if update is not None and canary is not None:
        fields[f"{protocol.ARRAYS_RECORD}.*"] = _canary_score(loaded, start, update, canary, cfg)
    return fields, Ledger.open(trial.privacy.ledger_dir, CLIENT_ID)


def _trial_config(cfg: FedLLMConfig, ledger_dir: Path, index: int) -> FedLLMConfig:
    trial = copy.deepcopy(cfg)
    trial.privacy.ledger_dir = str(ledger_dir)
    trial.run.id = f"wire-audit-{index}-{secrets.token_hex(4)}"
    trial.eval.mode = "clients"  # what a deployed client sends: train and evaluate replies
    return trial


def _canary_score(loaded, start: dict, update: dict, canary: torch.Tensor,
                  cfg: FedLLMConfig) -> float:
    models.load_adapter_state(loaded.model, start)
    before = canary_losses(loaded.model, canary, cfg.eval.batch_size, loaded.device)[0]
    models.load_adapter_state(loaded.model, {k: start[k] + update[k] for k in start})
    after = canary_losses(loaded.model, canary, cfg.eval.batch_size, loaded.device)[0]
    models.load_adapter_state(loaded.model, start)
    return float(before - after)


def _number(value) -> float:
    """A field's value as a score (a string scores by its hash: equal strings tie)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float(int.from_bytes(str(value).encode()[:6].ljust(6, b"\0"), "big"))


def _claim(name: str, book: Ledger, cfg: FedLLMConfig) -> float:
    """The ε the protocol claims for ``name`` in this trial, from the trial's ledger."""
    delta, acc = cfg.privacy.delta, cfg.privacy.accountant
    listed = {**protocol.TRAIN_REPLY,
              **{f"eval.{k}": v for k, v in protocol.EVAL_REPLY.items()}}
    kind = listed.get(name, (None,))[0]
    if kind == protocol.NOISED_UPDATE:
        return epsilon([e.event for e in book.entries if e.purpose in ("train", "size")], delta,
                       acc)
    if kind == protocol.PUBLIC:
        return epsilon(book.events(), delta, acc)
    if kind == protocol.DP_STATISTIC:
        return epsilon([e.event for e in book.entries if e.purpose == "eval"], delta, acc)
    return 0.0  # not in the protocol: it should never have been sent


def _score_field(name: str, included: np.ndarray, values: list[float], claims: list[float],
                 cfg: FedLLMConfig, reference: float | None) -> dict:
    listed = {**protocol.TRAIN_REPLY, **{f"eval.{k}": v for k, v in protocol.EVAL_REPLY.items()}}
    kind = listed.get(name, ("not listed: never to be sent",))[0]
    scores = np.asarray(values, dtype=np.float64)
    claimed = min(claims)  # the most lenient trial's claim is still a claim
    if not np.all(np.isfinite(scores)):
        scores = np.nan_to_num(scores, nan=0.0, posinf=1e300, neginf=-1e300)
    tests = [scores, -scores]  # the value, either way
    if reference is not None and name != f"{protocol.ARRAYS_RECORD}.*":
        tests.append(np.abs(scores - reference))  # the distance from D's own value
    if np.ptp(scores) == 0:
        lower = 0.0
    else:
        confidence = 1 - (1 - cfg.audit.confidence) / len(tests)  # Bonferroni over the tests
        lower = max(audit_math.threshold_audit(included, s, cfg.privacy.delta,
                                               confidence).epsilon_lower_bound for s in tests)
    return {"class": kind, "claimed_epsilon": claimed, "epsilon_lower_bound": lower,
            "violation": bool(lower > claimed + 1e-9),
            "distinct_values": int(len(np.unique(scores)))}


def summary_lines(doc: dict) -> list[str]:
    lines = [f"wire audit, {doc['trials']} trials ({doc['confidence']:.0%} confidence, "
             f"δ={doc['delta']:g}): {doc['status']}"]
    for name, row in sorted(doc["fields"].items()):
        lb = row["epsilon_lower_bound"]
        lines.append(f"  {name:<32} {row['class']:<16} lower bound "
                     f"{'inf' if math.isinf(lb) else f'{lb:.3f}':>7} vs claim "
                     f"{row['claimed_epsilon']:.3f}{'   BROKEN CLAIM' if row['violation'] else ''}")
    return lines
