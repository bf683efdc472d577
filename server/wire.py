"""Bytes on the wire, lost replies, and stops: a Grid wrapper that counts the serialized size
of every message, asks again for a reply the network lost, and turns an interrupt, an
unanswered request or a SuperLink that ended (or lost) the ServerApp's task into
``RunStopped``.

Flower serializes each ``Message`` to protobuf to move it between the ServerApp and the nodes
(in deployment over gRPC, behind the SuperLink). Counting ``message_to_proto(m).ByteSize()``
for every message pushed and every reply pulled gives what a round really costs on the wire:
adapter tensors, the config and metadata that travel with them, the SecAgg+ key and share
exchanges and federated evaluation. (TLS and HTTP/2 framing add a little more on top.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator

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
MIN_SILENCE = 30.0   # seconds a node may stay silent before it is asked again, at least


@contextlib.contextmanager
def superlink_call() -> Iterator[None]:
    """A call to the SuperLink's Runtime API that fails for good (Flower's grid has already
    retried transient errors) stops the run resumably: the last checkpoint stands, and
    ``stopped.json`` says why instead of a run that just ends without a result.

    401/403: the SuperLink no longer accepts this ServerApp's task token: it ended the run,
    because it missed the ServerApp's heartbeat for 60 s (seen on a loaded 2-core machine)
    or because of `flwr stop`."""
    import httpx
    from flwr.supercore.run import RunNotRunningException

    try:
        yield
    except RunNotRunningException as exc:  # 403: the SuperLink stopped the run
        raise RunStopped("the SuperLink says the run is no longer running (`flwr stop`, or a "
                         "ServerApp heartbeat it missed for 60 s)") from exc
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        if code in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
            raise RunStopped(
                f"the SuperLink ended this run's ServerApp task (HTTP {code}): Flower does so "
                "when it misses the ServerApp's heartbeat for 60 s, or on `flwr stop`") from exc
        raise RunStopped(f"the SuperLink failed a request (HTTP {code})") from exc
    except httpx.TransportError as exc:
        raise RunStopped(f"the SuperLink is unreachable ({type(exc).__name__}: {exc})") from exc


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
                 pull_interval: float = 0.2, asks_again: bool | None = None) -> None:
        self._grid = grid
        # Flower's in-memory grid (simulation) loses no reply: nothing to ask again there.
        self.asks_again = (not _in_memory(grid)) if asks_again is None else asks_again
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
        with superlink_call():
            return list(self._grid.get_node_ids())

    def get_nodes(self):
        with superlink_call():
            return list(self._grid.get_nodes())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._down += sum(message_bytes(m) for m in messages)
        with superlink_call():
            return list(self._grid.push_messages(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with superlink_call():
            replies = list(self._grid.pull_messages(message_ids))
        self._up += sum(message_bytes(m) for m in replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Push, then pull until every request is answered, ``timeout`` passes, or a stop is
        requested (``RunStopped`` within one pull interval).

        A request that may be asked again (``may_ask_again``) is asked again, up to
        ``ASK_AGAIN_LIMIT`` times within the timeout, when its reply was lost on the way
        (``LOST_ON_THE_WAY``; once the node is online again) or when its node stays silent for
        ``silence_before_asking_again(timeout)``: a SuperNode whose upload fails drops its
        reply without a word. The client answers a request it already answered with the copy
        it recorded (a duplicate that arrives while it still trains waits for that copy), so
        asking again releases nothing new; the first answer counts.

        Training requests that no node answered (silence, or only lost replies) are not a
        round: ``RunStopped`` (the network or the nodes are gone; the run stops resumably
        instead of recording an empty round). An evaluation nobody answered returns no
        replies. Lost replies that stay lost are left out: the caller counts those nodes as
        silent."""
        requests = list(messages)
        if not requests:
            return []
        asks = _Asks(requests, timeout, self.asks_again)
        asks.pushed(self.push_messages(requests), range(len(requests)))
        while asks.open():
            if self._stop is not None and self._stop.is_set():
                raise RunStopped("stop requested (interrupt or SIGTERM)")
            for reply in self.pull_messages(asks.pending_ids()):
                asks.answer(reply)
            self._ask_again(asks)
            if not asks.open() or asks.expired():
                break
            time.sleep(self.pull_interval)
        replies = asks.replies()
        if not replies:
            lost = f"; {asks.lost()} reply(ies) lost on the way" if asks.lost() else ""
            why = (f"none of the {len(requests)} node(s) asked replied within {timeout:g} s "
                   f"(federation.client_timeout){lost}")
            if any(m.metadata.message_type != MessageType.EVALUATE for m in requests):
                raise RunStopped(why)
            # An evaluation nobody answered leaves that round's held-out loss unknown, not
            # the run incomplete; a network that is really gone stops the next training round.
            log.warning("evaluation: %s", why)
        return replies

    def _ask_again(self, asks: "_Asks") -> None:
        """Push a fresh copy of each request due to be asked again whose node is online."""
        due = asks.due()
        if not due:
            return
        online = set(self.get_node_ids())
        for i, why in due:
            node = asks.requests[i].metadata.dst_node_id
            if node in online:
                asks.pushed(self.push_messages([copy_request(asks.requests[i])]), [i])
                log.warning("node %d: %s; asked again (%d of %d)", node, why,
                            asks.asked[i] - 1, ASK_AGAIN_LIMIT)


def _in_memory(grid: Grid) -> bool:
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def silence_before_asking_again(timeout: float | None) -> float | None:
    """How long a node may stay silent before it is asked again: the timeout split into
    ASK_AGAIN_LIMIT + 1 turns, and never under MIN_SILENCE (a round that trains for long is
    not silent, only slow; asking it again early costs it a resend, nothing more)."""
    return None if timeout is None else max(MIN_SILENCE, timeout / (ASK_AGAIN_LIMIT + 1))


class _Asks:
    """The state of one send_and_receive: each request, the message ids that ask it, its
    answer so far."""

    def __init__(self, requests: list[Message], timeout: float | None,
                 asks_again: bool = True) -> None:
        self.requests = requests
        now = time.monotonic()
        self.end = None if timeout is None else now + timeout
        self.asks_again = asks_again
        self.silence = silence_before_asking_again(timeout) if asks_again else None
        self.pending: dict[str, int] = {}       # message id -> request index
        self.answers: dict[int, Message] = {}
        self.asked = [0] * len(requests)
        self.last_asked = [now] * len(requests)
        self.lost_again: set[int] = set()       # lost replies waiting for their node

    def pushed(self, message_ids: Iterable[str], indices: Iterable[int]) -> None:
        now = time.monotonic()
        for message_id, i in zip(message_ids, indices):
            if message_id is not None:  # Flower's grid: None for a message it could not push
                self.pending[message_id] = i
        for i in indices:
            self.asked[i] += 1
            self.last_asked[i] = now
            self.lost_again.discard(i)

    def answered(self, i: int) -> bool:
        return i in self.answers and not lost_on_the_way(self.answers[i])

    def answer(self, reply: Message) -> None:
        i = self.pending.pop(reply.metadata.reply_to_message_id, None)
        if i is None or self.answered(i):
            return
        self.answers[i] = reply
        if not lost_on_the_way(reply):
            self.pending = {m: j for m, j in self.pending.items() if j != i}
        elif self._may_ask_again(i) and i not in self.pending.values():
            self.lost_again.add(i)

    def _may_ask_again(self, i: int) -> bool:
        return (self.asks_again and may_ask_again(self.requests[i])
                and self.asked[i] <= ASK_AGAIN_LIMIT)

    def due(self) -> list[tuple[int, str]]:
        """(request, why) for each request to ask again now."""
        now = time.monotonic()
        due = [(i, "its reply was lost on the way") for i in sorted(self.lost_again)]
        if self.silence is not None:
            waiting = set(self.pending.values()) - {i for i, _ in due}
            due += [(i, f"silent for {self.silence:.0f} s") for i in sorted(waiting)
                    if not self.answered(i) and self._may_ask_again(i)
                    and now - self.last_asked[i] >= self.silence]
        return due

    def pending_ids(self) -> list[str]:
        return list(self.pending)

    def open(self) -> bool:
        return bool(self.pending or self.lost_again)

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def replies(self) -> list[Message]:
        for i, reply in self.answers.items():
            if lost_on_the_way(reply):  # counted as no reply by the caller
                log.warning("node %d: reply lost on the way: %s",
                            self.requests[i].metadata.dst_node_id, reply.error.reason)
        return [r for r in self.answers.values() if not lost_on_the_way(r)]

    def lost(self) -> int:
        return sum(lost_on_the_way(r) for r in self.answers.values())
