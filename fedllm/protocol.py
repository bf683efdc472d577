"""Names of the records exchanged between ServerApp and ClientApp (one place for both)."""

CONFIG_RECORD = "config"      # ConfigRecord sent with every train message
CONFIG_KEY = "fedllm-config"  # resolved fedllm config (YAML) inside it and in the run config
ROUND_KEY = "server-round"
ARRAYS_RECORD = "arrays"      # global adapter (down) / adapter delta (up)
METRICS_RECORD = "metrics"
CLIENT_RECORD = "client"      # ConfigRecord with the client's id
USER_NOISE_KEY = "user-noise-multiplier"  # DP-FedAvg z, calibrated by the server
MIN_SURVIVORS_KEY = "min-survivors"       # m: each client's noise share is (zS)^2/m
STAGE_KEY = "secagg-stage"                # setup | share | masked | unmask (absent: plain)
SECAGG_STATE = "fedllm-secagg"            # ConfigRecord in the client's Context.state
MASKED_KEY = "masked"                     # the masked, quantized update (flattened)


def encode_config(text: str) -> str:
    """The resolved YAML as one TOML-safe token for `flwr run --run-config`."""
    import base64

    return "b64:" + base64.b64encode(text.encode()).decode()


def decode_config(value: str) -> str:
    import base64

    return base64.b64decode(value[4:]).decode() if value.startswith("b64:") else value


# ----------------------------------------------------------------------------- what a client sends
# Every field of every reply a ClientApp sends, with its privacy class. A field not listed here
# is never sent: the server rejects replies with others (``unlisted_fields``), and the wire
# audit (``fedllm audit --wire``) scores each listed field against its class.
NOISED_UPDATE = "noised update"   # the DP-noised adapter update (example-level DP-SGD)
PUBLIC = "public"                 # computed only from public or already-released values
DP_STATISTIC = "DP statistic"     # a DP statistic with its own ledger entry

TRAIN_REPLY: dict[str, tuple[str, str]] = {
    f"{ARRAYS_RECORD}.*": (NOISED_UPDATE, "the adapter delta after DP-SGD (and user-level "
                                          "clipping/noise where configured)"),
    f"{METRICS_RECORD}.steps": (PUBLIC, "train.local_steps of the run's config"),
    f"{METRICS_RECORD}.num-examples": (PUBLIC, "always 1: unweighted FedAvg"),
    f"{METRICS_RECORD}.sample_rate": (PUBLIC, "B / the client's released DP size estimate"),
    f"{METRICS_RECORD}.noise_multiplier": (PUBLIC, "calibrated from the config and the "
                                                   "released sample rate"),
    f"{METRICS_RECORD}.max_grad_norm": (PUBLIC, "privacy.example.max_grad_norm"),
    f"{METRICS_RECORD}.dp": (PUBLIC, "privacy.example.enabled"),
    f"{METRICS_RECORD}.declined": (PUBLIC, "the release policy's answer, from the ledger's "
                                           "released events and the config"),
    f"{METRICS_RECORD}.refused": (PUBLIC, "the ledger could not be read"),
    f"{METRICS_RECORD}.lifetime_epsilon": (PUBLIC, "ε of the ledger's released events"),
    f"{CLIENT_RECORD}.client_id": (PUBLIC, "the client's name (its identity is not private "
                                           "at example level)"),
    f"{CLIENT_RECORD}.reason": (PUBLIC, "why it declined: from released events and config"),
}
EVAL_REPLY: dict[str, tuple[str, str]] = {
    f"{METRICS_RECORD}.eval_loss_sum": (DP_STATISTIC, "held-out loss sum, each loss clipped "
                                                      "to eval.loss_bound, Gaussian noise"),
    f"{METRICS_RECORD}.num_sequences": (DP_STATISTIC, "held-out count, Gaussian noise (the "
                                                      "same release as eval_loss_sum)"),
    f"{METRICS_RECORD}.declined": (PUBLIC, "the release policy's answer"),
}
# Statistics of private data that are *not* sent, and why.
NOT_SENT: dict[str, str] = {
    "train_loss": "the un-noised local training loss tells D from D plus one example with "
                  "certainty (ε = ∞); it stays in the client's own log",
    "num_sequences (train)": "the client's size n; q comes from its DP estimate instead",
    "exact held-out loss and count": "sent only as the noised DP statistic above",
}


def train_metrics(event, *, dp: bool, max_grad_norm: float,
                  lifetime_epsilon: float | None) -> dict:
    """The metrics of a training reply: every value PUBLIC in TRAIN_REPLY."""
    metrics = {"steps": int(event.steps), "num-examples": 1,
               "sample_rate": float(event.sample_rate),
               "noise_multiplier": float(event.noise_multiplier),
               "max_grad_norm": float(max_grad_norm) if dp else 0.0,
               "dp": int(dp), "declined": 0}
    if dp and lifetime_epsilon is not None:
        metrics["lifetime_epsilon"] = float(lifetime_epsilon)
    return metrics


def eval_metrics(noised_loss_sum: float, noised_count: float) -> dict:
    return {"eval_loss_sum": float(noised_loss_sum), "num_sequences": float(noised_count),
            "declined": 0}


def declined_eval_metrics() -> dict:
    return {"declined": 1}


def reply_fields(content) -> list[str]:
    """The fields of a reply's RecordDict, named as in TRAIN_REPLY / EVAL_REPLY."""
    fields = []
    for name, record in content.items():
        if name == ARRAYS_RECORD:
            fields.append(f"{ARRAYS_RECORD}.*")
            continue
        fields += [f"{name}.{key}" for key in record.keys()]
    return fields


def unlisted_fields(content, listed: dict) -> list[str]:
    """Fields of a reply that the protocol does not list (a client that sends more)."""
    return [f for f in reply_fields(content) if f not in listed]
