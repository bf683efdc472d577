"""Privacy report (JSON) and the model card written beside every exported adapter.

Every epsilon here is computed by ``fedllm.privacy.accounting`` from the events of the
mechanism that actually ran (sample rate, noise multiplier, steps), never estimated.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fedllm.io import atomic_write_text
from fedllm.privacy.accounting import PrivacyEvent, effective_accountant, epsilon


def client_epsilons(events: dict[str, list[PrivacyEvent]], delta: float, accountant: str
                    ) -> dict[str, float]:
    return {cid: epsilon(evs, delta, accountant) for cid, evs in sorted(events.items())}


def build_privacy_report(cfg, events: dict[str, list[PrivacyEvent]],
                         client_params: dict[str, dict], rounds_run: int,
                         epsilons: dict[str, float] | None = None) -> dict:
    delta, accountant = cfg.privacy.delta, cfg.privacy.accountant
    example = None
    if cfg.privacy.example.enabled:
        eps = epsilons if epsilons is not None else client_epsilons(events, delta, accountant)
        clients = {}
        for cid, params in sorted(client_params.items()):
            clients[cid] = {
                "epsilon": eps.get(cid, 0.0),
                "steps": params["steps"],
                "sample_rate": params.get("sample_rate"),
                "noise_multiplier": params.get("noise_multiplier"),
                "max_grad_norm": params.get("max_grad_norm"),
                "rounds": params["rounds"],
                "sampling": "poisson",
            }
        values = [c["epsilon"] for c in clients.values()]
        all_events = [e for evs in events.values() for e in evs]
        example = {
            "unit": "one training sequence of a client (add/remove one)",
            "max_epsilon": max(values) if values else 0.0,
            "median_epsilon": statistics.median(values) if values else 0.0,
            "target_epsilon": cfg.privacy.example.target_epsilon
            if cfg.privacy.example.noise_multiplier is None else None,
            "accountant": effective_accountant(all_events, accountant),
            "clients": clients,
        }
    return {
        "delta": delta,
        "accountant": accountant,
        "rounds": rounds_run,
        "example_level": example,
        "user_level": None,
        "notes": [
            "Epsilons are computed with Google dp_accounting from the mechanism run: Poisson "
            "sampling at each client's rate q, Gaussian noise, every local step composed.",
            "Clients are averaged unweighted: a client's dataset size does not influence the "
            "aggregate.",
            "Each client's noise is calibrated as if it were sampled in every round, so its "
            "epsilon stays below the target however often it is actually sampled.",
        ],
    }


def write_privacy_report(run_dir: Path, report: dict) -> Path:
    path = Path(run_dir) / "privacy_report.json"
    atomic_write_text(path, json.dumps(report, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serializable: {value!r}")


def model_card(cfg, report: dict, final_metrics: dict | None) -> str:
    ex = report["example_level"]
    lines = [
        "---",
        "library_name: peft",
        "tags: [fedllm, federated-learning, differential-privacy, lora]",
        "---",
        "",
        "# fedllm adapter",
        "",
        f"A LoRA adapter (r={cfg.model.lora.r}, alpha={cfg.model.lora.alpha}, targets "
        f"{', '.join(cfg.model.lora.target_modules)}) for base model `{_base_name(cfg)}`, trained "
        f"with federated averaging over {report['rounds']} rounds by fedllm.",
        "",
        "## Privacy guarantee",
        "",
    ]
    if ex is None:
        lines += ["**None.** This adapter was trained without differential privacy "
                  "(`privacy.example.enabled=false`). It may memorize its training data."]
    else:
        lines += [
            f"- **Unit of privacy:** {ex['unit']}.",
            f"- **Guarantee:** ({ex['max_epsilon']:.3g}, {report['delta']:g})-differential "
            f"privacy for every client's training sequences (the maximum over clients; median "
            f"epsilon {ex['median_epsilon']:.3g}).",
            f"- **Mechanism:** DP-SGD (Opacus) on each client: Poisson sampling at rate "
            f"q = batch/client size, per-sample gradient clipping to L2 norm "
            f"{cfg.privacy.example.max_grad_norm:g}, Gaussian noise multiplier "
            f"{_range(ex['clients'], 'noise_multiplier')}.",
            f"- **Accountant:** {ex['accountant'].upper()} (Google dp_accounting), composed over "
            f"every local step of every round each client took part in.",
            f"- **Training:** {report['rounds']} rounds, {cfg.federation.clients_per_round} clients "
            f"per round ({cfg.federation.sampling} sampling), {cfg.train.local_steps} local "
            f"steps per round, expected batch {cfg.train.batch_size}.",
            "- **Not covered:** user-level (whole-client) privacy is not provided by this run.",
        ]
    if final_metrics:
        lines += ["", "## Evaluation", "",
                  f"Held-out loss {final_metrics['eval_loss']:.4f}, perplexity "
                  f"{final_metrics['perplexity']:.2f}."]
    lines += ["", "See `privacy_report.json` in the run directory for per-client values.", ""]
    return "\n".join(lines)


def _range(clients: dict, key: str) -> str:
    values = [c[key] for c in clients.values() if c.get(key) is not None]
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if math.isclose(lo, hi) else f"{lo:.3g}–{hi:.3g} (per client)"


def _base_name(cfg) -> str:
    if cfg.model.path:
        return cfg.model.path
    return {"smollm2": "SmolLM2-135M-Instruct", "tiny": "tiny random-init Llama"}.get(
        cfg.model.name, cfg.model.name)
