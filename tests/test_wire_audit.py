"""The wire audit plays the server: every field of every reply is scored against its claim.

A default client passes; a deliberately broken client that sends its raw training loss (the
leak the review found) is caught as a broken claim on that one field."""

import copy

import pytest

from fedllm.clients.wire_audit import CLIENT_ID, run_wire_audit, summary_lines


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def audit_cfg(tiny_cfg, tmp_path, **faults):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.run.dir = str(tmp_path)
    cfg.audit.runs = 32
    # One local step on the whole batch (q = 1): the raw loss is then a deterministic
    # function of the data, as in the review's reproduction.
    cfg.train.local_steps = 1
    cfg.train.batch_size = 256
    cfg.federation.rounds = 1
    cfg.privacy.example.max_participations = 1
    for key, value in faults.items():
        setattr(cfg.faults, key, value)
    return cfg


def test_a_default_client_breaks_no_claim(tiny_cfg, tiny_loaded, tiny_data, tmp_path):
    doc = run_wire_audit(audit_cfg(tiny_cfg, tmp_path), tiny_loaded,
                         tiny_data.clients[0].train[:40])
    assert doc["status"] == "consistent", "\n".join(summary_lines(doc))
    assert "arrays.*" in doc["fields"] and "eval.metrics.eval_loss_sum" in doc["fields"]
    assert not any("loss" in name and "eval" not in name for name in doc["fields"])
    assert not doc["fields"]["metrics.sample_rate"]["violation"]


def test_a_client_sending_its_raw_training_loss_is_caught(tiny_cfg, tiny_loaded, tiny_data,
                                                          tmp_path):
    doc = run_wire_audit(audit_cfg(tiny_cfg, tmp_path, leak_loss_clients=[CLIENT_ID]),
                         tiny_loaded, tiny_data.clients[0].train[:40])
    row = doc["fields"]["metrics.train_loss"]
    assert row["violation"] and row["claimed_epsilon"] == 0.0 and row["epsilon_lower_bound"] > 0.1
    assert doc["broken_fields"] == ["metrics.train_loss"], "\n".join(summary_lines(doc))
