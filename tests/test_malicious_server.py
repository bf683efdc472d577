"""The example-level guarantee against a malicious server, played through the real ClientApp.

The adversary is the server: it writes the messages a client receives (round numbers, run ids,
the config with its cap and target) and reads every field of every reply. Each test plays one
attack from the review of the guarantee against the client's real ``local_update`` (real tiny
model, real DP-SGD, real ledger on disk) and checks what the client released and recorded.
"""

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedllm import models, protocol
from fedllm.clients.app import evaluate_global, local_update
from fedllm.config import to_yaml
from fedllm.privacy.accounting import epsilon
from fedllm.privacy.ledger import Ledger


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture()
def site(tmp_path):
    path = tmp_path / "site-a.jsonl"
    lines = [json.dumps({"text": f"Record {i}: " + "the quick brown fox " * 12})
             for i in range(80)]
    path.write_text("\n".join(lines) + "\n")
    return {"data-path": str(path), "client-id": "site-a", "ledger-dir": str(tmp_path / "ledger"),
            "device": "cpu"}


def client_cfg(tiny_cfg, tmp_path, **privacy):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.run.dir, cfg.run.id = str(tmp_path / "run"), "run-a"
    cfg.federation.rounds = 4
    cfg.privacy.example.max_participations = privacy.pop("cap", 2)
    cfg.privacy.example.target_epsilon = privacy.pop("target", 4.0)
    cfg.privacy.budget = privacy.pop("budget", None)
    cfg.eval.mode = "clients"
    assert not privacy
    return cfg


def request(cfg, server_round: int, kind: str = "train") -> Message:
    loaded = models.build(cfg.model, seed=cfg.run.seed, device="cpu")
    arrays = ArrayRecord(OrderedDict((k, Array(v)) for k, v in
                                     models.adapter_state(loaded.model).items()))
    content = RecordDict({protocol.ARRAYS_RECORD: arrays, protocol.CONFIG_RECORD: ConfigRecord(
        {protocol.CONFIG_KEY: to_yaml(cfg), protocol.ROUND_KEY: server_round})})
    from flwr.app import MessageType

    mtype = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    return Message(content=content, dst_node_id=7, message_type=mtype)


def ask(cfg, node_config, server_round):
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config={})
    return local_update(request(cfg, server_round), context)


def ledger(node_config) -> Ledger:
    return Ledger.open(node_config["ledger-dir"], node_config["client-id"])


def released(replies) -> list:
    return [r for r in replies if r[0] is not None]


def test_replayed_rounds_are_resent_byte_for_byte_never_trained_again(tiny_cfg, tmp_path, site):
    """Attack 1: rounds 1, 3, 1, 3, 1, 3 of one run with cap 2. Two releases exist; every
    replay gets the same bytes; the ledger's two entries describe everything sent."""
    cfg = client_cfg(tiny_cfg, tmp_path, cap=2, budget=8.0)
    replies = [ask(cfg, site, r) for r in (1, 3, 1, 3, 1, 3)]
    assert len(released(replies)) == 6
    for first, again in ((0, 2), (0, 4), (1, 3), (1, 5)):
        a, b = replies[first], replies[again]
        assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
        assert dict(a[1]) == dict(b[1])
    distinct = {tuple(np.concatenate([v.ravel() for v in r[0].values()]).round(8))
                for r in replies}
    assert len(distinct) == 2
    entries = [e for e in ledger(site).entries if e.purpose == "train"]
    assert sorted(e.round for e in entries) == [1, 3]
    # A fresh round beyond the cap is declined, with the cap as the reason.
    update, metrics, client = ask(cfg, site, 2)
    assert update is None and "participation cap" in client["reason"]


def test_a_round_outside_the_plan_is_declined(tiny_cfg, tmp_path, site):
    cfg = client_cfg(tiny_cfg, tmp_path)
    for bad in (0, 5, 10_000, -1):
        update, _, client = ask(cfg, site, bad)
        assert update is None and "outside the run's plan" in client["reason"]
    assert not [e for e in ledger(site).entries if e.purpose == "train"]


def test_the_training_loss_never_leaves_the_client(tiny_cfg, tmp_path, site):
    """Attack 2: every reply field is listed in the protocol; no loss among them."""
    cfg = client_cfg(tiny_cfg, tmp_path)
    update, metrics, client = ask(cfg, site, 1)
    assert not any("loss" in key for key in metrics.keys())
    content = RecordDict({protocol.METRICS_RECORD: metrics, protocol.CLIENT_RECORD: client})
    assert protocol.unlisted_fields(content, protocol.TRAIN_REPLY) == []


def test_the_held_out_statistic_is_noised_and_charged(tiny_cfg, tmp_path, site):
    """Attack 2, deployment: the held-out loss sum and count go back noised, with a ledger
    entry; asked again for the same round, the node resends the same numbers."""
    cfg = client_cfg(tiny_cfg, tmp_path)
    context = Context(run_id=1, node_id=7, node_config=site, state=RecordDict(), run_config={})
    first = evaluate_global(request(cfg, 1, "evaluate"), context)
    again = evaluate_global(request(cfg, 1, "evaluate"), context)
    m1, m2 = dict(first.content[protocol.METRICS_RECORD]), dict(again.content[
        protocol.METRICS_RECORD])
    assert m1 == m2 and set(m1) == {"eval_loss_sum", "num_sequences", "declined"}
    evals = [e for e in ledger(site).entries if e.purpose == "eval"]
    assert len(evals) == 1 and evals[0].event.noise_multiplier > 0
    other = evaluate_global(request(cfg, 2, "evaluate"), context)
    n_true = 8  # the count is noised: two rounds' counts differ though the data is the same
    assert dict(other.content[protocol.METRICS_RECORD])["num_sequences"] != m1["num_sequences"]
    assert n_true  # (the exact count is never a reply value)


def test_the_sample_rate_reveals_no_exact_size(tiny_cfg, tmp_path, site):
    """Attack 3: q comes from the client's one DP size estimate (recorded in its ledger and
    composed into its ε), so B/q is not n; the estimate is reused, not re-drawn."""
    from fedllm.clients.app import this_client

    cfg = client_cfg(tiny_cfg, tmp_path)
    n = len(this_client(cfg, site).train)
    _, metrics, _ = ask(cfg, site, 1)
    sizes = [e for e in ledger(site).entries if e.purpose == "size"]
    assert len(sizes) == 1
    estimate = sizes[0].note["estimate"]
    assert metrics["sample_rate"] == pytest.approx(min(1.0, cfg.train.batch_size / estimate))
    other = client_cfg(tiny_cfg, tmp_path)
    other.run.id = "run-b"
    _, metrics_b, _ = ask(other, site, 1)
    assert metrics_b["sample_rate"] == metrics["sample_rate"]  # the same release, reused
    assert len([e for e in ledger(site).entries if e.purpose == "size"]) == 1
    # The estimate is a Gaussian release: over many draws, B/q is not n.
    from fedllm.privacy.size_estimate import noisy_size

    draws = [noisy_size(n, cfg.privacy.example.size_noise) for _ in range(200)]
    assert np.mean([d == n for d in draws]) < 0.1
    assert 5 < np.std(draws) < 15


def test_renamed_runs_meet_the_default_lifetime_budget(tiny_cfg, tmp_path, site):
    """Attack 4: ten rounds under ten run ids at cap 1. The site has no budget of its own and
    the server asks for none: the installation's default lifetime budget still stops it."""
    spent = []
    for i in range(10):
        cfg = client_cfg(tiny_cfg, tmp_path, cap=1, target=8.0, budget=None)
        cfg.run.id = f"renamed-{i}"
        update, metrics, client = ask(cfg, site, 1)
        spent.append(update is not None)
    book = ledger(site)
    assert book.epsilon(cfg.privacy.delta) <= 10.0
    assert 1 <= sum(spent) < 10
    from fedllm.clients.app import default_site_budget

    assert book.budget == default_site_budget() <= 10


def test_a_site_budget_is_held_by_the_ledger_and_never_raised(tiny_cfg, tmp_path, site):
    cfg = client_cfg(tiny_cfg, tmp_path, budget=100.0)
    ask(cfg, {**site, "budget": 5.0}, 1)
    assert ledger(site).budget == 5.0
    ask(cfg, site, 2)  # the node config forgot its budget: the ledger still holds 5
    assert ledger(site).budget == 5.0


def test_a_cap_or_target_changed_mid_run_is_declined(tiny_cfg, tmp_path, site):
    cfg = client_cfg(tiny_cfg, tmp_path, cap=1, target=4.0)
    assert ask(cfg, site, 1)[0] is not None
    for change in ({"cap": 3}, {"target": 40.0}):
        bent = client_cfg(tiny_cfg, tmp_path, **{"cap": 1, "target": 4.0, **change})
        update, _, client = ask(bent, site, 2)
        assert update is None and "plan changed" in client["reason"]
    assert len([e for e in ledger(site).entries if e.purpose == "train"]) == 1


def test_two_servers_sharing_a_client_share_its_lifetime_budget(tiny_cfg, tmp_path, site):
    a = client_cfg(tiny_cfg, tmp_path, cap=2, target=4.0)
    b = client_cfg(tiny_cfg, tmp_path, cap=2, target=4.0)
    a.run.id, b.run.id = "server-a-run", "server-b-run"
    results = [ask(cfg, {**site, "budget": 4.5}, r) for r in (1, 2) for cfg in (a, b)]
    book = ledger(site)
    assert book.epsilon(a.privacy.delta) <= 4.5
    assert any(u is None and "budget" in c["reason"] for u, _, c in results)
    # What was released is exactly what the ledger holds.
    trained = sum(u is not None for u, _, _ in results)
    assert trained == len([e for e in book.entries if e.purpose == "train"])


def test_the_ledger_describes_every_release_it_made(tiny_cfg, tmp_path, site):
    """Whatever the server asks, ε of the ledger >= ε of the distinct releases it received."""
    cfg = client_cfg(tiny_cfg, tmp_path, cap=2, budget=8.0)
    replies = [ask(cfg, site, r) for r in (2, 1, 2, 4, 1, 3)]
    distinct = {}
    for u, m, c in replies:
        if u is not None:
            key = np.concatenate([v.ravel() for v in u.values()]).tobytes()
            distinct[key] = m
    book = ledger(site)
    assert len(distinct) == len([e for e in book.entries if e.purpose == "train"]) == 2
    assert book.epsilon(cfg.privacy.delta) >= epsilon(
        [e.event for e in book.entries if e.purpose == "train"], cfg.privacy.delta)


def test_a_server_cannot_weaken_the_unit_to_packed_windows(tiny_cfg, tmp_path, site):
    """A site protects one record (or what its node config names), whatever the run says."""
    cfg = client_cfg(tiny_cfg, tmp_path)
    cfg.data.unit = "sequence"
    update, _, client = ask(cfg, site, 1)
    assert update is None and "protects one record" in client["reason"]
    assert not [e for e in ledger(site).entries if e.purpose == "train"]
    update, _, _ = ask(cfg, {**site, "unit": "sequence"}, 1)  # the site's own choice
    assert update is not None
