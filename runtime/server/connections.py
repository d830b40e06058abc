"""Connection-level limits: what a client can hold without ever finishing a request.

uvicorn bounds none of it: a connection that sends half a request head, or a body that never
ends, is kept forever, and enough of them use up the process's file descriptors, after which no
one is served. Here, on uvicorn's h11 protocol (chosen explicitly, so the limits do not depend on
whether httptools happens to be installed):

- a connection has ``OFFLOAD_HEADER_TIMEOUT`` to deliver a complete request head, counted from
  when it opens or its last answer ends, however slowly the bytes trickle in;
- a request body may send nothing for ``OFFLOAD_BODY_TIMEOUT``, and past that first stretch must
  keep an average of ``MIN_BODY_RATE`` bytes a second, so a body trickled a byte at a time ends
  too (as Apache's mod_reqtimeout; time the server itself stops reading, because the route has
  not read what came, does not count);
- a client may leave an answer unread for ``OFFLOAD_WRITE_TIMEOUT`` once the buffers for it are
  full; then it is dropped, which cancels its generation and frees the model for others;
- a request head may be at most ``MAX_HEAD_BYTES`` and ``MAX_HEADERS`` headers (431);
- at most ``OFFLOAD_MAX_CONNECTIONS`` connections are open at once: a new one past that closes
  the connection that has waited longest for a request head or body bytes, so clients that send
  their requests keep being served while idle or stalled ones are dropped; when every connection
  is busy with a request, the newcomer gets a 503.

Errors a client can still read are one line of JSON, as everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from offload.runtime import config
from offload.runtime.server.errors import error_body, family_of

__all__ = [
    "ConnectionLimits",
    "GuardedH11Protocol",
    "BACKLOG",
    "MAX_HEAD_BYTES",
    "MAX_HEADERS",
    "MIN_BODY_RATE",
    "protocol_class",
    "raise_open_file_limit",
]

log = logging.getLogger(__name__)

# As Node's defaults (and h11's for a head still arriving): far above any real client's head.
MAX_HEAD_BYTES = 16 << 10
MAX_HEADERS = 100
# Bytes a second a request body must average once its first OFFLOAD_BODY_TIMEOUT is over.
MIN_BODY_RATE = 500

# Connections a listening socket queues, and asyncio accepts in one go: a connection closed to
# make room frees its descriptor only a batch or two later, so the cap leaves room for two.
BACKLOG = 256
# What the kernel may hold of an answer a client is not reading (it doubles this): without a cap
# it grows to megabytes, hours of tokens, and a client that stops reading is never noticed.
SEND_BUFFER = 64 << 10
# File descriptors kept for everything but client connections: runners' pipes and sockets,
# model files, logs, the store.
_RESERVED_FDS = 128
_DEFAULT_MAX_CONNECTIONS = 4096
# macOS refuses a soft limit above OPEN_MAX even when the hard limit is unlimited.
_DARWIN_OPEN_MAX = 10240


def raise_open_file_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Go does at start; the soft limit now in
    force, or None where there is none (Windows)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    targets = [hard]
    if sys.platform == "darwin" or hard == resource.RLIM_INFINITY:
        targets.append(_DARWIN_OPEN_MAX)
    for target in targets:
        if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or target > soft):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                continue
            soft = target
            break
    return None if soft == resource.RLIM_INFINITY else int(soft)


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits one server enforces on its connections."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 60.0
    max_connections: int = _DEFAULT_MAX_CONNECTIONS

    @classmethod
    def from_env(cls, open_files: int | None) -> ConnectionLimits:
        """The ``OFFLOAD_*`` values; the connection cap, when unset, from the open-file limit."""
        cap = config.max_connections()
        if cap is None:
            cap = _DEFAULT_MAX_CONNECTIONS
            if open_files is not None:
                room = open_files - _RESERVED_FDS - 2 * BACKLOG
                cap = max(16, min(cap, max(open_files // 4, room)))
        elif open_files is not None and cap + 2 * BACKLOG + _RESERVED_FDS > open_files:
            log.warning(
                "OFFLOAD_MAX_CONNECTIONS=%d is near or above the open-file limit (%d): "
                "connections past that limit are refused by the system, not managed",
                cap,
                open_files,
            )
        return cls(
            header_timeout_s=config.header_timeout_s(),
            body_timeout_s=config.body_timeout_s(),
            write_timeout_s=config.write_timeout_s(),
            max_connections=cap,
        )


def _raw_answer(status: int, reason: str, body: dict[str, Any]) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, written past h11's state machine
    (some are sent before a request has even arrived)."""
    payload = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    ).encode() + payload


_HEAD, _BODY, _BUSY = "head", "body", "busy"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits above; ``protocol_class`` makes one per server."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    # This server's connections in the order they opened (a dict as an ordered set).
    open: ClassVar[dict[GuardedH11Protocol, None]] = {}
    _last_cap_warning: ClassVar[float] = float("-inf")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._phase = _BUSY
        self._since = self.loop.time()
        self._read_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._error_status = 400
        self._body_start = 0.0
        self._body_bytes = 0
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        # Every event h11 parses passes through here, so a finished head can be checked.
        self._h11_next_event = self.conn.next_event
        self.conn.next_event = self._next_event  # type: ignore[method-assign]
        if len(self.open) >= self.limits.max_connections and not self._make_room():
            message = "the server has too many connections open; try again later"
            self._answer_and_close(_raw_answer(503, "Service Unavailable", {"error": message}))
            return
        self.open[self] = None
        self._update()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open.pop(self, None)
        self._cancel_read_timer()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._update(got_data=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(
                self.limits.write_timeout_s, self._write_timed_out
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def send_400_response(self, msg: str) -> None:
        """A head h11 (or ``_next_event``) refused: 400, or 431 when it was too large."""
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self._answer_and_close(b"")  # mid-answer (a broken chunked body): no room for one
            return
        status = self._error_status
        if status == 431:
            reason = "Request Header Fields Too Large"
            msg = (
                f"the request head is too large "
                f"(at most {MAX_HEAD_BYTES} bytes and {MAX_HEADERS} headers)"
            )
        else:
            status, reason = 400, "Bad Request"
            msg = "malformed HTTP request"
        self._answer_and_close(_raw_answer(status, reason, {"error": msg}))

    # -- the pieces --------------------------------------------------------------------------

    def _next_event(self) -> Any:
        try:
            event = self._h11_next_event()
        except h11.RemoteProtocolError as e:
            self._error_status = e.error_status_hint
            raise
        if isinstance(event, h11.Data):
            self._body_bytes += len(event.data)
        elif isinstance(event, h11.Request):
            size = (
                len(event.method)
                + len(event.target)
                + sum(len(k) + len(v) + 4 for k, v in event.headers)
            )
            if size > MAX_HEAD_BYTES or len(event.headers) > MAX_HEADERS:
                self._error_status = 431
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event

    def _phase_now(self) -> str:
        """What the connection is waiting for: a request head, body bytes, or nothing of the
        client's (a request is being answered)."""
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            return _BODY
        if their is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            return _HEAD
        return _BUSY

    def _update(self, got_data: bool = False) -> None:
        """Arm the timer for what the connection now waits for: a head's deadline does not move
        as bytes trickle in; a body's is reset by every byte."""
        if self.transport.is_closing():
            return
        phase = self._phase_now()
        if phase == self._phase and not (phase == _BODY and got_data):
            return
        now = self.loop.time()
        if phase == _BODY and self._phase != _BODY:
            self._body_start, self._body_bytes = now, 0
        self._phase = phase
        self._since = now
        self._cancel_read_timer()
        if phase == _HEAD:
            self._read_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )
        elif phase == _BODY:
            self._read_timer = self.loop.call_at(self._body_deadline(), self._body_timed_out)

    def _body_deadline(self) -> float:
        """When the body is too late: nothing for the timeout, or below the minimum rate."""
        idle = self._since + self.limits.body_timeout_s
        slow = self._body_start + self.limits.body_timeout_s + self._body_bytes / MIN_BODY_RATE
        return min(idle, slow)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _head_timed_out(self) -> None:
        self._read_timer = None
        if self._phase_now() != _HEAD or self.transport.is_closing():
            return
        log.debug("closing %s: no complete request head in time", self.client)
        if self.conn.trailing_data[0]:
            message = f"the request head did not arrive within {self.limits.header_timeout_s:g}s"
            self._answer_and_close(_raw_answer(408, "Request Timeout", {"error": message}))
        else:  # an idle connection: close it quietly, as after a keep-alive timeout
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._read_timer = None
        if self._phase_now() != _BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the route is not reading yet: not the client's doing
            now = self.loop.time()
            self._since = now
            self._body_start, self._body_bytes = now, 0
            self._read_timer = self.loop.call_at(self._body_deadline(), self._body_timed_out)
            return
        log.debug("closing %s: the request body stalled", self.client)
        cycle = self.cycle
        answer = b""
        if cycle is not None and not cycle.response_started:
            path = self.scope["path"]
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
            message = (
                f"the request body stalled (nothing for {self.limits.body_timeout_s:g}s, "
                f"or under {MIN_BODY_RATE} bytes/s)"
            )
            body = error_body(family_of(path, headers), 408, message)
            answer = _raw_answer(408, "Request Timeout", body)
        self._answer_and_close(answer)

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if self.flow.write_paused and not self.transport.is_closing():
            log.info("dropping %s: it left its answer unread", self.client)
            self._disconnect()
            self.transport.abort()

    def _answer_and_close(self, answer: bytes) -> None:
        """Write ``answer`` (if any) and close; the route, if one runs, sees a disconnect."""
        self._disconnect()
        if answer:
            self.transport.write(answer)
        self.transport.close()

    def _disconnect(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a head or body bytes; False when
        every connection is busy answering."""
        oldest: GuardedH11Protocol | None = None
        for c in self.open:
            if c._phase == _BUSY or c.transport.is_closing():
                continue
            if c._phase == _BODY and c.flow.read_paused:
                continue
            if oldest is None or c._since < oldest._since:
                oldest = c
        now = self.loop.time()
        if now - type(self)._last_cap_warning > 60:
            type(self)._last_cap_warning = now
            log.warning(
                "%d connections open (OFFLOAD_MAX_CONNECTIONS): closing the idle and stalled "
                "ones, oldest first",
                len(self.open),
            )
        if oldest is None:
            return False
        self.open.pop(oldest, None)
        oldest._answer_and_close(b"")
        return True


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class for one server: its limits and its own set of open connections."""

    class Protocol(GuardedH11Protocol):
        pass

    Protocol.limits = limits
    Protocol.open = {}
    return Protocol
