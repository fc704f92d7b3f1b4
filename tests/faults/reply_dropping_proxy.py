"""A TCP proxy in front of a real HTTP server that lets one request through and drops its reply:
the server did the work, the client sees its connection closed and cannot tell whether it did.
What a load balancer's idle timeout or a network cut between the two does to a slow POST."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class ReplyDroppingProxy:
    """Listens on 127.0.0.1 (a free port: `uri`) and forwards to `upstream` ("host:port").

    The first `drops` requests whose request line starts with `request_prefix` (bytes, such as
    b"POST /api/2.0/mlflow/model-versions/create") reach the server; once the server starts to
    answer, the client's connection is closed instead. `dropped` counts them.
    """

    def __init__(self, upstream: str, request_prefix: bytes, *, drops: int = 1) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.request_prefix = request_prefix
        self.drops_left = drops
        self.dropped = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            drop_next_reply = threading.Event()
            threading.Thread(
                target=self._requests, args=(client, upstream, drop_next_reply), daemon=True
            ).start()
            threading.Thread(
                target=self._replies, args=(upstream, client, drop_next_reply), daemon=True
            ).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, drop: threading.Event):
        """Client to server, marking the connection when a request to drop goes through."""
        with suppress(OSError):
            while data := client.recv(65536):
                if data.startswith(self.request_prefix):
                    with self._lock:
                        if self.drops_left > 0:
                            self.drops_left -= 1
                            drop.set()
                upstream.sendall(data)
        _close(upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket, drop: threading.Event):
        """Server to client; the reply to a marked request closes both sides unanswered."""
        with suppress(OSError):
            while data := upstream.recv(65536):
                if drop.is_set():
                    with self._lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        _close(client)
        _close(upstream)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@contextmanager
def reply_dropping_proxy(
    upstream: str, request_prefix: bytes, *, drops: int = 1
) -> Iterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy(upstream, request_prefix, drops=drops)
    try:
        yield proxy
    finally:
        proxy.close()
