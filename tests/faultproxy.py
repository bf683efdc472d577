"""A loopback TCP proxy that injects network faults between SuperNodes and the SuperLink.

TLS passes through it as opaque bytes (it never terminates TLS). Faults, changeable while it
runs: ``latency`` (seconds added before forwarding each chunk), ``reset_rate`` (probability that
a chunk resets its connection, with an RST), and ``partition()`` / ``heal()``: open
connections become a black hole (nothing is forwarded, as when packets are dropped) and new
ones are refused at the TCP level (the listener is closed, as for an unreachable host);
healing resets the black-holed connections, so the peers reconnect, and listens again on the
same port.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, upstream_port: int, *, seed: int = 0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.latency = 0.0
        self.reset_rate = 0.0
        self.partitioned = False
        self.resets = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = False
        self.port = 0
        self._listen()

    # ------------------------------------------------------------------ faults
    def partition(self) -> None:
        self.partitioned = True
        self._stop_listening()  # new connections: refused

    def heal(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:  # starved connections are reset: the peers reconnect
            _reset(sock)
        if self.partitioned and not self._closed:
            self._listen()
        self.partitioned = False

    def close(self) -> None:
        self._closed = True
        self._stop_listening()
        self.heal()

    def _stop_listening(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._server.close()

    # ------------------------------------------------------------------ plumbing
    def _listen(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        self.port = server.getsockname()[1]
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                _close(dst)
                return
            if self.partitioned:
                continue  # a black hole: the bytes never arrive
            if self.latency:
                time.sleep(self.latency)
            if self.reset_rate and self._rng.random() < self.reset_rate:
                self.resets += 1
                _reset(src)
                _reset(dst)
                return
            try:
                dst.sendall(data)
            except OSError:
                _close(src)
                return


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a broken link or a middlebox would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
