"""A local HTTP mirror for download tests: good files and every way to fail.

The server listens on 127.0.0.1 on a free port, in a thread, and answers GET
requests from a table of routes::

    with MirrorServer() as server:
        server.serve_folder("/good/", shared_dir / "data" / "mnist")
        server.fail("/gone/file.gz", 404)
        server.hang("/slow/file.gz")
        url = server.url("/good/t10k-labels-idx1-ubyte.gz")

Every request is recorded in ``server.requests`` as ``(path, headers)``, the
header names in lower case. On
close, hanging handlers are released and every handler thread is joined, so
nothing outlives the test. Tests must pass these URLs explicitly; nothing here
reaches another host.
"""

import http.server
import threading
from pathlib import Path

# How long a handler waits before giving up on its own, should close() not run.
HANG_LIMIT_S = 10.0


class MirrorServer:
    """A threaded HTTP server on 127.0.0.1 with scripted routes."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        self.released = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}
        )

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
        self._thread.join()

    def url(self, path):
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def paths_requested(self):
        return [path for path, _ in self.requests]

    # -- routes --------------------------------------------------------------

    def serve(self, path, body, content_type="application/octet-stream"):
        """Answer 200 with ``body`` (bytes, or a Path read at request time)."""

        def respond(handler):
            data = body.read_bytes() if isinstance(body, Path) else body
            _send(handler, 200, data, content_type)

        self.routes[path] = respond

    def serve_folder(self, prefix, folder):
        """Serve each file in ``folder`` under ``prefix`` + its name."""
        for file in Path(folder).iterdir():
            if file.is_file():
                self.serve(prefix + file.name, file)

    def fail(self, path, status):
        """Answer with an HTTP error status and a short text body."""
        self.routes[path] = lambda handler: _send(
            handler, status, b"failed on purpose\n", "text/plain"
        )

    def hang(self, path):
        """Accept the request and send nothing until the server closes."""

        def respond(handler):
            self.released.wait(HANG_LIMIT_S)
            handler.close_connection = True

        self.routes[path] = respond

    def truncate(self, path, body, declared_length):
        """Promise ``declared_length`` bytes, send ``body``, close the connection."""

        def respond(handler):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(declared_length))
            handler.end_headers()
            handler.wfile.write(body)
            handler.wfile.flush()
            handler.close_connection = True

        self.routes[path] = respond


class _Server(http.server.ThreadingHTTPServer):
    # Handler threads are joined on close rather than left running as daemons.
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request, client_address):
        # A client that timed out and hung up is expected here; stay quiet.
        pass


def _handler_for(server):
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = HANG_LIMIT_S

        def do_GET(self):
            headers = {key.lower(): value for key, value in self.headers.items()}
            server.requests.append((self.path, headers))
            respond = server.routes.get(self.path)
            if respond is None:
                _send(self, 404, b"no such route\n", "text/plain")
            else:
                respond(self)

        def log_message(self, format, *args):
            pass

    return Handler


def _send(handler, status, body, content_type):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def without_proxies(monkeypatch):
    """Keep urllib from sending local requests through a configured proxy."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    # A non-empty proxy environment also stops urllib asking the OS settings.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
