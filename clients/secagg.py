"""Client side of SecAgg+ on Flower's Message API (four train messages per round).

  setup  -> make fresh key pairs and the self-mask seed; reply with the public keys
  share  -> Shamir-share (self-mask seed, mask key) among neighbours, encrypted per holder
  masked -> store the shares addressed to us, train (DP as configured), quantize, mask
  unmask -> reveal self-mask shares of survivors / mask-key shares of dropped clients,
            never both for the same client

Each stage's logic is a function of (state, node id, the server's config) so that it can be
driven without a Flower runtime; the Message handlers below only wrap it.
Secrets live in the node's ``Context.state`` for the duration of one round only.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedllm import protocol
from fedllm.secagg import primitives as sa
from fedllm.config import from_yaml

log = logging.getLogger(__name__)

SHARE_HALF = 66  # bytes of one Shamir share (b share | s_sk share)


def _state(context: Context) -> ConfigRecord:
    if protocol.SECAGG_STATE not in context.state:
        context.state[protocol.SECAGG_STATE] = ConfigRecord()
    return context.state[protocol.SECAGG_STATE]


def _reply(msg: Message, config: dict, **records) -> Message:
    content = RecordDict({protocol.CONFIG_RECORD: ConfigRecord(config), **records})
    return Message(content=content, reply_to=msg)


def _secrets(state: ConfigRecord) -> sa.ClientSecrets:
    return sa.ClientSecrets(c_sk=state["c_sk"], c_pk=state["c_pk"], s_sk=state["s_sk"],
                            s_pk=state["s_pk"], b=state["b"])


def _check_round(state: ConfigRecord, config: Mapping) -> None:
    if state.get("round") != int(config[protocol.ROUND_KEY]) or \
            state.get("run") != str(config["run-id"]):
        raise sa.SecAggError("SecAgg+ message for a round this node did not set up")


# ----------------------------------------------------------------------------- stage logic

def _check_setup(me: int, participants: list[int], neighbours: list[int], edges: list[int],
                 threshold: int) -> None:
    """The round's structure as the server announces it must be one this client can trust:
    it is in the cohort, its neighbours are its neighbours in the announced graph, and the
    threshold is a strict majority of its secret's holders (at least 2)."""
    if me not in participants:
        raise sa.SecAggError("server's participant list does not include me: refusing")
    if sa.graph_from_edges(edges, participants)[me] != sorted(neighbours):
        raise sa.SecAggError("server lists neighbours that differ from mine in the graph it "
                             "announced: refusing")
    shares = len(neighbours) + 1
    if not (2 <= threshold <= shares and 2 * threshold > shares):
        raise sa.SecAggError(f"threshold {threshold} for {shares} shares must be at least 2 "
                             "and above half of them: refusing")


def start_round(state: ConfigRecord, me: int, config: Mapping) -> dict:
    """Setup: check the announced round structure; fresh secrets; the public keys to send."""
    state.clear()
    participants = [int(v) for v in config["participants"]]
    neighbours = [int(v) for v in config["neighbours"]]
    edges = [int(v) for v in config["graph"]]
    threshold = int(config["threshold"])
    _check_setup(me, participants, neighbours, edges, threshold)
    mine = sa.ClientSecrets.generate()
    state.update({"round": int(config[protocol.ROUND_KEY]), "run": str(config["run-id"]),
                  "participants": participants, "threshold": threshold,
                  "neighbours": neighbours, "graph": edges,
                  "c_sk": mine.c_sk, "c_pk": mine.c_pk, "s_sk": mine.s_sk, "s_pk": mine.s_pk,
                  "b": mine.b})
    return {"c_pk": mine.c_pk, "s_pk": mine.s_pk}


def share_secrets(state: ConfigRecord, me: int, config: Mapping) -> dict:
    """Share: encrypted shares of (b, s_sk) for the neighbours the server lists."""
    _check_round(state, config)
    peers = [int(v) for v in config["neighbours"]]
    strangers = sorted(set(peers) - set(state["neighbours"]))
    if strangers:
        raise sa.SecAggError(f"server asks me to share with {strangers[:5]}, not my "
                             "neighbours: refusing")
    if len(set(peers)) < int(state["threshold"]) - 1:
        raise sa.SecAggError(f"only {len(set(peers))} neighbours left to hold my shares, "
                             f"fewer than threshold - 1 = {int(state['threshold']) - 1}: refusing")
    state["peers"] = peers
    c_pks = {v: config[f"c_pk:{v}"] for v in peers}
    for v in peers:
        state[f"s_pk:{v}"] = config[f"s_pk:{v}"]
        state[f"c_pk:{v}"] = c_pks[v]
    encrypted, own = sa.make_shares(me, _secrets(state), c_pks, list(state["participants"]),
                                    int(state["threshold"]), state["run"], state["round"])
    state[f"share:{me}"] = own
    return {f"to:{v}": blob for v, blob in encrypted.items()}


def accept_shares(state: ConfigRecord, me: int, config: Mapping) -> list[int]:
    """Masked, before training: check the masking senders the server lists (my share-stage
    neighbours, at least t - 1 of them), decrypt the shares they sent me, return them.
    A share that fails authentication aborts the round."""
    _check_round(state, config)
    mine = _secrets(state)
    senders = [int(k.split(":")[1]) for k in config if k.startswith("from:")]
    sa.check_mask_senders(senders, list(state["peers"]), int(state["threshold"]))
    for u in senders:
        state[f"share:{u}"] = sa.open_share(me, mine, u, state[f"c_pk:{u}"], config[f"from:{u}"],
                                            state["run"], state["round"])
    return senders


def mask_input(state: ConfigRecord, me: int, q: np.ndarray, senders: list[int]) -> np.ndarray:
    """Masked, after quantizing: y = q + PRG(b) + pairwise masks with the masking senders."""
    y = sa.masked_input(me, _secrets(state), q, {u: state[f"s_pk:{u}"] for u in senders},
                        state["run"], state["round"])
    state["masked_sent"] = 1
    return y


def reveal_shares(state: ConfigRecord, me: int, config: Mapping) -> dict:
    """Unmask: shares of b for survivors, of s_sk for dropped clients, never both; only if
    I am listed as a survivor and the survivors are connected in the announced graph."""
    _check_round(state, config)
    survivors = {int(v) for v in config["survivors"]}
    dropped = {int(v) for v in config["dropped"]}
    if survivors & dropped:
        raise sa.SecAggError("server asked for both masks of the same client: refusing")
    if me not in survivors:
        raise sa.SecAggError("server does not list me as a survivor although I sent my masked "
                             "input: refusing")
    if len(survivors) < int(state["threshold"]):
        raise sa.SecAggError("fewer survivors than the reconstruction threshold: refusing")
    participants = list(state["participants"])
    sa.check_connected(sa.graph_from_edges(list(state["graph"]), participants), survivors)
    out = {}
    for key in list(state):
        if not key.startswith("share:"):
            continue
        sender = int(key.split(":")[1])
        blob = state[key]
        if sender in survivors:
            out[f"b:{sender}"] = blob[:SHARE_HALF]
        elif sender in dropped:
            out[f"s:{sender}"] = blob[SHARE_HALF:]
    state.clear()  # the round's secrets are not needed any more
    return out


# ----------------------------------------------------------------------------- messages

def setup(msg: Message, context: Context, config: ConfigRecord) -> Message:
    return _reply(msg, start_round(_state(context), context.node_id, config))


def share(msg: Message, context: Context, config: ConfigRecord) -> Message:
    return _reply(msg, share_secrets(_state(context), context.node_id, config))


def masked(msg: Message, context: Context, config: ConfigRecord,
           local_update: Callable) -> Message:
    state, me = _state(context), context.node_id
    senders = accept_shares(state, me, config)
    update, metrics, client = local_update(msg, context)
    if update is None:  # declined (budget): drop out of the protocol
        return Message(content=RecordDict({protocol.ARRAYS_RECORD: ArrayRecord(),
                                           protocol.METRICS_RECORD: metrics,
                                           protocol.CLIENT_RECORD: client}), reply_to=msg)
    flat = np.concatenate([np.asarray(update[k], dtype=np.float64).ravel()
                           for k in sorted(update)])
    dtype = np.dtype(str(config["secagg-dtype"]))
    rng = np.random.default_rng()
    q = sa.quantize(flat, float(config["secagg-range"]), int(config["secagg-bits"]), dtype, rng)
    y = mask_input(state, me, q, senders)
    if str(client["client_id"]) in _unmask_drop_clients(str(config[protocol.CONFIG_KEY])):
        state["drop_at_unmask"] = 1
    arrays = ArrayRecord({protocol.MASKED_KEY: Array(y)})
    return Message(content=RecordDict({protocol.ARRAYS_RECORD: arrays,
                                       protocol.METRICS_RECORD: metrics,
                                       protocol.CLIENT_RECORD: client}), reply_to=msg)


def unmask(msg: Message, context: Context, config: ConfigRecord) -> Message:
    state = _state(context)
    _check_round(state, config)
    if state.get("drop_at_unmask"):
        state.clear()
        raise sa.SecAggError("injected fault: this client vanishes before revealing its shares")
    return _reply(msg, reveal_shares(state, context.node_id, config))


@functools.lru_cache(maxsize=4)
def _unmask_drop_clients(cfg_text: str) -> frozenset[str]:
    """``faults.unmask_drop_clients`` (test-only): who vanishes after sending its masked input."""
    return frozenset(from_yaml(cfg_text).faults.unmask_drop_clients)


def secagg_stage(stage: str, msg: Message, context: Context, local_update: Callable) -> Message:
    config = msg.content[protocol.CONFIG_RECORD]
    if stage == "setup":
        return setup(msg, context, config)
    if stage == "share":
        return share(msg, context, config)
    if stage == "masked":
        return masked(msg, context, config, local_update)
    if stage == "unmask":
        return unmask(msg, context, config)
    raise sa.SecAggError(f"unknown SecAgg+ stage {stage!r}")
