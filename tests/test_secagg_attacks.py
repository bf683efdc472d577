"""SecAgg+ attacks by the server, run through the real client stage functions.

A test "server" drives ``clients.secagg_stages`` (the same functions the ClientApp's Message
handlers call) with the configs it chooses, honest or not, and then tries to learn more than
the survivors' sum. Each test is an attack that worked before the fix (issue 17, findings 2-3).
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from clients import secagg_stages as cs
from fedllm import protocol
from fedllm import secagg as sa

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


def components(graph, nodes):
    left, parts = set(nodes), []
    while left:
        stack = [left.pop()]
        part = set(stack)
        while stack:
            for v in graph[stack.pop()]:
                if v in left:
                    left.discard(v)
                    part.add(v)
                    stack.append(v)
        parts.append(sorted(part))
    return parts


def test_split_ring_partial_sum_is_refused():
    """Finding 2: on the old ring (num_shares=3), two non-adjacent dropouts split the survivors;
    a server that follows the protocol could unmask one part and learn its partial sum."""
    c = Cohort(6, graph_shares=3, threshold=2)
    c.setup_and_share()
    d1 = c.ids[0]
    d2 = next(v for v in c.ids if v != d1 and  # opposite d1 on the ring: two parts of 2
              [len(p) for p in components(c.graph, set(c.ids) - {d1, v})] == [2, 2])
    survivors = [u for u in c.ids if u not in (d1, d2)]
    ys = {u: c.masked(u, c.graph[u]) for u in survivors}
    part = components(c.graph, survivors)[0]
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
