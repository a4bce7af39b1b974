"""Local folders served read-only over HTTP on 127.0.0.1, so a viewer in a browser (neuroglancer)
reads local zarr stores: files only (no listings), GET and HEAD, CORS headers on every reply.

Each folder is mounted under a URL prefix (``data/jrc_x.zarr``); a request maps onto a file
inside one mounted folder or gets 404, and a path with ``..`` never leaves the folder.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8471  # fixed, so a state written with --json points at a later server too
JSON_FILES = (".zattrs", ".zgroup", ".zarray", ".zmetadata", "zarr.json")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "*",
    # Chrome asks before a public page (the hosted neuroglancer) reads a loopback address.
    "Access-Control-Allow-Private-Network": "true",
}


class FolderServer:
    """Mounted local folders and the HTTP server that serves them (started by `start`)."""

    def __init__(self, port: int = DEFAULT_PORT) -> None:
        self.port = port
        self.prefixes: dict[str, str] = {}  # URL prefix -> absolute local folder
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def mount(self, folder: str, name: str) -> str:
        """Serve `folder` under the URL prefix `name` (a second folder of that name gets
        ``name2``, then ``name3``, ...); returns the prefix."""
        folder = os.path.abspath(folder)
        head, _, tail = name.strip("/").partition("/")
        prefix, number = name.strip("/"), 1
        while self.prefixes.get(prefix, folder) != folder:
            number += 1
            prefix = f"{head}{number}/{tail}" if tail else f"{head}{number}"
        self.prefixes[prefix] = folder
        return prefix

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``, the port bound once started."""
        if self.port == 0:
            raise ValueError("port 0 (any free port) is known only once the server has started")
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, path: str) -> str:
        """The URL of the local `path`, which lies inside a mounted folder."""
        path = os.path.abspath(path)
        for prefix, folder in self.prefixes.items():
            if path == folder or path.startswith(folder + os.sep):
                inside = os.path.relpath(path, folder).replace(os.sep, "/")
                tail = "" if inside == "." else "/" + urllib.parse.quote(inside)
                return f"{self.origin}/{urllib.parse.quote(prefix)}{tail}"
        raise ValueError(f"{path} lies in no folder served: {', '.join(self.prefixes.values())}")

    def local_path(self, url_path: str) -> str | None:
        """The file that a request path names, or None (outside every folder, or `..`)."""
        parts = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path).strip("/").split("/")
        if any(part in ("", ".", "..") or "\\" in part for part in parts):
            return None
        for prefix, folder in self.prefixes.items():
            head = prefix.split("/")
            if parts[: len(head)] == head and len(parts) > len(head):
                return os.path.join(folder, *parts[len(head) :])
        return None

    def start(self) -> None:
        """Bind 127.0.0.1:port (0: any free port) and serve in a daemon thread."""
        try:
            self._httpd = ThreadingHTTPServer((LOOPBACK, self.port), _handler(self))
        except OSError as error:
            raise OSError(
                f"cannot serve on {LOOPBACK}:{self.port} ({error.strerror}); pass another --port"
            ) from None
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FolderServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _handler(server: FolderServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `server`'s mounts."""

    class Handler(BaseHTTPRequestHandler):
        def do_OPTIONS(self) -> None:  # the browser's CORS preflight
            self.send_response(HTTPStatus.NO_CONTENT)
            self._end_headers()

        def do_HEAD(self) -> None:
            self._reply(body=False)

        def do_GET(self) -> None:
            self._reply(body=True)

        def _reply(self, *, body: bool) -> None:
            path = server.local_path(self.path)
            if path is None or not os.path.isfile(path):
                self.send_response(HTTPStatus.NOT_FOUND)
                self.send_header("Content-Length", "0")
                self._end_headers()
                return
            self.send_response(HTTPStatus.OK)
            kind = "application/json" if posixpath.basename(path) in JSON_FILES else None
            self.send_header("Content-Type", kind or "application/octet-stream")
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self._end_headers()
            if body:
                with open(path, "rb") as file, contextlib.suppress(ConnectionError):
                    shutil.copyfileobj(file, self.wfile)  # a viewer may cancel a read

        def _end_headers(self) -> None:
            for key, value in CORS_HEADERS.items():
                self.send_header(key, value)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: a viewer makes thousands of requests."""

    return Handler
