"""A local HTTP server for a synthetic web build, with the misbehaviours of the real web on demand.

The URL path decides the behaviour (`/img/`, `/redirect/`, `/slow/`, ...), so the truth table alone says
what a downloader should see, and the static subset (`files/`) can also be served by any plain server.
Files are held in memory after their first read: a downloader benchmark should measure the downloader.
"""

from __future__ import annotations

import functools
import io
import logging
import mimetypes
import re
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image

log = logging.getLogger(__name__)

OVERSIZED_BYTES = 12 * 1024 * 1024
OVERSIZED_DIMS = (12000, 12000)  # what the oversized body's JPEG header claims
BOMB_DIMS = (16000, 16000)
_SLOW_INTERVAL_S = 1.0
_CHUNK = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")  # one path segment, no "..", no hidden files
_STATIC_ROUTES = ("img", "truncated", "notimage")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=4)
def bomb_png(width: int = BOMB_DIMS[0], height: int = BOMB_DIMS[1]) -> bytes:
    """A valid greyscale PNG of `width` x `height` zeros: a few hundred KB that decode to 256 MB at 16000².

    Built by hand: Pillow would need the full pixel buffer. Compressing 256 MB takes seconds, so one
    block of rows is deflated once and its output repeated; a full flush after each block resets the
    compressor, which makes every identical block compress to identical bytes.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    row = width + 1  # filter byte 0, then zero pixels
    rows_per_block = max(1, min(height, (16 << 20) // row))
    full_blocks, rest = divmod(height, rows_per_block)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate; the zlib wrapper is added below
    block = comp.compress(bytes(row * rows_per_block)) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.compress(bytes(row * rest)) + comp.flush(zlib.Z_FINISH)
    total = row * height
    adler = ((total % 65521) << 16) | 1  # adler32 of `total` zero bytes: a stays 1, b sums to total
    idat = b"\x78\xda" + block * full_blocks + tail + struct.pack(">I", adler)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def oversized_head() -> bytes:
    """A real JPEG header (through SOS) whose SOF claims `OVERSIZED_DIMS`; the body is padding after it."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", OVERSIZED_DIMS[1], OVERSIZED_DIMS[0])
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return bytes(data[: sos + 2 + length])


class _Server(ThreadingHTTPServer):
    """Shared state of one server's life: file cache, counters, flaky paths, open connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # benchmarks open many connections at once; the default backlog is 5

    def __init__(self, address: tuple[str, int], files_dir: Path) -> None:
        super().__init__(address, _Handler)
        self.files_dir = files_dir
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[bytes, str]] = {}
        self._flaky_seen: set[str] = set()
        self._conns: set[socket.socket] = set()
        self.requests = 0

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def request_count(self) -> int:
        with self._lock:
            return self.requests

    def first_time(self, path: str) -> bool:
        """True exactly once per path in this server's life."""
        with self._lock:
            if path in self._flaky_seen:
                return False
            self._flaky_seen.add(path)
            return True

    def read(self, rel: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of a file under files/, cached in memory; None if absent."""
        hit = self._cache.get(rel)
        if hit is not None:
            return hit
        path = self.files_dir / rel
        if not path.is_file():
            return None
        entry = (path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        with self._lock:
            self._cache[rel] = entry
        return entry

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def drop_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections so they end with the server."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("synthweb: error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries a correct Content-Length
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 120  # idle keep-alive connections are closed after this
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        pass  # a benchmark makes thousands of requests; per-request lines would drown everything

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    # ---- responses -------------------------------------------------------------------------------

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: tuple[tuple[str, str], ...] = (),
        head: bool = False,
    ) -> None:
        self.send_response(status)
        if status not in (204, 304):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        if body and not head and status not in (204, 304):
            self.wfile.write(body)

    def _not_found(self, head: bool) -> None:
        self._reply(404, b"not found\n", head=head)

    def _redirect(self, location: str, head: bool) -> None:
        self._reply(302, b"found\n", headers=(("Location", location),), head=head)

    def _static(self, rel: str, head: bool, headers: tuple[tuple[str, str], ...] = ()) -> None:
        entry = self.server.read(rel)
        if entry is None:
            self._not_found(head)
            return
        self._reply(200, entry[0], entry[1], headers=headers, head=head)

    def _stream(self, head: bool, length: int, content_type: str, chunks: Iterator[bytes]) -> None:
        """Send headers for `length` bytes, then the chunks; stops quietly on disconnect or shutdown."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head:
            return
        sent = 0
        try:
            for chunk in chunks:
                if self.server.stopping.is_set():
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass  # client went away (BrokenPipe, ConnectionReset): the expected end of a slow read
        if sent < length:
            self.close_connection = True  # a body cut short leaves the connection unusable

    def _slow_chunks(self, data: bytes) -> Iterator[bytes]:
        for i in range(len(data)):
            if i and self.server.stopping.wait(_SLOW_INTERVAL_S):
                return
            yield data[i : i + 1]

    @staticmethod
    def _oversized_chunks() -> Iterator[bytes]:
        head = oversized_head()
        yield head
        remaining = OVERSIZED_BYTES - len(head)
        pad = bytes(_CHUNK)
        while remaining > 0:
            yield pad[: min(_CHUNK, remaining)]
            remaining -= _CHUNK

    # ---- routing ---------------------------------------------------------------------------------

    def _dispatch(self, head: bool) -> None:
        self.server.count_request()
        url = urlsplit(self.path)
        parts = url.path.split("/", 2)
        route = parts[1] if len(parts) > 1 else ""
        name = parts[2] if len(parts) > 2 else ""

        if route == "bomb.png" and len(parts) == 2:
            self._reply(200, bomb_png(), "image/png", head=head)
        elif route == "redirect-to":
            target = parse_qs(url.query).get("url")
            if not target:
                self._reply(400, b"redirect-to needs ?url=\n", head=head)
            else:
                self._redirect(target[0], head)
        elif route == "status" and name.isdigit() and 200 <= int(name) <= 599:
            self._reply(int(name), f"status {name}\n".encode(), head=head)
        elif route == "loop" and name.isdigit():
            self._redirect(f"/loop/{int(name) + 1}", head)
        elif not _NAME.match(name):
            self._not_found(head)
        elif route in _STATIC_ROUTES:
            # notimage/*.jpg holds HTML: its extension makes it image/jpeg here and on static servers
            self._static(f"{route}/{name}", head)
        elif route == "redirect":
            self._redirect(f"/img/{name}", head)
        elif route == "flaky":
            if self.server.first_time(url.path):
                self._reply(503, b"service unavailable\n", headers=(("Retry-After", "0"),), head=head)
            else:
                self._static(f"img/{name}", head)
        elif route == "optout":
            self._static(f"img/{name}", head, headers=(("X-Robots-Tag", "noai, noimageai"),))
        elif route == "slow":
            entry = self.server.read(f"img/{name}")
            if entry is None:
                self._not_found(head)
            else:
                self._stream(head, len(entry[0]), entry[1], self._slow_chunks(entry[0]))
        elif route == "oversized":
            self._stream(head, OVERSIZED_BYTES, "image/jpeg", self._oversized_chunks())
        else:
            self._not_found(head)  # includes /missing/<name>


class SynthWebServer:
    """Serve a synthetic web build on a local port.

    Args:
        root: a build directory (its `files/` is served) or a directory of files itself.
        host: interface to bind.
        port: port to bind; 0 picks a free one.

    Examples:
        >>> with SynthWebServer(Path("/tmp/sw")) as server:  # doctest: +SKIP
        ...     urllib.request.urlopen(server.base_url + "/img/sw-000000.jpg").status
        200
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        root = Path(root)
        self.files_dir = root / "files" if (root / "files").is_dir() else root
        self.host, self.port = host, port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._final_count = 0

    def _bind(self) -> _Server:
        if self._httpd is None:
            self._httpd = _Server((self.host, self.port), self.files_dir)
            self.port = self._httpd.server_address[1]
            log.info("synthweb serving %s at %s", self.files_dir, self.base_url)
        return self._httpd

    def start(self) -> SynthWebServer:
        """Bind and serve from a daemon thread; returns self."""
        if self._thread is None:
            httpd = self._bind()
            self._thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="synthweb", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (for the CLI)."""
        httpd = self._bind()
        try:
            httpd.serve_forever(poll_interval=0.2)
        finally:
            self._close_socket()

    def close(self) -> None:
        """Stop serving: slow and streaming responses end within about a second, idle connections at once."""
        if self._httpd is None:
            return
        self._httpd.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._close_socket()

    def _close_socket(self) -> None:
        if self._httpd is not None:
            self._httpd.stopping.set()
            self._httpd.server_close()
            self._httpd.drop_connections()
            self._final_count = self._httpd.request_count()
            self._httpd = None

    def __enter__(self) -> SynthWebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """`http://host:port` of the running server."""
        if self._httpd is None:
            raise RuntimeError("SynthWebServer is not running; use it as a context manager or call start()")
        return f"http://{self.host}:{self.port}"

    @property
    def request_count(self) -> int:
        """Requests served so far (every route, every status), counted thread-safely."""
        return self._final_count if self._httpd is None else self._httpd.request_count()
