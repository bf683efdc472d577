"""Bytes on the wire: a Grid wrapper that counts the serialized size of every message.

Flower serializes each ``Message`` to protobuf to move it between the ServerApp and the nodes
(in deployment over gRPC, behind the SuperLink). Counting ``message_to_proto(m).ByteSize()``
for every message pushed and every reply pulled gives what a round really costs on the wire:
adapter tensors, the config and metadata that travel with them, the SecAgg+ key and share
exchanges and federated evaluation. (TLS and HTTP/2 framing add a little more on top.)
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid


def message_bytes(message: Message) -> int:
    return message_to_proto(message).ByteSize()


class MeteredGrid(Grid):
    """Delegates to ``grid``; ``take_counts()`` returns (bytes down, bytes up) since the
    last call. *Down*: server to nodes; *up*: nodes to server."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._down = 0
        self._up = 0

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
        messages = list(messages)
        self._down += sum(message_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._up += sum(message_bytes(m) for m in replies)
        return replies
