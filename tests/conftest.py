import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_cfg():
    from fedllm.config import compose

    return compose(["model=tiny", "adapter=lora", "train.batch_size=8", "train.lr=2e-3",
                    "train.physical_batch_size=null",
                    "federation.num_clients=4", "federation.clients_per_round=2",
                    "federation.rounds=2", "train.local_steps=2"])


@pytest.fixture(scope="session")
def tiny_loaded(tiny_cfg):
    from fedllm import models

    return models.build(tiny_cfg.model, seed=0, device="cpu")


@pytest.fixture(scope="session")
def tiny_data(tiny_cfg, tiny_loaded):
    from fedllm.config import min_client_sequences
    from fedllm.data.federated import build_federated_data

    return build_federated_data(tiny_cfg.data, tiny_loaded.tokenizer, seq_len=tiny_cfg.train.seq_len,
                                min_sequences=min_client_sequences(tiny_cfg),
                                num_clients=tiny_cfg.federation.num_clients, seed=0)
