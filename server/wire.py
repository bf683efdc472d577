"""Bytes on the wire, and stops: a Grid wrapper that counts the serialized size of every
message and turns an interrupt or an unanswered request into ``RunStopped``.

Flower serializes each ``Message`` to protobuf to move it between the ServerApp and the nodes
(in deployment over gRPC, behind the SuperLink). Counting ``message_to_proto(m).ByteSize()``
for every message pushed and every reply pulled gives what a round really costs on the wire:
adapter tensors, the config and metadata that travel with them, the SecAgg+ key and share
exchanges and federated evaluation. (TLS and HTTP/2 framing add a little more on top.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from fedllm.run_status import RunStopped


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
        """Push, then pull until every reply is in, ``timeout`` passes, or a stop is
        requested (``RunStopped`` within one pull interval). Messages to nodes that all stay
        silent until the timeout are not a round: ``RunStopped`` (the network or the nodes
        are gone; the run stops resumably instead of recording an empty round)."""
        messages = list(messages)
        if not messages:
            return []
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            if self._stop is not None and self._stop.is_set():
                raise RunStopped("stop requested (interrupt or SIGTERM)")
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.pull_interval)
        if not replies:
            raise RunStopped(f"none of the {len(messages)} node(s) asked replied within "
                             f"{timeout:g} s (federation.client_timeout)")
        return replies
