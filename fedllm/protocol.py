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
