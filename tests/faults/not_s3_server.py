"""An HTTP server on 127.0.0.1 that answers every request as an ingress or load balancer does
while the S3 server behind it is gone: a status and a plain-text page, no S3 error document."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class NotS3Server:
    """Answers `status` with `body` (text/plain) to every request; `uri` is its endpoint."""

    def __init__(self, status: int = 404, body: bytes = b"404 page not found\n") -> None:
        answer = (status, body)
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                server.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(answer[0])
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(answer[1])))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer[1])

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
