"""A TCP proxy in front of a real server that faults the connections through it, as the network
and the proxies in front of managed MySQL do:

- `idle_s`: connections idle for longer are ended, both sides at once (an AWS NLB after 350 s,
  RDS Proxy after its client idle timeout). Bytes in either direction count as activity.
- `black_hole()`: from then on nothing is forwarded and nothing is closed (a network cut without
  a reset, a proxy whose backend stalled): a client waiting for an answer waits forever.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress


class TcpFaultProxy:
    """Listens on 127.0.0.1 (a free port: `port`) and forwards to (`host`, `upstream_port`)."""

    def __init__(self, host: str, upstream_port: int, *, idle_s: float | None = None) -> None:
        self.upstream = (host, upstream_port)
        self.idle_s = idle_s
        self.cut = 0  # connections ended for idleness
        self.swallowed = 0  # chunks of bytes dropped by the black hole
        self._black_hole = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def black_hole(self) -> None:
        self._black_hole.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            last = [time.monotonic()]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._forward, args=(source, target, last), daemon=True
                ).start()
            if self.idle_s is not None:
                threading.Thread(
                    target=self._watch, args=(client, upstream, last), daemon=True
                ).start()

    def _forward(self, source: socket.socket, target: socket.socket, last: list[float]) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if self._black_hole.is_set():
                    self.swallowed += 1
                    continue
                last[0] = time.monotonic()
                target.sendall(data)
        _close(target)

    def _watch(self, client: socket.socket, upstream: socket.socket, last: list[float]) -> None:
        while client.fileno() != -1 and upstream.fileno() != -1:
            if time.monotonic() - last[0] > self.idle_s:
                self.cut += 1
                _close(client)
                _close(upstream)
                return
            time.sleep(self.idle_s / 10)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
