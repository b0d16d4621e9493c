"""A file server on 127.0.0.1 for gallery tests: serves a folder with HTTP ranges, logs every request,
and can break a download off part way, ignore ranges, or send a file slowly."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Hit:
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FileServer:
    root: Path
    hits: list[Hit] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops (once)
    slow: dict[str, float] = field(default_factory=dict)     # path -> seconds between 64 KiB writes
    ignore_ranges: bool = False
    wrong_ranges: bool = False  # answer a range request with 206 but the whole file (a broken server)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> URL it redirects to (302)
    hold: dict[str, float] = field(default_factory=dict)  # path -> seconds to wait before answering

    def __post_init__(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                server.hits.append(Hit(path, rng, self.headers.get("Authorization")))
                time.sleep(server.hold.get(path, 0.0))
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                file = server.root / path.lstrip("/")
                if not file.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = file.read_bytes()
                start = 0
                if rng and server.wrong_ranges:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
                elif rng and not server.ignore_ranges and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = server.cut_after.pop(path, None)
                delay = server.slow.get(path, 0.0)
                step = 64 * 1024
                for off in range(0, len(body), step):
                    if limit is not None and off >= limit:
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)  # the client sees the body end early
                        return
                    try:
                        self.wfile.write(body[off:off + step])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    if delay:
                        time.sleep(delay)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def gets(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
