"""Bytes on the wire, lost replies, and stops: a Grid wrapper that counts the serialized size
of every message, asks again for a reply the network lost, and turns an interrupt or an
unanswered request into ``RunStopped``.

Flower serializes each ``Message`` to protobuf to move it between the ServerApp and the nodes
(in deployment over gRPC, behind the SuperLink). Counting ``message_to_proto(m).ByteSize()``
for every message pushed and every reply pulled gives what a round really costs on the wire:
adapter tensors, the config and metadata that travel with them, the SecAgg+ key and share
exchanges and federated evaluation. (TLS and HTTP/2 framing add a little more on top.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from fedllm import protocol
from fedllm.run_status import RunStopped

log = logging.getLogger("fedllm.server")

# Errors that Flower's transport makes up in a node's place: the node was offline when the
# reply was due (missed heartbeats), or its reply's upload did not complete (a connection reset
# mid-push; the SuperNode then drops the reply). The node may well have trained: these are not
# the ClientApp's answer.
LOST_ON_THE_WAY = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                             ErrorCode.NODE_UNAVAILABLE})
ASK_AGAIN_LIMIT = 3  # re-asks per request within one timeout


def lost_on_the_way(reply: Message) -> bool:
    return reply.has_error() and reply.error.code in LOST_ON_THE_WAY


def may_ask_again(request: Message) -> bool:
    """A plain training or evaluation request: asked again, a client resends the release it
    recorded for that round byte for byte (``release_policy``: one (run, round, purpose) is
    one release), so asking again for a lost reply releases nothing new. A SecAgg+ stage is
    not asked again: its protocol handles a dropped node itself."""
    if request.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
        return False
    content = request.content
    return not (protocol.CONFIG_RECORD in content
                and protocol.STAGE_KEY in content[protocol.CONFIG_RECORD])


def copy_request(request: Message) -> Message:
    return Message(content=request.content, dst_node_id=request.metadata.dst_node_id,
                   message_type=request.metadata.message_type,
                   group_id=request.metadata.group_id)


def message_bytes(message: Message) -> int:
    return message_to_proto(message).ByteSize()


class MeteredGrid(Grid):
    """Delegates to ``grid``; ``take_counts()`` returns (bytes down, bytes up) since the
    last call. *Down*: server to nodes; *up*: nodes to server."""

    def __init__(self, grid: Grid, stop: threading.Event | None = None,
                 pull_interval: float = 0.2) -> None:
        self._grid = grid
        self._down = 0
        self._up = 0
        self._stop = stop
        self.pull_interval = pull_interval

    def stop_requested(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def take_counts(self) -> tuple[int, int]:
        counts = (self._down, self._up)
        self._down = self._up = 0
        return counts

    # ---------------------------------------------------------------- delegation
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._down += sum(message_bytes(m) for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self._up += sum(message_bytes(m) for m in replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Push, then pull until every request is answered, ``timeout`` passes, or a stop is
        requested (``RunStopped`` within one pull interval).

        A reply the network lost (``LOST_ON_THE_WAY``) to a request that may be asked again
        is asked for again, once its node is online, up to ``ASK_AGAIN_LIMIT`` times within
        the timeout; the client resends its recorded copy. Requests that no node answered
        (silence, or only lost replies) are not a round: ``RunStopped`` (the network or the
        nodes are gone; the run stops resumably instead of recording an empty round). Lost
        replies that stay lost are left out: the caller counts those nodes as silent."""
        requests = list(messages)
        if not requests:
            return []
        pending = dict(zip(self.push_messages(requests), range(len(requests))))
        end = None if timeout is None else time.monotonic() + timeout
        answers: dict[int, Message] = {}
        ask_again: set[int] = set()
        asked = [1] * len(requests)
        while pending or ask_again:
            if self._stop is not None and self._stop.is_set():
                raise RunStopped("stop requested (interrupt or SIGTERM)")
            for reply in self.pull_messages(list(pending)):
                i = pending.pop(reply.metadata.reply_to_message_id, None)
                if i is None:
                    continue
                answers[i] = reply
                if (lost_on_the_way(reply) and may_ask_again(requests[i])
                        and asked[i] <= ASK_AGAIN_LIMIT):
                    ask_again.add(i)
            self._ask_again(requests, ask_again, asked, pending)
            if (not pending and not ask_again) or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.pull_interval)
        replies = [r for r in answers.values() if not lost_on_the_way(r)]
        for i, reply in answers.items():
            if lost_on_the_way(reply):  # counted as no reply by the caller
                log.warning("node %d: reply lost on the way: %s",
                            requests[i].metadata.dst_node_id, reply.error.reason)
        if not replies:
            lost = f"; {len(answers)} reply(ies) lost on the way" if answers else ""
            raise RunStopped(f"none of the {len(requests)} node(s) asked replied within "
                             f"{timeout:g} s (federation.client_timeout){lost}")
        return replies

    def _ask_again(self, requests: list[Message], ask_again: set[int], asked: list[int],
                   pending: dict[str, int]) -> None:
        """Push a fresh copy of each request in ``ask_again`` whose node is online."""
        if not ask_again:
            return
        online = set(self.get_node_ids())
        for i in sorted(ask_again):
            node = requests[i].metadata.dst_node_id
            if node not in online:
                continue
            pushed = list(self.push_messages([copy_request(requests[i])]))
            ask_again.discard(i)
            asked[i] += 1
            if pushed:
                pending[pushed[0]] = i
            log.warning("node %d: its reply was lost on the way; asked again (%d of %d)",
                        node, asked[i] - 1, ASK_AGAIN_LIMIT)
