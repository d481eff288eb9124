"""HTTP fetching for the download stage: guarded, bounded and retried.

One `Fetcher` per worker holds a keep-alive connection pool shared by its threads. Every failure
becomes a `FetchResult` with a stable reason code instead of an exception, because a downloader that
raises loses rows.

Guards, in the order they bite: URL scheme (http/https only), destination address (loopback,
private, link-local, multicast and reserved addresses refused unless allowed; checked on every
redirect hop), redirect count, status code, opt-out headers, declared and actual body size, and a
total deadline per image that covers retries, redirects and slow bodies (a server sending one byte
per second never holds a thread past it).

The host is resolved once, here, and the connection goes to the address that was checked (the
Host header and TLS SNI keep the name): a DNS server that answers a public address to the check
and a private one to the connect (DNS rebinding) cannot steer a fetch past the address guard.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import socket
import time
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util import connection as urllib3_connection
from urllib3.util import parse_url

log = logging.getLogger(__name__)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
DEFAULT_OPTOUT_TOKENS = ("noai", "noimageai", "noindex", "noimageindex")
USER_AGENT_TOKEN = "dataengine"


@dataclass(frozen=True)
class FetchOptions:
    """Limits of one image fetch; see `DownloadConfig` for the user-facing docs."""

    timeout: float = 10.0
    deadline: float = 30.0
    retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    max_redirects: int = 5
    max_bytes: int = 32 * 1024 * 1024
    allow_private_networks: bool = False
    respect_optout: bool = True
    optout_tokens: tuple[str, ...] = DEFAULT_OPTOUT_TOKENS
    user_agent: str = f"Mozilla/5.0 (compatible; {USER_AGENT_TOKEN}/0.1)"
    pool_size: int = 16


@dataclass
class FetchResult:
    """Outcome of one fetch. `reason` is None on success, else a stable code."""

    url: str | None
    body: bytes | None = None
    status: int | None = None
    final_url: str | None = None
    attempts: int = 0
    reason: str | None = None
    detail: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _Reject(Exception):
    """Internal: ends one attempt with a reason; `retryable` says whether another attempt may help."""

    def __init__(self, reason: str, detail: str, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None, final_url: str | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status
        self.retryable, self.retry_after, self.final_url = retryable, retry_after, final_url


class _PinnedConnectionMixin:
    """Connects to `pinned_address` instead of resolving the host again; `host` (the Host header, TLS
    SNI and certificate checks) stays the name from the URL."""

    def __init__(self, *args: Any, pinned_address: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pinned_address = pinned_address

    def _new_conn(self) -> socket.socket:
        conn: Any = self
        try:
            return urllib3_connection.create_connection(
                (self.pinned_address, conn.port), conn.timeout, source_address=conn.source_address,
                socket_options=conn.socket_options)
        except socket.timeout as e:
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} ({self.pinned_address}) timed out") from e
        except OSError as e:
            raise NewConnectionError(conn, f"Failed to connect to {conn.host} ({self.pinned_address}): {e}") from e


class _PinnedHTTPConnection(_PinnedConnectionMixin, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnectionMixin, HTTPSConnection):
    pass


class _PinnedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


#: urllib3's pool key plus the address: one pool per (scheme, host, port, checked address)
_PinnedPoolKey = namedtuple("_PinnedPoolKey", (*urllib3.poolmanager.PoolKey._fields, "key_pinned_address"))  # type: ignore[misc]


class _PinnedPoolManager(urllib3.PoolManager):
    """urllib3's pool manager (keep-alive pools, least recently used evicted) over pinned connections."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_classes_by_scheme = {"http": _PinnedHTTPConnectionPool, "https": _PinnedHTTPSConnectionPool}
        key_fn = functools.partial(urllib3.poolmanager._default_key_normalizer, _PinnedPoolKey)
        self.key_fn_by_scheme = {"http": key_fn, "https": key_fn}

    def pool_for(self, url: str, address: str) -> HTTPConnectionPool:
        parts = parse_url(url)
        return self.connection_from_host(parts.host, parts.port, parts.scheme or "http",
                                         pool_kwargs={"pinned_address": address})


def blocked_reason(address: str) -> str | None:
    """Why an IP address is not a public destination, or None if it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attr in ("is_loopback", "is_link_local", "is_multicast", "is_reserved", "is_unspecified", "is_private"):
        if getattr(ip, attr):
            return attr[3:]
    return None


def optout_directive(header_value: str | None, tokens: tuple[str, ...]) -> str | None:
    """The opt-out directive in an `X-Robots-Tag` value that applies to us, if any.

    Directives may be scoped to a user agent (`otherbot: noai`); those scoped to another agent are
    ignored, unscoped ones and ours apply.

    Examples:
        >>> optout_directive("noai, noimageai", ("noai",))
        'noai'
        >>> optout_directive("googlebot: noindex", ("noindex",)) is None
        True
    """
    if not header_value:
        return None
    agent: str | None = None
    for part in header_value.split(","):
        part = part.strip().lower()
        if ":" in part:
            agent, part = (s.strip() for s in part.split(":", 1))
        if agent not in (None, USER_AGENT_TOKEN, "*"):
            continue
        for directive in part.split():
            if directive in tokens:
                return directive
    return None


class Fetcher:
    """Fetches URLs with guards and retries; thread-safe, one per worker process."""

    def __init__(self, options: FetchOptions) -> None:
        self.options = options
        self._pools = _PinnedPoolManager(num_pools=256, maxsize=options.pool_size, block=False, retries=False)
        self._addresses: dict[tuple[str, int], tuple[str | None, str | None]] = {}  # (address, problem)

    def fetch(self, url: str | None) -> FetchResult:
        """Fetch one URL within the per-image deadline, retrying transient failures."""
        opts = self.options
        result = FetchResult(url=url)
        problem = _url_problem(url)
        if problem:
            result.reason, result.detail = "bad_url", problem
            return result
        assert url is not None
        deadline_at = time.monotonic() + opts.deadline
        for attempt in range(opts.retries + 1):
            result.attempts = attempt + 1
            try:
                body, status, final_url, headers = self._fetch_once(url, deadline_at)
            except _Reject as r:
                result.reason, result.detail, result.status, result.final_url = r.reason, r.detail, r.status, r.final_url
                pause = _backoff(attempt, opts.backoff_base, opts.backoff_max, r.retry_after)
                if not r.retryable or attempt == opts.retries or time.monotonic() + pause >= deadline_at:
                    return result
                time.sleep(pause)
                continue
            result.body, result.status, result.final_url, result.headers = body, status, final_url, headers
            result.reason = result.detail = None
            return result
        return result

    def _fetch_once(self, url: str, deadline_at: float) -> tuple[bytes, int, str, dict[str, str]]:
        opts = self.options
        current = url
        for hop in range(opts.max_redirects + 1):
            address = self._destination(current)
            remaining = deadline_at - time.monotonic()
            if remaining <= 0:
                raise _Reject("timeout", f"deadline of {opts.deadline}s passed", retryable=False, final_url=current)
            per_request = min(opts.timeout, remaining)
            try:
                resp = self._pools.pool_for(current, address).urlopen(
                    "GET", parse_url(current).request_uri, redirect=False, retries=False, preload_content=False,
                    timeout=urllib3.Timeout(connect=per_request, read=per_request),
                    headers={"User-Agent": opts.user_agent, "Accept": "image/*,*/*;q=0.8"},
                )
            except NewConnectionError as e:  # a subclass of urllib3's TimeoutError, but a refusal
                raise _Reject("connection_error", f"cannot connect: {e}", final_url=current) from None
            except Urllib3Timeout as e:
                raise _Reject("timeout", f"no response within {per_request:.1f}s: {e}", retryable=True, final_url=current) from None
            except (ProtocolError, HTTPError, OSError) as e:
                if _is_timeout(e):
                    raise _Reject("timeout", f"timed out: {e}", retryable=True, final_url=current) from None
                raise _Reject("connection_error", f"{type(e).__name__}: {e}", final_url=current) from None
            consumed = False
            try:
                if resp.status in REDIRECT_CODES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise _Reject("bad_redirect", f"{resp.status} without Location", status=resp.status, final_url=current)
                    nxt = urljoin(current, location)
                    problem = _url_problem(nxt)
                    if problem:
                        raise _Reject("bad_url", f"redirect to {nxt!r}: {problem}", status=resp.status, final_url=current)
                    current = nxt
                    continue
                result = self._read_response(resp, current, deadline_at)
                consumed = True
                return result
            finally:
                _finish(resp, consumed)
        raise _Reject("too_many_redirects", f"more than {opts.max_redirects} redirects", final_url=current)

    def _read_response(self, resp: urllib3.BaseHTTPResponse, url: str, deadline_at: float) -> tuple[bytes, int, str, dict[str, str]]:
        opts = self.options
        status = resp.status
        if status >= 400:
            retryable = status >= 500 or status == 429
            reason = "http_5xx" if status >= 500 else f"http_{status}"
            raise _Reject(reason, f"HTTP {status}", status=status, retryable=retryable,
                          retry_after=_retry_after(resp.headers.get("Retry-After")), final_url=url)
        if status != 200:
            raise _Reject(f"http_{status}", f"HTTP {status} is not a full image response", status=status, final_url=url)
        if opts.respect_optout:
            directive = optout_directive(resp.headers.get("X-Robots-Tag"), opts.optout_tokens)
            if directive:
                raise _Reject("opt_out", f"X-Robots-Tag: {directive}", status=status, final_url=url)
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > opts.max_bytes:
            raise _Reject("too_large", f"Content-Length {declared} > max_bytes {opts.max_bytes}", status=status, final_url=url)
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                if time.monotonic() > deadline_at:
                    raise _Reject("timeout", f"body not complete within the {opts.deadline}s deadline ({size} bytes read)",
                                  status=status, final_url=url)
                chunk = resp.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > opts.max_bytes:
                    raise _Reject("too_large", f"body exceeds max_bytes {opts.max_bytes}", status=status, final_url=url)
                chunks.append(chunk)
        except (Urllib3Timeout, ProtocolError, HTTPError, OSError) as e:
            if _is_timeout(e):
                raise _Reject("timeout", f"read stalled: {e}", status=status, retryable=True, final_url=url) from None
            raise _Reject("connection_error", f"body read failed: {type(e).__name__}: {e}", status=status, final_url=url) from None
        return b"".join(chunks), status, url, {k.lower(): v for k, v in resp.headers.items()}

    def _destination(self, url: str) -> str:
        """The address to connect to for `url`: resolved once per host and port, checked, then reused."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (host, port)
        if key not in self._addresses:
            self._addresses[key] = resolve_destination(host, port, self.options.allow_private_networks)
        address, problem = self._addresses[key]
        if problem:
            reason = "dns_error" if problem.startswith("dns:") else "blocked_address"
            raise _Reject(reason, f"{host}: {problem}", final_url=url)
        assert address is not None
        return address


def _finish(resp: urllib3.BaseHTTPResponse, consumed: bool) -> None:
    """Return the connection to the pool only when its body was fully read.

    A connection with an unread body (a redirect page, a rejected, slow or oversized body) would
    hand its leftover bytes to the next request, and draining a slow body could take forever, so
    such a connection is closed instead.
    """
    if not consumed:
        resp.close()
    resp.release_conn()


def resolve_destination(host: str, port: int, allow_private: bool) -> tuple[str | None, str | None]:
    """(address to connect to, None), or (None, why not): one DNS answer, every address in it checked
    unless `allow_private`; the connection then goes to the first address, never to a new answer."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return None, f"dns: cannot resolve: {e}"
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        return None, "dns: no addresses"
    for address in addresses if not allow_private else ():
        why = blocked_reason(address)
        if why:
            return None, f"resolves to {why} address {address} (set allow_private_networks: true to allow)"
    return addresses[0], None


def _url_problem(url: str | None) -> str | None:
    if url is None or not str(url).strip():
        return "empty URL"
    try:
        parts = urlsplit(str(url).strip())
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        return f"unparseable URL: {e}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} not allowed (http/https only)"
    if not parts.hostname:
        return "URL has no host"
    return None


def _is_timeout(e: BaseException) -> bool:
    timeouts = (Urllib3Timeout, socket.timeout, TimeoutError)
    return isinstance(e, timeouts) or isinstance(getattr(e, "reason", None), timeouts)


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _backoff(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins when it asks for longer."""
    pause = random.uniform(0.5, 1.0) * min(cap, base * (2**attempt))
    if retry_after is not None:
        pause = max(pause, min(retry_after, cap))
    return pause
