"""Privacy-budget reports, rebuilt from a run directory's files.

Inputs (all written during the run): ``config.yaml``, ``metrics.jsonl`` and
``privacy_events.jsonl`` (one line per DP release the server saw, and per client that
declined for budget or refused to train, e.g. over an unreadable ledger). Outputs:
``privacy_report.json``, ``epsilon.png`` (ε and held-out loss per round),
``privacy_report.html`` (self-contained; rendered from the Jinja2 templates in
``fedllm/templates`` with autoescape and one stylesheet), and the model card
``adapter/README.md`` (with the samples of ``samples.json`` when the ServerApp wrote them).
``fedllm report RUN_DIR`` calls ``write_reports`` too, so a report can always be rebuilt.

Every epsilon is computed by ``fedllm.privacy.accounting`` from the events of the mechanism
that actually ran (sample rate, noise multiplier, steps), never estimated.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from fedllm.io import atomic_write_bytes, atomic_write_text, read_jsonl
from fedllm.privacy.accounting import (SEARCH_DISCRETIZATION, PrivacyEvent,
                                       effective_accountant, epsilon)
from fedllm.privacy.size_estimate import side_releases

EVENTS_FILE = "privacy_events.jsonl"
MAX_CLIENT_LINES = 30  # per-client curves in the plot above this would be unreadable


@dataclass
class RunFiles:
    cfg: object
    metrics: list[dict]
    releases: list[dict]
    declines: list[dict]
    refusals: list[dict]
    user_releases: list[dict]


def load_run(run_dir: Path) -> RunFiles:
    from fedllm.config import load_run_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fedllm run directory (no config.yaml)")
    records = read_jsonl(run_dir / EVENTS_FILE)
    # A resumed round may report a client's release again: it is the same release (the client
    # resends it), so keep one per (client, round). User-level releases are never merged: a
    # re-run round draws fresh server noise, a second release.
    releases = {(r["client_id"], r["round"]): r for r in records if r.get("kind") == "release"}
    return RunFiles(cfg=load_run_config(cfg_path),
                    metrics=read_jsonl(run_dir / "metrics.jsonl"),
                    releases=list(releases.values()),
                    declines=[r for r in records if r.get("kind") == "declined"],
                    refusals=[r for r in records if r.get("kind") == "refused"],
                    user_releases=[r for r in records if r.get("kind") == "user_release"])


def _event(record: dict) -> PrivacyEvent:
    return PrivacyEvent(noise_multiplier=record["noise_multiplier"], steps=record["steps"],
                        sampling=record.get("sampling", "poisson"),
                        sample_rate=record.get("sample_rate"),
                        sample_size=record.get("sample_size"), population=record.get("population"))


def epsilon_by_round(releases: list[dict], rounds: int, delta: float, accountant: str,
                     extra: list[PrivacyEvent] = ()) -> dict:
    """Run-level epsilon of every client after each round (max, median, per client).

    A client's epsilon only changes in rounds it took part in, so one accountant call per
    participation suffices. These curve points use the coarser PLD grid (upper bounds); the
    per-client table uses the fine grid.
    """
    by_client: dict[str, list[tuple[int, PrivacyEvent]]] = {}
    for r in releases:
        by_client.setdefault(r["client_id"], []).append((int(r["round"]), _event(r)))
    curves: dict[str, list[float]] = {}
    for cid, items in by_client.items():
        items.sort(key=lambda x: x[0])
        values, spent, i = [], list(extra), 0
        current = 0.0
        for rnd in range(1, rounds + 1):
            changed = False
            while i < len(items) and items[i][0] <= rnd:
                spent.append(items[i][1])
                i, changed = i + 1, True
            if changed:
                current = epsilon(spent, delta, accountant, discretization=SEARCH_DISCRETIZATION)
            values.append(current)
        curves[cid] = values
    rows = list(zip(*curves.values())) if curves else [() for _ in range(rounds)]
    return {
        "round": list(range(1, rounds + 1)),
        "max": [max(v) if v else 0.0 for v in rows],
        "median": [statistics.median(v) if v else 0.0 for v in rows],
        "clients": curves if len(curves) <= MAX_CLIENT_LINES else {},
    }


def build_privacy_report(run: RunFiles) -> dict:
    cfg = run.cfg
    delta, accountant = cfg.privacy.delta, cfg.privacy.accountant
    rounds = len(run.metrics)
    example = None
    if cfg.privacy.example.enabled:
        per_client: dict[str, list[dict]] = {}
        for r in run.releases:
            per_client.setdefault(r["client_id"], []).append(r)
        clients = {}
        # Base model + every round evaluated (deployment): each a DP statistic per node.
        extra = side_releases(cfg, rounds + 1 if rounds else 0)
        for cid, recs in sorted(per_client.items()):
            recs.sort(key=lambda r: r["round"])
            last = recs[-1]
            events = [_event(r) for r in recs]
            clients[cid] = {
                "epsilon": epsilon(events + extra, delta, accountant),
                "steps": sum(e.steps for e in events),
                "sample_rate": last.get("sample_rate"),
                "noise_multiplier": last["noise_multiplier"],
                "max_grad_norm": last.get("max_grad_norm"),
                "rounds": len(recs),
                "sampling": last.get("sampling", "poisson"),
                "lifetime_epsilon": last.get("lifetime_epsilon"),
            }
            clients[cid]["ledger_consistent"] = ledger_consistent(clients[cid])
        values = [c["epsilon"] for c in clients.values()]
        all_events = [_event(r) for r in run.releases]
        example = {
            "unit": unit_description(cfg),
            "max_epsilon": max(values) if values else 0.0,
            "median_epsilon": statistics.median(values) if values else 0.0,
            "target_epsilon": cfg.privacy.example.target_epsilon
            if cfg.privacy.example.noise_multiplier is None else None,
            "accountant": effective_accountant(all_events, accountant),
            "budget": cfg.privacy.budget,
            "max_lifetime_epsilon": max((c["lifetime_epsilon"] for c in clients.values()
                                         if c["lifetime_epsilon"] is not None), default=None),
            "clients": clients,
            "ledger_mismatches": [cid for cid, c in clients.items()
                                  if c["ledger_consistent"] is False],
            "exhausted_clients": [{"client_id": d["client_id"], "round": d["round"],
                                   "reason": d["reason"]} for d in run.declines],
            "epsilon_by_round": epsilon_by_round(run.releases, rounds, delta, accountant, extra),
            "side_releases": [e.to_dict() for e in extra],
        }
    return {
        "delta": delta,
        "accountant": accountant,
        "rounds": rounds,
        "example_level": example,
        "user_level": user_level_section(run),
        "refused_clients": [{"client_id": r["client_id"], "round": r["round"],
                             "reason": r["reason"]} for r in run.refusals],
        "notes": [
            "Epsilons are computed with Google dp_accounting from the mechanisms run: Poisson "
            "sampling at each client's rate q, Gaussian noise, every local step composed, "
            "together with each client's one DP estimate of its size (q = batch / that "
            "estimate, so q reveals no exact size) and, in a deployment, its DP held-out loss "
            "statistics ('side_releases').",
            "What a client sends the server is listed field by field in fedllm.protocol: the "
            "noised update, values derived from public or already released values, and DP "
            "statistics with their own ledger entries. Its training loss is never sent.",
            "'epsilon' covers this run; 'lifetime_epsilon' is what the client's own ledger "
            "holds over all runs that used it, as the client reported it in its last round.",
            "'ledger_mismatches' lists clients whose reported lifetime epsilon is below this "
            "run's epsilon: their ledger lost entries during the run (deleted or replaced). A "
            "ledger deleted between runs cannot be detected from one run's records.",
            "A release is counted as soon as the client sends it, even if the server then "
            "rejects the update (conservative).",
            "Clients are averaged unweighted: a client's dataset size does not influence the "
            "aggregate.",
        ],
    }


LEDGER_TOLERANCE = 1e-3  # relative: both sides use the same accountant, composed in any order


def ledger_consistent(client: dict) -> bool | None:
    """Cross-check of a client's own ledger against the server's record of this run: the
    lifetime ε it reported in its last round covers all its ledger entries, so it can never be
    below this run's ε from the releases the server saw. If it is, the ledger lost entries
    (deleted or replaced since the run started). None: the client reported no lifetime ε."""
    lifetime = client.get("lifetime_epsilon")
    if lifetime is None:
        return None
    return lifetime >= client["epsilon"] * (1 - LEDGER_TOLERANCE)


def user_level_section(run: RunFiles) -> dict | None:
    """DP-FedAvg guarantee: unit = one client's whole data, over the rounds released."""
    from fedllm.privacy.accounting import user_level_epsilons, user_level_event

    cfg = run.cfg
    user = cfg.privacy.user
    if not user.enabled:
        return None
    rels = run.user_releases
    z = rels[-1]["noise_multiplier"] if rels else None
    population = rels[-1]["population"] if rels else None
    eps = user_level_epsilons(rels, cfg.privacy.delta, cfg.privacy.accountant)
    if any("clients" not in r for r in rels):  # records of an older fedllm: cohorts unknown
        eps["server"] = eps["max_rounds_per_client"] = None
    accountant = (effective_accountant([user_level_event(z, 1, sampling=rels[-1]["sampling"],
                                                         cohort=rels[-1]["cohort"],
                                                         population=population)],
                                       cfg.privacy.accountant)
                  if rels else cfg.privacy.accountant)
    cohort = cfg.federation.clients_per_round
    return {
        "unit": "all data of one client (add/remove one client)"
        if cfg.federation.sampling == "poisson" else "all data of one client (replace one client)",
        "epsilon": eps["observers"],
        "epsilon_vs_server": eps["server"],
        "max_rounds_per_client": eps["max_rounds_per_client"],
        "skipped_rounds": sum(1 for r in rels if r.get("applied") is False),
        "noise_multiplier": z,
        "clip_norm": user.clip_norm,
        "noise": user.noise,
        "sampling": cfg.federation.sampling,
        "sample_rate": cohort / population if population else None,
        "expected_cohort": cohort,
        "population": population,
        "rounds": len(rels),
        "target_epsilon": user.target_epsilon if user.noise_multiplier is None else None,
        "accountant": accountant,
        "secure_aggregation": cfg.secagg.enabled,
        "min_survivors": cfg.federation.min_clients,
        "tolerated_dropouts": tolerated_dropouts(cfg),
    }


def tolerated_dropouts(cfg) -> int:
    """Dropouts per round that keep the user-level guarantee: at least min_clients survivors
    carry the distributed noise; under SecAgg+ also at least t of each secret's shares."""
    cohort = cfg.federation.clients_per_round
    tolerated = max(cohort - cfg.federation.min_clients, 0)
    if cfg.secagg.enabled:
        from fedllm.secagg import majority_threshold, share_count

        shares = share_count(cohort, cfg.secagg.num_shares)
        t = majority_threshold(shares, cfg.secagg.reconstruction_threshold)
        tolerated = min(tolerated, shares - t)
    return tolerated


# ----------------------------------------------------------------------------- outputs

def write_reports(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    report = build_privacy_report(run)
    atomic_write_text(run_dir / "privacy_report.json",
                      json.dumps(report, indent=2, default=_json_default) + "\n")
    png = epsilon_plot(report, run.metrics)
    if png is not None:
        atomic_write_bytes(run_dir / "epsilon.png", png)
    atomic_write_text(run_dir / "privacy_report.html",
                      render_html(run, report, png, read_audit(run_dir), read_audit_png(run_dir)))
    if (run_dir / "adapter").is_dir():
        final = run.metrics[-1] if run.metrics else None
        atomic_write_text(run_dir / "adapter" / "README.md",
                          model_card(run.cfg, report, final, read_samples(run_dir)))
    return report


SAMPLES_FILE = "samples.json"  # written at export by fedllm.export.write_samples


def read_samples(run_dir: Path) -> dict | None:
    path = Path(run_dir) / SAMPLES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _json_default(value):
    raise TypeError(f"not JSON serializable: {value!r}")


def epsilon_plot(report: dict, metrics: list[dict] | None = None) -> bytes | None:
    """Example-level ε per round (per client, max, median) and, beside it, the held-out loss
    of the global adapter per round (when the run evaluated one)."""
    ex = report["example_level"]
    if ex is None or not ex["epsilon_by_round"]["round"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(m["round"], m["eval_loss"]) for m in metrics or []
              if m.get("eval_loss") is not None]
    fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(12 if losses else 7, 4), dpi=110,
                             squeeze=False)
    _epsilon_axes(axes[0][0], report)
    if losses:
        _loss_axes(axes[0][1], losses)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _epsilon_axes(ax, report: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    ex = report["example_level"]
    curve = ex["epsilon_by_round"]
    for values in curve["clients"].values():
        ax.plot(curve["round"], values, color="0.8", linewidth=0.8, zorder=1)
    ax.plot(curve["round"], curve["max"], marker="o", label="max over clients", zorder=3)
    ax.plot(curve["round"], curve["median"], marker="s", label="median", zorder=2)
    if ex.get("target_epsilon"):
        ax.axhline(ex["target_epsilon"], linestyle="--", color="tab:red",
                   label=f"target ε={ex['target_epsilon']:g}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"ε (δ={report['delta']:g}, this run)")
    ax.set_title("Example-level privacy loss per client")
    ax.grid(alpha=0.3)
    ax.legend()


def _loss_axes(ax, losses: list[tuple[int, float]]) -> None:
    from matplotlib.ticker import MaxNLocator

    rounds, values = zip(*losses)
    ax.plot(rounds, values, marker="o", color="tab:green")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title("Held-out loss of the global adapter")
    ax.grid(alpha=0.3)


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def mechanism_text(cfg) -> str:
    """What ran on each client, as the model card names it."""
    if cfg.train.method == "zeroth_order":
        return (f"DP zeroth-order training ({cfg.train.zo_directions} random direction(s) per "
                "step from seeds; each example's directional derivatives clipped jointly and "
                "each sum noised: the subsampled Gaussian mechanism DP-SGD's accounting "
                "describes)")
    return "DP-SGD (Opacus)"


def steps_name(cfg) -> str:
    """The local steps, named for the summary sentence of the HTML report."""
    return ("DP zeroth-order steps" if cfg.train.method == "zeroth_order" else "DP-SGD steps")


def participation_text(cfg) -> str:
    cap = cfg.privacy.example.max_participations
    if cap == "auto":  # a run that ended before its server resolved the cap
        cap = cfg.federation.rounds
    calibrated = ("" if cfg.privacy.example.noise_multiplier is not None else
                  f"its noise is calibrated for {int(cap) * cfg.train.local_steps} steps and ")
    return (f"each client takes part in at most {cap} of {cfg.federation.rounds} rounds; "
            f"{calibrated}its own ledger refuses any further participation")


def user_sentence(report: dict) -> str:
    """The user-level guarantee in one paragraph of plain text (model card)."""
    parts = user_sentence_parts(report)
    return parts["before"] + parts["epsilon"] + parts["after"]


def user_sentence_parts(report: dict) -> dict:
    """The user-level sentence split around its ε, which the HTML report sets in bold."""
    u = report["user_level"]
    if u is None:
        return {"before": "This is not user-level privacy: a client's participation as a whole "
                          "is not hidden.", "epsilon": "", "after": ""}
    where = ("added by each client in shares (distributed), so the server never sees an update "
             "with less than the calibrated noise" if u["noise"] == "distributed"
             else "added by the server to the sum (central: the server is trusted to add it)")
    secagg = ("Updates are combined with secure aggregation (SecAgg+): the server learns only "
              "their sum." if u["secure_aggregation"] else
              "Without secure aggregation the server sees each clipped update.")
    server = ("unknown (records of an older fedllm)" if u.get("epsilon_vs_server") is None else
              f"{_fmt(u['epsilon_vs_server'])} (a client's update entered at most "
              f"{u['max_rounds_per_client']} round(s))")
    return {
        "before": "User level: all data of any one client is protected with ε = ",
        "epsilon": _fmt(u["epsilon"]),
        "after": (
            f" at δ = {report['delta']:g} against parties that see only the models, a bound "
            f"that holds before sampling (amplified by client sampling, or the participation "
            f"cap's unamplified bound if smaller) over {u['rounds']} rounds ({u['sampling']} client "
            f"sampling, each update clipped to L2 norm {u['clip_norm']:g}, Gaussian noise "
            f"multiplier {_fmt(u['noise_multiplier'])} {where}; averages divide by the expected "
            f"cohort {u['expected_cohort']}). Against the server, which picks the cohorts and "
            f"so knows who took part, sampling amplifies nothing: ε = {server}. {secagg} The "
            f"noise guarantee holds with up to {u['tolerated_dropouts']} dropouts per round."),
    }


def report_templates() -> dict[str, str]:
    """Template name -> source (the stylesheet is ``report.css``)."""
    import yaml

    return yaml.safe_load((Path(__file__).parent / "templates" / "reports.yaml").read_text())


@functools.cache
def _templates():
    """The Jinja2 environment of the HTML reports (fedllm/templates/reports.yaml, shipped as
    package data and inside Flower app bundles). Autoescape is on: every value is HTML-escaped
    unless a template says otherwise."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.DictLoader(report_templates()),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = _fmt
    return env


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data else None


def render_html(run: RunFiles, report: dict, png: bytes | None, audit: dict | None = None,
                audit_png: bytes | None = None) -> str:
    return _templates().get_template("report.html.j2").render(
        cfg=run.cfg, report=report, ex=report["example_level"], user=report["user_level"],
        user_parts=user_sentence_parts(report), participation=participation_text(run.cfg),
        steps_name=steps_name(run.cfg),
        adapter=describe_adapter(run.cfg.model), metrics=run.metrics, png_b64=_b64(png),
        audit=audit, audit_png_b64=_b64(audit_png))


def unit_label(cfg) -> str:
    """The example-level unit in a few words, shown next to every example-level ε."""
    return "one record" if cfg.data.unit == "record" else f"one {cfg.train.seq_len}-token window"


def unit_description(cfg) -> str:
    """The example-level unit in one sentence (reports, model card, audit)."""
    if cfg.data.unit == "record":
        return ("one record of a client (one speech, JSONL line or paragraph of a text file; "
                f"add/remove one; truncated to {cfg.train.seq_len} tokens, an instruction "
                "record trained on its assistant turns only)")
    return (f"one packed {cfg.train.seq_len}-token window of a client's text (add/remove one; "
            "data.unit=sequence protects windows, not records: removing one record shifts "
            "every later window, so no record has a meaningful guarantee; the default "
            "data.unit=record protects records)")


def model_card(cfg, report: dict, final_metrics: dict | None,
               samples: dict | None = None) -> str:
    ex = report["example_level"]
    base_model = portable_base_model(cfg)
    lines = [
        "---",
        *([f"base_model: {json.dumps(base_model)}"] if base_model else []),
        "library_name: peft",
        f"tags: [fedllm, federated-learning, differential-privacy, {_adapter_tag(cfg)}]",
        "---",
        "",
        "# fedllm adapter",
        "",
        f"A {describe_adapter(cfg.model)} for base model `{_base_name(cfg)}`, trained "
        f"with federated averaging over {report['rounds']} rounds by fedllm.",
        "",
        "## Privacy guarantee",
        "",
    ]
    if ex is None and report["user_level"] is None:
        lines += ["**None.** This adapter was trained without differential privacy "
                  "(`privacy.example.enabled=false`). It may memorize its training data."]
    elif ex is None:
        lines += ["- **Example level:** none (`privacy.example.enabled=false`)."]
    else:
        lines += [
            f"- **Unit of privacy:** {ex['unit']}.",
            f"- **Guarantee:** ({_fmt(ex['max_epsilon'], '.3g')}, {report['delta']:g})-differential "
            f"privacy for every client's training sequences (the maximum over clients; median "
            f"epsilon {_fmt(ex['median_epsilon'], '.3g')}).",
            f"- **Mechanism:** {mechanism_text(cfg)} on each client: Poisson sampling at rate "
            f"q = batch / the client's DP size estimate (Gaussian noise of std "
            f"{cfg.privacy.example.size_noise:g} on its size, accounted), per-sample "
            f"{'gradient' if cfg.train.method == 'backprop' else 'directional-derivative'} "
            f"clipping to L2 norm "
            f"{cfg.privacy.example.max_grad_norm:g}, Gaussian noise multiplier "
            f"{_range(ex['clients'], 'noise_multiplier')}.",
            f"- **Accountant:** {ex['accountant'].upper()} (Google dp_accounting), composed over "
            f"every local step of every round each client took part in.",
            f"- **Training:** {report['rounds']} rounds, {cfg.federation.clients_per_round} clients "
            f"per round ({cfg.federation.sampling} sampling), {cfg.train.local_steps} local "
            f"steps per round, expected batch {cfg.train.batch_size}.",
            f"- **Participation cap:** {participation_text(cfg)}.",
        ]
        if ex.get("budget") is not None:
            lines.append(f"- **Budget:** each client's lifetime ε is capped at {ex['budget']:g} by "
                         f"its own ledger; {len(ex['exhausted_clients'])} participation(s) were "
                         f"declined for budget.")
    if report["user_level"] is not None:
        u = report["user_level"]
        lines += [f"- **User level:** ({_fmt(u['epsilon'], '.3g')}, {report['delta']:g})-DP for all "
                  f"data of any one client ({u['unit']}) against observers of the model; "
                  f"{_fmt(u.get('epsilon_vs_server'), '.3g')} against the server (it knows the "
                  f"cohorts); {u['accountant'].upper()} accountant.",
                  f"  {user_sentence(report)}"]
    elif ex is not None:
        lines.append("- **Not covered:** user-level (whole-client) privacy is not provided by "
                     "this run.")
    lines += threat_model_lines(report)
    if final_metrics:
        lines += ["", "## Evaluation", "",
                  f"Held-out loss {final_metrics['eval_loss']:.4f}, perplexity "
                  f"{final_metrics['perplexity']:.2f}."]
    lines += sample_lines(samples)
    lines += ["", "See `privacy_report.json` / `privacy_report.html` in the run directory for "
              "per-client values.", ""]
    return "\n".join(lines)


def sample_lines(samples: dict | None) -> list[str]:
    """The card's "Sample generations" section: base model vs adapter, fixed prompts."""
    if samples is None:
        return []
    lines = ["", "## Sample generations", ""]
    if "skipped" in samples:
        return lines + [f"None: {samples['skipped']}."]
    lines += [f"Greedy continuations ({samples['max_new_tokens']} new tokens at most) of fixed "
              "prompts, by the base model alone and with this adapter "
              "(`fedllm generate RUN_DIR --prompt TEXT` makes more):", ""]
    for s in samples["samples"]:
        lines += [f"- **Prompt:** {json.dumps(s['prompt'], ensure_ascii=False)}",
                  f"  - base: {json.dumps(s['base'], ensure_ascii=False)}",
                  f"  - adapter: {json.dumps(s['adapter'], ensure_ascii=False)}"]
    return lines


def threat_model_lines(report: dict) -> list[str]:
    """Whom each guarantee of this run holds against (the README's threat model, applied)."""
    ex, u = report["example_level"], report["user_level"]
    if ex is None and u is None:
        return []
    lines = ["", "## Threat model", ""]
    if ex is not None:
        lines.append("- Example level holds against the server, honest or malicious (replayed "
                     "rounds are resent, not re-trained; renamed runs meet the client's lifetime "
                     "budget; a changed plan is refused), and against anyone who sees what a "
                     "client sent: its DP-noised update, its one DP size estimate, its DP "
                     "held-out statistics when deployed, and values derived only from those and "
                     "the public config (its training loss and exact size are never sent). It "
                     "assumes the client ran fedllm's client code and kept its ledger; the "
                     "client's own machine and timing side channels are out of scope.")
    if u is not None:
        lines.append("- User level, amplified by client sampling, holds against users of this "
                     "adapter, who do not know the cohorts. The server picks the cohorts: "
                     f"against it the user-level ε is {_fmt(u.get('epsilon_vs_server'), '.3g')}"
                     + ("" if u["noise"] == "distributed" and u["secure_aggregation"] else
                        ", and only for what the released models reveal: without distributed "
                        "noise under SecAgg+ it sees un-noised updates or sums") + ".")
        if u["secure_aggregation"]:
            lines.append("- SecAgg+ hides single updates from an honest-but-curious server "
                         "only; it does not hold against a malicious server (see the "
                         "project README's threat model).")
    return lines


def describe_adapter(model_cfg) -> str:
    """One phrase for reports and model cards, e.g. ``LoRA (r=8, alpha=16, targets q_proj)``."""
    if getattr(model_cfg, "adapter", "lora") == "prompt_tuning":
        pt = model_cfg.prompt_tuning
        return f"prompt-tuning adapter ({pt.num_virtual_tokens} virtual tokens, init {pt.init})"
    from fedllm.models import requested_targets

    lora = model_cfg.lora
    targets = requested_targets(lora.target_modules)
    return (f"LoRA adapter (r={lora.r}, alpha={lora.alpha:g}, targets "
            f"{', '.join(targets) if targets else 'auto'})")


def _adapter_tag(cfg) -> str:
    return "prompt-tuning" if cfg.model.adapter == "prompt_tuning" else "lora"


def _range(clients: dict, key: str) -> str:
    values = [c[key] for c in clients.values() if c.get(key) is not None]
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if math.isclose(lo, hi) else f"{lo:.3g}–{hi:.3g} (per client)"


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def portable_base_model(cfg) -> str | None:
    """The base model as others can load it: the hub id of the bundled SmolLM2, else the
    model.path the run was given (never fedllm's local conversion cache); None for the
    random-init tiny model, which only the run's seed reproduces."""
    if cfg.model.name == "tiny":
        return None
    if cfg.model.name == "smollm2" and not cfg.model.path:
        return SMOLLM2_HUB_ID
    return cfg.model.path


def _base_name(cfg) -> str:
    if cfg.model.path:
        return cfg.model.path
    return {"smollm2": "SmolLM2-135M-Instruct", "tiny": "tiny random-init Llama"}.get(
        cfg.model.name, cfg.model.name)


# ----------------------------------------------------------------------------- audit

AUDIT_FILE = "audit.json"
AUDIT_ROC_FILE = "audit_roc.png"


def read_audit(run_dir: Path) -> dict | None:
    path = Path(run_dir) / AUDIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_audit_files(run_dir: Path, audit: dict) -> list[Path]:
    """``audit.json`` and ``audit_roc.png``; then the HTML: the run's privacy report gains an
    audit section when ``run_dir`` is a simulation run, else a standalone ``audit.html``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / AUDIT_FILE, json.dumps(audit, indent=2) + "\n")
    atomic_write_bytes(run_dir / AUDIT_ROC_FILE, audit_roc_plot(audit))
    written = [run_dir / AUDIT_FILE, run_dir / AUDIT_ROC_FILE]
    if (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file():
        write_reports(run_dir)
        written.append(run_dir / "privacy_report.html")
    else:
        page = _templates().get_template("audit.html.j2").render(
            audit=audit, audit_png_b64=_b64(read_audit_png(run_dir)))
        atomic_write_text(run_dir / "audit.html", page)
        written.append(run_dir / "audit.html")
    return written


def read_audit_png(run_dir: Path) -> bytes | None:
    path = Path(run_dir) / AUDIT_ROC_FILE
    return path.read_bytes() if path.is_file() else None


def audit_roc_plot(audit: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr = audit["roc"]["fpr"], audit["roc"]["tpr"]
    eps, delta = audit["claimed_epsilon"], audit["delta"]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.plot(fpr, tpr, label=f"canary membership test (AUC {audit['auc']:.3f})")
    # The best any test can do against an (ε, δ)-DP mechanism: TPR ≤ e^ε·FPR + δ and
    # TPR ≤ 1 − e^−ε·(1 − FPR − δ).
    grid = [i / 200 for i in range(201)]
    bound = [min(1.0, math.exp(eps) * x + delta, 1 - math.exp(-eps) * (1 - x - delta))
             for x in grid]
    ax.plot(grid, bound, linestyle="--", color="tab:red", label=f"limit at claimed ε={eps:.3g}")
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"Privacy audit ({audit['method'].replace('_', '-')}, "
                 f"break_mechanism={audit['break_mechanism']})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
