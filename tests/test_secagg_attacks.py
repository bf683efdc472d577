"""SecAgg+ attacks by the server, run through the real client stage functions.

A test "server" drives ``fedllm.clients.secagg`` (the same functions the ClientApp's Message
handlers call) with the configs it chooses, honest or not, and then tries to learn more than
the survivors' sum. Each test is an attack that worked before the fix (issue 17, findings 2-3).
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedllm.clients import secagg as cs
from fedllm import protocol
from fedllm.secagg import primitives as sa

BITS, RUN, ROUND = 16, "run", 1


def flat_edges(graph):
    return [x for u in sorted(graph) for v in graph[u] if u < v for x in (u, v)]


class Cohort:
    """Clients with real secrets and states; the test plays the server."""

    def __init__(self, n, graph_shares, threshold):
        self.ids = [10 + 7 * i for i in range(n)]
        self.graph = sa.neighbours(self.ids, graph_shares)
        self.threshold = threshold
        self.dtype = sa.modulus_dtype(BITS, n)
        rng = np.random.default_rng(0)
        self.q = {u: sa.quantize(rng.uniform(-0.5, 0.5, 300), 1.0, BITS, self.dtype, rng)
                  for u in self.ids}
        self.states = {u: ConfigRecord() for u in self.ids}
        self.keys, self.inbox = {}, {u: {} for u in self.ids}

    def cfg(self, **extra):
        return {protocol.ROUND_KEY: ROUND, "run-id": RUN, **extra}

    def setup_and_share(self):
        for u in self.ids:
            self.keys[u] = cs.start_round(self.states[u], u, self.cfg(
                participants=self.ids, threshold=self.threshold, neighbours=self.graph[u],
                graph=flat_edges(self.graph)))
        for u in self.ids:
            cfg = self.cfg(neighbours=self.graph[u])
            for v in self.graph[u]:
                cfg[f"c_pk:{v}"], cfg[f"s_pk:{v}"] = self.keys[v]["c_pk"], self.keys[v]["s_pk"]
            for key, blob in cs.share_secrets(self.states[u], u, cfg).items():
                self.inbox[int(key.split(":")[1])][u] = blob

    def masked(self, u, senders):
        """u's masked input when the server lists ``senders`` as its masking senders."""
        cfg = self.cfg(**{f"from:{v}": self.inbox[u][v] for v in senders})
        listed = cs.accept_shares(self.states[u], u, cfg)
        return cs.mask_input(self.states[u], u, self.q[u], listed)

    def reveal(self, holders, survivors, dropped):
        """What ``holders`` reveal when told (survivors, dropped): shares keyed by point."""
        b, s = {}, {}
        for h in holders:
            out = cs.reveal_shares(self.states[h], h, self.cfg(survivors=survivors,
                                                               dropped=dropped))
            x = sa.share_point(h, self.ids)
            for key, share in out.items():
                kind, sender = key.split(":")
                (b if kind == "b" else s).setdefault(int(sender), {})[x] = share
        return b, s

    def secret(self, shares):
        return sa.shamir_combine(dict(list(shares.items())[:self.threshold]))


def test_split_ring_partial_sum_is_refused():
    """Finding 2: on the old ring (num_shares=3), two non-adjacent dropouts split the survivors;
    a server that follows the protocol could unmask one part and learn its partial sum."""
    c = Cohort(6, graph_shares=3, threshold=2)
    c.setup_and_share()
    d1 = c.ids[0]
    d2 = next(v for v in c.ids if v != d1 and  # opposite d1 on the ring: two parts of 2
              [len(p) for p in sa.components(c.graph, set(c.ids) - {d1, v})] == [2, 2])
    survivors = [u for u in c.ids if u not in (d1, d2)]
    ys = {u: c.masked(u, c.graph[u]) for u in survivors}
    part = sa.components(c.graph, survivors)[0]
    assert len(part) < len(survivors)  # the ring really is split
    with pytest.raises(sa.SecAggError, match="not connected"):
        b, s = c.reveal(survivors, survivors, [d1, d2])
        s_pk = {u: c.keys[u]["s_pk"] for u in c.ids}
        total = sa.unmask_sum({u: ys[u] for u in part}, c.graph, s_pk,
                              {u: b[u] for u in part}, s, c.threshold, RUN, ROUND)
        assert np.array_equal(total, sum(c.q[u] for u in part))  # the partial sum leaks


@pytest.mark.parametrize("listed", [0, 1])
def test_empty_or_short_sender_list_is_refused(listed):
    """Finding 3: the server lists no (or one) masking sender to a victim, declares the listed
    one dropped, and removes every mask of the victim's input with shares it may ask for."""
    c = Cohort(5, graph_shares=5, threshold=3)
    c.setup_and_share()
    victim, *others = c.ids
    senders = others[:listed]
    for u in others:  # everyone else follows the protocol
        c.masked(u, c.graph[u])
    with pytest.raises(sa.SecAggError, match="masking sender"):
        y = c.masked(victim, senders)
        survivors = [u for u in c.ids if u not in senders]
        b, s = c.reveal(survivors, survivors, senders)
        x = y - sa.prg(c.secret(b[victim]), len(y), c.dtype)
        for v in senders:
            s_sk = c.secret(s[v])
            seed = sa.agree(s_sk, c.keys[victim]["s_pk"], sa.pair_label(RUN, ROUND))
            x = x - sa.pairwise_mask(victim, v, seed, len(y), c.dtype)
        assert np.array_equal(x, c.q[victim])  # the victim's update, alone


# ----------------------------------------------------------------------------- drill

def announce(c, u, **changes):
    cfg = c.cfg(participants=c.ids, threshold=c.threshold, neighbours=c.graph[u],
                graph=flat_edges(c.graph))
    cfg.update(changes)
    return cfg


SETUP_LIES = {
    "neighbours outside the announced graph": lambda c, u: announce(c, u, neighbours=c.ids[1:2]),
    "threshold 1": lambda c, u: announce(c, u, threshold=1),
    "threshold at half the shares": lambda c, u: announce(c, u, threshold=2),  # 5 shares
    "participants without me": lambda c, u: announce(c, u, participants=c.ids[1:]),
}


@pytest.mark.parametrize("lie", sorted(SETUP_LIES))
def test_malicious_server_drill_setup_lies_are_refused(lie):
    c = Cohort(5, graph_shares=5, threshold=3)
    victim = c.ids[0]
    with pytest.raises(sa.SecAggError, match="refusing"):
        cs.start_round(c.states[victim], victim, SETUP_LIES[lie](c, victim))


def test_malicious_server_drill_later_lies_are_refused():
    """One malicious-server drill after an honest setup: every deviation a client can see is
    refused, each with its reason."""
    c = Cohort(5, graph_shares=3, threshold=2)  # 5 clients on a ring: 2 neighbours each
    c.setup_and_share()
    victim = c.ids[0]
    stranger = next(v for v in c.ids if v != victim and v not in c.graph[victim])
    with pytest.raises(sa.SecAggError, match="not my neighbours"):
        cs.share_secrets(c.states[victim], victim, c.cfg(neighbours=[stranger]))
    with pytest.raises(sa.SecAggError, match="not my share-stage neighbours"):
        cs.accept_shares(c.states[victim], victim, c.cfg(**{f"from:{stranger}": b"x" * 60}))
    c.masked(victim, c.graph[victim])
    others = [u for u in c.ids if u != victim]
    with pytest.raises(sa.SecAggError, match="not list me as a survivor"):
        c.reveal([victim], others, [victim])
    with pytest.raises(sa.SecAggError, match="both masks"):
        c.reveal([victim], c.ids, [victim])


# ----------------------------------------------------------------------------- server

def masked_reply(node, y):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    sent = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
    return Message(content=RecordDict({
        protocol.ARRAYS_RECORD: ArrayRecord({protocol.MASKED_KEY: Array(y)}),
        protocol.METRICS_RECORD: MetricRecord({"train_loss": 1.0, "steps": 1, "sample_rate": 0.1,
                                               "noise_multiplier": 0.0, "dp": 0, "declined": 0}),
        protocol.CLIENT_RECORD: ConfigRecord({"client_id": f"c{node}"})}), reply_to=sent)


def server_after_masking(ids, graph):
    """SecAggPlus as it stands after the masked-input stage of round 1."""
    from collections import OrderedDict

    from fedllm.server.secagg import SecAggPlus
    from fedllm.server.strategy import AdapterFedAvg, RoundInfo, cohort_sampler

    core = AdapterFedAvg(cfg_text="", sampler=cohort_sampler(len(ids), "fixed", user_level=False,
                                                             seed=0))
    s = SecAggPlus(core, num_shares=3, threshold="auto", bits=BITS, clip_range=1.0, timeout=1.0)
    core.global_arrays = OrderedDict(w=np.zeros(8, np.float32))
    core.rounds.append(RoundInfo(round=1, sampled=len(ids)))
    core.expected_nodes = set(ids)
    s._round_state = {"graph": graph, "s_pk": {}, "participants": ids, "threshold": 2,
                      "dtype": np.dtype(np.uint32)}
    s._grid = None  # no grid: asking any client for its shares would fail here
    return s


@pytest.mark.parametrize("split", [True, False])
def test_server_refuses_to_unmask_a_split_survivor_graph(split):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    ids = [1, 2, 3, 4, 5, 6]
    ring = sa.neighbours(ids, 3)
    d1 = ids[0]
    d2 = next(v for v in ids if v != d1 and (v not in ring[d1]) == split)
    survivors = [u for u in ids if u not in (d1, d2)]
    s = server_after_masking(ids, ring)
    replies = [masked_reply(u, np.zeros(8, np.uint32)) for u in survivors]
    if not split:  # control: connected survivors, so the server goes on to ask for shares
        with pytest.raises(AttributeError, match="send_and_receive"):
            s.aggregate_train(1, replies)
        return
    assert s.aggregate_train(1, replies) == (None, None)  # adapter unchanged, no shares asked
    assert "not connected" in s.core.rounds[-1].discarded
