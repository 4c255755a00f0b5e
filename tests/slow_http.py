"""A loopback HTTP server that serves one image slowly, so that a job stays busy for a known time.

``SlowImageServer(body, seconds)`` answers every GET with ``body``, dripping its first bytes over
``seconds`` seconds (one byte every 0.2 s, then the rest), the way a slow image host holds a worker.
``hits`` counts the requests that reached it; ``url`` is the image's address.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SlowImageServer:
    """Serves ``body`` as ``image/png`` on 127.0.0.1, taking ``seconds`` seconds per answer."""

    def __init__(self, body: bytes, seconds: float) -> None:
        self.body, self.seconds = body, seconds
        self.hits = 0
        self.started = threading.Event()  # set when the first request arrives
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.hits += 1
                server.started.set()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                deadline = time.monotonic() + server.seconds
                sent = 0
                try:
                    while time.monotonic() < deadline and sent < len(server.body) - 1:
                        self.wfile.write(server.body[sent : sent + 1])
                        self.wfile.flush()
                        sent += 1
                        time.sleep(0.2)
                    self.wfile.write(server.body[sent:])
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}/image.png"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> SlowImageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
