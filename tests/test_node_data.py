"""A deployed SuperNode loads its own data and settings from its node config."""

import json

import pytest

from fedllm.clients.app import node_config_overrides, this_client
from fedllm.data.sources import DataError


@pytest.fixture()
def site_data(tmp_path):
    path = tmp_path / "hospital-a.jsonl"
    lines = [json.dumps({"prompt": f"Question {i}?", "response": "An answer " * 20})
             for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_node_loads_its_own_file(tiny_cfg, site_data):
    client = this_client(tiny_cfg, {"data-path": str(site_data), "client-id": "site-a"})
    assert client.client_id == "site-a"
    assert len(client.train) >= tiny_cfg.train.batch_size and len(client.eval) >= 1


def test_missing_or_absent_data_path_is_a_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        this_client(tiny_cfg, {"data-path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ValueError, match="data-path"):
        this_client(tiny_cfg, {})


def test_node_settings_override_the_run(tiny_cfg, tmp_path):
    cfg = node_config_overrides(tiny_cfg, {"ledger-dir": str(tmp_path / "l"), "device": "cpu"})
    assert cfg.privacy.ledger_dir == str(tmp_path / "l") and cfg.model.device == "cpu"
    assert tiny_cfg.privacy.ledger_dir is None  # the shared run config is untouched


def test_site_budget_is_enforced_even_if_the_run_asks_for_more(tiny_cfg):
    import copy

    generous = copy.deepcopy(tiny_cfg)
    generous.privacy.budget = 100.0
    assert node_config_overrides(generous, {"budget": 3.0}).privacy.budget == 3.0
    assert node_config_overrides(tiny_cfg, {"budget": 3.0}).privacy.budget == 3.0
    strict = copy.deepcopy(tiny_cfg)
    strict.privacy.budget = 1.0
    assert node_config_overrides(strict, {"budget": 3.0}).privacy.budget == 1.0
