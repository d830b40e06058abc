"""Which web pages may call the server: the ``Host`` and ``Origin`` checks.

A browser lets any page send requests to ``127.0.0.1`` (a ``text/plain`` POST needs no
preflight), and DNS rebinding lets a page on the attacker's name read the answers. So, before
anything else sees a request:

- its ``Host`` must name this server: loopback (``localhost``, ``*.localhost``), an IP address,
  the machine's host name, the bind address of ``OFFLOAD_HOST``, or a name in ``OFFLOAD_HOSTS``.
  An IP address always passes: a rebinding page can only make the browser send a *name*;
- its ``Origin``, when it has one (browsers send it on every cross-site request), must be a
  local one (``http://localhost:*``, ``app://``, ``file://``, ``tauri://`` ...), one in
  ``OFFLOAD_ORIGINS``, or the server's own.

Both refusals are 403s with a one-line JSON error, on every method; the origins let in are
exactly those that get CORS answers (a preflight's 200 and its ``Access-Control-Allow-*``).
Unlike Ollama, the host check stays on when the server listens beyond loopback
(``OFFLOAD_HOST=0.0.0.0``): a LAN server is as open to rebinding as a local one. Clients that
send no ``Origin`` (curl, SDKs) are not browsers and pass the origin check.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from offload.runtime.server.errors import error_response, family_of

__all__ = ["HostPolicy", "BrowserGuard", "origin_regex", "host_name"]

log = logging.getLogger(__name__)

# Browsers may call us from local pages and desktop-app shells; OFFLOAD_ORIGINS adds more.
_LOCAL_ORIGINS = [
    r"https?://(localhost|[a-z0-9.-]+\.localhost|127(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}|0\.0\.0\.0|\[::1\])"
    r"(:\d+)?",
    r"app://.*",
    r"file://.*",
    r"tauri://.*",
]
# A host name: dot-separated labels of letters, digits, '-' and '_' (container names), none
# empty, none starting or ending with '-'. Percent signs, '@', spaces and the like make it no name.
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_MAX_NAME = 253
_PORT = re.compile(r":([0-9]{1,5})")


def origin_regex(extra: list[str]) -> str:
    """One regex for the allowed origins; ``*`` in an ``OFFLOAD_ORIGINS`` entry matches anything."""
    pats = list(_LOCAL_ORIGINS) + [re.escape(o).replace(r"\*", ".*") for o in extra]
    return "^(" + "|".join(pats) + ")$"


def host_name(header: str) -> str | None:
    """The host part of a ``Host`` header (lower case, no port, no brackets); None if malformed.

    Only ``name``, ``IPv4`` or ``[IPv6]``, each with an optional port from 1 to 65535: nothing
    else (no zone id such as ``%eth0``, no user part, no characters a host name cannot hold),
    since what follows the part that looks like a name could be the name an attacker controls.
    """
    h = header.strip(" \t").lower()
    if h.startswith("["):
        end = h.find("]")
        host, rest = (h[1:end], h[end + 1 :]) if end > 0 else ("", "")
        if not _is_ip(host, version=6):
            return None
    else:
        host, sep, port = h.partition(":")
        rest = sep + port
        host = host[:-1] if host.endswith(".") else host
        if not (_is_ip(host, version=4) or (len(host) <= _MAX_NAME and _NAME.fullmatch(host))):
            return None
    if rest and not ((m := _PORT.fullmatch(rest)) and 1 <= int(m.group(1)) <= 65535):
        return None
    return host


def _is_ip(text: str, version: int | None = None) -> bool:
    """Whether ``text`` is an IP address (of ``version``), written without a zone id."""
    if "%" in text:
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def _pattern(entry: str) -> re.Pattern[str]:
    name = host_name(entry.replace("*", "wildcard")) or entry.lower()
    return re.compile(re.escape(name).replace("wildcard", "[a-z0-9_.-]*"))


@dataclass(frozen=True)
class HostPolicy:
    """The host names a server answers to."""

    names: frozenset[str]
    patterns: tuple[re.Pattern[str], ...] = ()
    any_name: bool = False

    @classmethod
    def build(cls, bind_host: str, extra: Iterable[str]) -> HostPolicy:
        """Loopback, the machine's name, ``bind_host`` and the ``extra`` entries (``OFFLOAD_HOSTS``)."""
        names = {"localhost"}
        machine = socket.gethostname().lower().rstrip(".")
        if machine:
            names |= {machine, f"{machine.split('.')[0]}.local"}
        bind = host_name(bind_host)
        if bind:
            names.add(bind)
        patterns, any_name = [], False
        for entry in extra:
            if entry.strip() == "*":
                any_name = True
            elif "*" in entry:
                patterns.append(_pattern(entry))
            elif (name := host_name(entry)) is not None:
                names.add(name)
        return cls(frozenset(names), tuple(patterns), any_name)

    def allows(self, header: str) -> bool:
        """Whether a request with this ``Host`` header may be answered."""
        if not header:
            return True  # HTTP/1.0 clients; browsers always send Host
        name = host_name(header)
        if name is None:
            return False
        if self.any_name or _is_ip(name) or name in self.names or name.endswith(".localhost"):
            return True
        return any(p.fullmatch(name) for p in self.patterns)


class BrowserGuard:
    """ASGI middleware: refuse foreign ``Host`` and ``Origin`` headers before any other layer.

    It must run outside ``JSONBodyByDefault``, which reads a ``text/plain`` body as JSON (for
    curl): that is exactly the request a hostile page can send without a preflight. It also
    answers CORS, for exactly the origins it lets in: one rule decides both, so a page it admits
    (the server's own origin included) gets its preflight answered, and one it refuses the 403.
    """

    def __init__(self, app: Any, hosts: HostPolicy, origins: str) -> None:
        self.app = app
        self.cors = _AdmittedCORS(app)
        self.hosts = hosts
        self.origins = re.compile(origins)

    def _origin_ok(self, origin: str, host: str) -> bool:
        if self.origins.fullmatch(origin):
            return True
        # The server's own pages (/docs) call it from its own origin.
        return "://" in origin and origin.split("://", 1)[1].lower() == host.strip().lower() != ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
        origins = [v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"]
        host = hosts[0] if hosts else ""
        problem = None
        if len(hosts) > 1 or not self.hosts.allows(host):
            problem = (
                f"host {_short(host)} is not allowed: the server answers to loopback and its "
                "own names; add the name to OFFLOAD_HOSTS to serve it"
            )
        elif origins and (len(origins) > 1 or not self._origin_ok(origins[0], host)):
            problem = (
                f"origin {_short(origins[0])} is not allowed; add it to OFFLOAD_ORIGINS to let "
                "its pages call this server"
            )
        if problem is None:
            await self.cors(scope, receive, send)
            return
        log.info("refused %s %s: %s", scope.get("method"), scope.get("path"), problem)
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []
        }
        response = error_response(403, problem, family_of(str(scope.get("path", "")), headers))
        await response(scope, receive, send)


class _AdmittedCORS(CORSMiddleware):
    """Starlette's CORS answers for requests whose origin ``BrowserGuard`` has let in.

    Only the guard decides which origins may call: every origin that reaches this layer is one it
    admitted, so it is mirrored back. A preflight asking for what no route takes (a method outside
    Starlette's list, private-network access) is a one-line 400, not Starlette's plain text.
    """

    def __init__(self, app: Any) -> None:
        super().__init__(app, allow_methods=["*"], allow_headers=["*"], allow_credentials=False)

    def is_allowed_origin(self, origin: str) -> bool:
        return True  # BrowserGuard has refused every other origin before this layer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        if "origin" not in headers:  # not a browser's request: nothing to answer for CORS
            await self.app(scope, receive, send)
            return
        if scope["method"] != "OPTIONS" or "access-control-request-method" not in headers:
            await self.simple_response(scope, receive, send, request_headers=headers)
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code != 200:
            refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            response = error_response(
                400,
                f"CORS preflight refused: {refused} not allowed (method "
                f"{_short(headers['access-control-request-method'])})",
                family_of(str(scope.get("path", "")), headers),
            )
        await response(scope, receive, send)


def _short(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."
