"""Request gatekeeping for the spot-fix app: Host header, token, body limits, content type,
headers.

Host rule (a server bound to a loopback address, no token): the ``Host`` header must name an
allowed host -- ``localhost``, the loopback addresses, the bound address -- with or without
a port. A web page of another site that makes its name resolve to 127.0.0.1 (DNS
rebinding) sends its own name as Host and is refused (400).

Token rule (when a token is configured): every request carries it. API calls send the
``X-Exits-Token`` header; plain page loads (GET/HEAD: the page, its JS/CSS, ``<img>``
images) may instead carry ``?token=`` or the ``exits_token`` cookie the page load sets.
State-changing requests (POST) accept the header only, so another site cannot forge
them with the cookie. Missing token -> 401, wrong token -> 403.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Awaitable, Callable, Iterable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

TOKEN_HEADER = "x-exits-token"
TOKEN_COOKIE = "exits_token"
TOKEN_QUERY = "token"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def _presented_token(request: Request) -> str | None:
    header = request.headers.get(TOKEN_HEADER)
    if header is not None or request.method not in ("GET", "HEAD"):
        return header
    return request.query_params.get(TOKEN_QUERY) or request.cookies.get(TOKEN_COOKIE)


def _host_key(name: str) -> str | None:
    """Canonical form of a host name or IP literal (IPv6 with or without brackets)."""
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name or None


def host_of_header(header: str | None) -> str | None:
    """The host of a ``Host`` header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``) in
    canonical form; ``None`` for a malformed header (a bare IPv6 address, a bad port)."""
    if not header:
        return None
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        host, rest = header[:end + 1], header[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return _host_key(host)
    if header.count(":") > 1:
        return None
    host, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    return _host_key(host)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=SECURITY_HEADERS)


def make_guard(token: str | None, max_body_bytes: int, allowed_hosts: Iterable[str] | None = None
               ) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """The HTTP middleware: checks run before any handler, so a refused request changes nothing.
    ``allowed_hosts`` (None: any) are the names the Host header may carry."""
    hosts = None if allowed_hosts is None else frozenset(k for k in map(_host_key, allowed_hosts) if k)

    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if hosts is not None:
            header = request.headers.get("host")
            host = host_of_header(header)
            if host is None or host not in hosts:
                return _error(400, f"invalid host header {header!r}: this server answers to "
                                   f"{', '.join(sorted(hosts))}")
        if token is not None:
            given = _presented_token(request)
            if given is None:
                return _error(401, f"token required: send the {TOKEN_HEADER} header (or ?token= to load the page)")
            if not token_matches(given, token):
                return _error(403, "invalid token")
        if request.method not in ("GET", "HEAD"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "Content-Length required")
            if int(length) > max_body_bytes:
                return _error(413, f"request body over {max_body_bytes} bytes")
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if int(length) > 0 and ctype != "application/json":
                return _error(415, "request body must be application/json")
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    return guard
