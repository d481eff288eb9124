"""The fetcher's guards against a real local server: schemes, addresses, redirects, sizes, time."""

import http.server
import socket
import threading
import time
from urllib.parse import quote

import polars as pl
import pytest

from dataengine.io import fetch
from dataengine.io.fetch import Fetcher, FetchOptions, _backoff, optout_directive

FAST = dict(timeout=1.0, deadline=3.0, retries=2, backoff_base=0.01, backoff_max=0.05)


@pytest.fixture(scope="module")
def web(synthweb_dir, synthweb_server):
    truth = pl.read_parquet(synthweb_dir / "truth.parquet")
    name = {kind: truth.filter(pl.col("url_kind") == kind)["path"][0] for kind in truth["url_kind"].unique()}
    return synthweb_server, name


def _fetcher(**kw) -> Fetcher:
    return Fetcher(FetchOptions(**{**FAST, "allow_private_networks": True, **kw}))


@pytest.mark.parametrize("url", [None, "", "   ", "file:///etc/passwd", "ftp://example.com/a.jpg",
                                 "gopher://example.com/", "example.com/a.jpg", "http://", "http://host:99999/x"])
def test_bad_urls_are_rejected_without_a_request(url):
    result = _fetcher().fetch(url)
    assert result.reason == "bad_url" and result.attempts == 0 and result.detail


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "169.254.169.254", "10.1.2.3", "[::1]", "0.0.0.0"])
def test_private_destinations_are_refused_by_default(web, host):
    server, _ = web
    before = server.request_count
    result = Fetcher(FetchOptions(**FAST)).fetch(f"http://{host}:{server.base_url.rsplit(':', 1)[1]}/img/x.jpg")
    assert result.reason == "blocked_address", result
    assert "allow_private_networks" in result.detail
    assert server.request_count == before


def test_private_destinations_are_refused_on_every_redirect_hop(web, monkeypatch):
    server, name = web
    real = fetch.blocked_reason
    # pretend 127.0.0.1 is a public host, so only the redirect target can trip the guard
    monkeypatch.setattr(fetch, "blocked_reason", lambda a: None if a == "127.0.0.1" else real(a))
    fetcher = Fetcher(FetchOptions(**FAST))
    assert fetcher.fetch(server.base_url + name["ok"]).reason is None
    metadata = "http://169.254.169.254/latest/meta-data/"
    result = fetcher.fetch(f"{server.base_url}/redirect-to?url={quote(metadata)}")
    assert result.reason == "blocked_address" and result.final_url == metadata
    port = server.base_url.rsplit(":", 1)[1]
    other_loopback = f"http://127.0.0.2:{port}" + name["ok"]
    result = fetcher.fetch(f"{server.base_url}/redirect-to?url={quote(other_loopback)}")
    assert result.reason == "blocked_address"
    result = fetcher.fetch(f"{server.base_url}/redirect-to?url={quote('file:///etc/passwd')}")
    assert result.reason == "bad_url" and "redirect" in result.detail


def test_redirect_loop_stops_at_max_redirects(web):
    server, _ = web
    before = server.request_count
    result = _fetcher(max_redirects=3).fetch(server.base_url + "/loop/0")
    assert result.reason == "too_many_redirects" and result.attempts == 1
    assert server.request_count - before == 4  # the first request and three redirects


def test_redirect_is_followed(web):
    server, name = web
    result = _fetcher().fetch(server.base_url + name["redirect"])
    assert result.reason is None and result.status == 200 and "/img/" in result.final_url and result.body


def test_one_byte_per_second_server_hits_the_deadline(web):
    server, name = web
    started = time.monotonic()
    result = _fetcher(timeout=1.5, deadline=2.0).fetch(server.base_url + name["slow"])
    elapsed = time.monotonic() - started
    assert result.reason == "timeout" and "deadline" in result.detail
    assert elapsed < 3.5


def test_declared_oversized_body_is_refused_before_reading(web):
    server, name = web
    started = time.monotonic()
    result = _fetcher(max_bytes=1024 * 1024).fetch(server.base_url + name["oversized"])
    assert result.reason == "too_large" and "Content-Length" in result.detail
    assert time.monotonic() - started < 1.0


class _Undeclared(http.server.BaseHTTPRequestHandler):
    """Streams 4 MiB with no Content-Length (HTTP/1.0, body ends at close)."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        try:
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_undeclared_oversized_body_stops_reading_past_the_limit():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Undeclared)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _fetcher(max_bytes=256 * 1024).fetch(f"http://127.0.0.1:{server.server_address[1]}/x.jpg")
        assert result.reason == "too_large" and "exceeds" in result.detail and result.body is None
    finally:
        server.shutdown()


@pytest.mark.parametrize("status,reason,attempts", [(404, "http_404", 1), (403, "http_403", 1),
                                                    (503, "http_5xx", 3), (500, "http_5xx", 3), (429, "http_429", 3)])
def test_only_5xx_and_429_are_retried(web, status, reason, attempts):
    server, _ = web
    result = _fetcher(retries=2).fetch(f"{server.base_url}/status/{status}")
    assert (result.reason, result.attempts, result.status) == (reason, attempts, status)


def test_transient_503_then_success_is_retried(web):
    server, name = web
    # a /flaky/ path nobody else requests: this server answers 503 to its first request only
    result = _fetcher().fetch(server.base_url + "/flaky/" + name["ok"].rsplit("/", 1)[1])
    assert result.reason is None and result.attempts == 2


def test_connection_refused_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _fetcher(retries=0).fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert result.reason == "connection_error"


def test_opt_out_headers(web):
    server, name = web
    assert _fetcher().fetch(server.base_url + name["opt_out"]).reason == "opt_out"
    assert _fetcher(respect_optout=False).fetch(server.base_url + name["opt_out"]).reason is None


def test_optout_directive_parsing():
    tokens = ("noai", "noimageai", "noindex", "noimageindex")
    assert optout_directive("noai", tokens) == "noai"
    assert optout_directive("nofollow, noimageindex", tokens) == "noimageindex"
    assert optout_directive("otherbot: noai", tokens) is None
    assert optout_directive("dataengine: noindex", tokens) == "noindex"
    assert optout_directive("googlebot: nofollow, NOAI", tokens) is None  # still scoped to googlebot
    assert optout_directive(None, tokens) is None


def test_backoff_grows_is_jittered_and_honours_retry_after():
    pauses = [_backoff(a, base=1.0, cap=100.0, retry_after=None) for a in range(5)]
    assert all(0.5 * 2**a <= p <= 2**a for a, p in enumerate(pauses))
    assert _backoff(0, base=0.1, cap=10.0, retry_after=4.0) == 4.0
    assert _backoff(0, base=0.1, cap=2.0, retry_after=30.0) == 2.0  # capped


# ---- DNS rebinding: the connection goes to the address the guard checked ---------------------------

class _Recording(http.server.BaseHTTPRequestHandler):
    """Answers `/ok` with a few bytes, `/hop?to=URL` with a redirect; records each request's Host header."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.hosts.append(self.headers.get("Host"))
        if self.path.startswith("/hop?to="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/hop?to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"image bytes from " + self.server.server_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def rebinding(monkeypatch):
    """A "public" server on 127.0.0.2 (the address guard is told 127.0.0.2 is public) and an internal one on
    127.0.0.1, same port; a resolver that answers 127.0.0.2 the first time a `.test` name is asked and
    127.0.0.1 every time after (DNS rebinding); and every socket connect recorded."""
    servers = {}
    for address in ("127.0.0.2", "127.0.0.1"):
        port = servers["127.0.0.2"].server_address[1] if servers else 0
        server = http.server.ThreadingHTTPServer((address, port), _Recording)
        server.hosts = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[address] = server
    port = servers["127.0.0.2"].server_address[1]
    real_getaddrinfo, real_blocked = socket.getaddrinfo, fetch.blocked_reason
    asked: dict[str, int] = {}

    def rebinding_resolver(host, *args, **kwargs):
        if not str(host).endswith(".test"):
            return real_getaddrinfo(host, *args, **kwargs)
        asked[host] = asked.get(host, 0) + 1
        address = "127.0.0.2" if asked[host] == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    connects: list = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket, "getaddrinfo", rebinding_resolver)
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: (connects.append(a), real_connect(s, a))[1])
    monkeypatch.setattr(fetch, "blocked_reason", lambda a: None if a == "127.0.0.2" else real_blocked(a))
    yield {"port": port, "public": servers["127.0.0.2"], "internal": servers["127.0.0.1"], "connects": connects,
           "asked": asked}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def test_a_rebinding_resolver_never_gets_a_connect_to_the_internal_address(rebinding):
    port = rebinding["port"]
    fetcher = Fetcher(FetchOptions(**FAST))  # private networks refused (the default)
    result = fetcher.fetch(f"http://public.test:{port}/ok")
    assert result.reason is None and result.body == b"image bytes from 127.0.0.2"
    # a second request (a new connection: the pool is empty after a close) still goes to the checked address
    fetcher._pools.clear()
    assert fetcher.fetch(f"http://public.test:{port}/ok").body == b"image bytes from 127.0.0.2"
    assert rebinding["asked"]["public.test"] == 1  # one DNS answer, checked and then used
    assert rebinding["public"].hosts == [f"public.test:{port}"] * 2  # the Host header keeps the name
    assert rebinding["internal"].hosts == []
    assert ("127.0.0.1", port) not in rebinding["connects"]


def test_a_redirect_hop_to_a_rebinding_name_connects_to_its_checked_address(rebinding):
    port = rebinding["port"]
    fetcher = Fetcher(FetchOptions(**FAST))
    result = fetcher.fetch(f"http://public.test:{port}/hop?to=http://second.test:{port}/ok")
    assert result.reason is None and result.final_url == f"http://second.test:{port}/ok"
    assert result.body == b"image bytes from 127.0.0.2"
    assert rebinding["public"].hosts == [f"public.test:{port}", f"second.test:{port}"]
    assert rebinding["internal"].hosts == [] and ("127.0.0.1", port) not in rebinding["connects"]
    # a hop whose name answers a private address at the check is refused, as before
    rebinding["asked"]["third.test"] = 1  # its next answer is 127.0.0.1
    result = fetcher.fetch(f"http://public.test:{port}/hop?to=http://third.test:{port}/ok")
    assert result.reason == "blocked_address" and rebinding["internal"].hosts == []


def test_tls_to_a_checked_address_keeps_the_name_for_sni(rebinding, tmp_path):
    """HTTPS through the pinned connection: the TCP connect goes to the checked address and the TLS
    handshake names the host (SNI); the self-signed certificate is then refused as it should be."""
    import ssl

    crypto = pytest.importorskip("cryptography.x509")
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = crypto.Name([crypto.NameAttribute(crypto.oid.NameOID.COMMON_NAME, "tls.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (crypto.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    sni: list = []
    context.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    listener = socket.create_server(("127.0.0.2", 0))
    port = listener.getsockname()[1]

    def handshake_once():
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            pass  # the client refuses the self-signed certificate

    thread = threading.Thread(target=handshake_once, daemon=True)
    thread.start()
    try:
        result = Fetcher(FetchOptions(**{**FAST, "retries": 0})).fetch(f"https://tls.test:{port}/ok")
        thread.join(timeout=5)
    finally:
        listener.close()
    assert result.reason == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert sni == ["tls.test"]
    assert ("127.0.0.2", port) in rebinding["connects"] and ("127.0.0.1", port) not in rebinding["connects"]
