"""Hostile clients at the connection level, against a real ``offload serve`` over real sockets:
half-sent heads (slowloris), stalled and trickled bodies, crowds of idle keep-alive connections,
oversized heads, and a client that stops reading its stream. A normal client is served all the
while, and the attacking connections are closed.

The limits are set small (a 2 s timeout, 40 connections) so that no test needs a thousand sockets.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from offload.runtime import config
from offload.runtime.server.connections import ConnectionLimits
from tests.serve_process import ServeProcess

MODEL = "gemma3:270m"
TIMEOUT_S = 2
CAP = 40


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {
        "OFFLOAD_HEADER_TIMEOUT": f"{TIMEOUT_S}s",
        "OFFLOAD_BODY_TIMEOUT": f"{TIMEOUT_S}s",
        "OFFLOAD_WRITE_TIMEOUT": f"{TIMEOUT_S}s",
        "OFFLOAD_MAX_CONNECTIONS": str(CAP),
        "OFFLOAD_NUM_PARALLEL": "1",
    }
    with ServeProcess(tmp_path_factory.mktemp("limits-home"), env=env) as s:
        yield s


def _served_promptly(srv: ServeProcess) -> None:
    """A normal client gets its answers, fast."""
    for path in ("/api/version", "/api/tags"):
        t0 = time.monotonic()
        r = httpx.get(f"{srv.url}{path}", timeout=5)
        assert r.status_code == 200, (path, r.status_code)
        assert time.monotonic() - t0 < 1.5, (path, time.monotonic() - t0)


def _connect(srv: ServeProcess, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    if first:
        s.sendall(first)
    return s


def _closed_with(s: socket.socket, timeout_s: float) -> bytes | None:
    """What the server sent before closing ``s`` (b"" for nothing), or None if it stayed open."""
    s.settimeout(timeout_s)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def _answer(s: socket.socket) -> bytes:
    """One whole answer (with a Content-Length) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return data


def _status_and_body(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert body.count(b"\n") == 0, body  # one line of JSON
    return int(head.split()[1]), json.loads(body)


def test_slowloris_past_the_cap_leaves_normal_clients_served(srv: ServeProcess) -> None:
    _served_promptly(srv)  # first use of the routes, before the vitals are taken
    with srv.unharmed():
        partial = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        attackers = [_connect(srv, partial) for _ in range(CAP * 2)]
        silent = [_connect(srv) for _ in range(10)]
        for s in attackers[-5:]:  # a byte at a time does not move the deadline
            s.sendall(b"X")
        _served_promptly(srv)
        # The cap was passed: the oldest were closed to make room, without an answer.
        assert all(_closed_with(s, 2) == b"" for s in attackers[:CAP])
        # The rest run out of time: 408 for a half-sent head, nothing for a silent connection.
        t0 = time.monotonic()
        for s in attackers[-CAP // 2 :]:
            status, body = _status_and_body(_closed_with(s, TIMEOUT_S + 3) or b"")
            assert status == 408 and "did not arrive" in body["error"]
        assert all(_closed_with(s, TIMEOUT_S + 3) == b"" for s in silent[-3:])
        assert time.monotonic() - t0 < TIMEOUT_S + 3
        _served_promptly(srv)
        for s in attackers + silent:
            s.close()


def test_a_stalled_or_trickled_body_gets_a_408(srv: ServeProcess) -> None:
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    stalled = _connect(srv, head + b'{"model": ')
    trickled = _connect(srv, head + b"{")
    t0 = time.monotonic()
    for _ in range(int(TIMEOUT_S * 2.5)):
        _served_promptly(srv)
        try:
            trickled.sendall(b" ")  # well inside the idle timeout, far below the minimum rate
        except OSError:
            break
        time.sleep(0.5)
    status, body = _status_and_body(_closed_with(stalled, 5) or b"")
    assert status == 408 and "stalled" in body["error"]
    assert _closed_with(trickled, 5)
    assert time.monotonic() - t0 < 3 * TIMEOUT_S + 2
    # On an OpenAI path, the error is in OpenAI's shape.
    s = _connect(srv, head.replace(b"/api/chat", b"/v1/chat/completions"))
    status, body = _status_and_body(_closed_with(s, TIMEOUT_S + 3) or b"")
    assert status == 408 and body["error"]["type"]


def test_idle_keep_alive_connections_past_the_cap_are_closed_oldest_first(
    srv: ServeProcess,
) -> None:
    idle = []
    for _ in range(CAP + 20):
        s = _connect(srv, b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _answer(s).startswith(b"HTTP/1.1 200")
        idle.append(s)
    _served_promptly(srv)
    assert all(_closed_with(s, 2) == b"" for s in idle[:20])
    assert _closed_with(idle[-1], 0.2) is None  # the newest still open, still usable
    idle[-1].sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _answer(idle[-1]).startswith(b"HTTP/1.1 200")
    for s in idle:
        s.close()


@pytest.mark.parametrize(
    "extra",
    [
        b"X-Big: " + b"a" * 20000 + b"\r\n",  # arrives whole: h11 alone lets it through
        b"X-Big: " + b"a" * 300000 + b"\r\n",
        b"".join(b"X-%d: a\r\n" % i for i in range(150)),
    ],
    ids=["20KB", "300KB", "150-headers"],
)
def test_oversized_heads_get_a_431(srv: ServeProcess, extra: bytes) -> None:
    s = _connect(srv, b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n")
    status, body = _status_and_body(_closed_with(s, 5) or b"")
    assert status == 431 and "too large" in body["error"]
    s.close()
    _served_promptly(srv)


def test_a_client_that_stops_reading_its_stream_frees_the_model(srv: ServeProcess) -> None:
    quick = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}
    assert httpx.post(f"{srv.url}/api/generate", json=quick, timeout=60).status_code == 200
    # Large chunks (20 alternatives a token) fill the buffers in a few seconds.
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "Write a very long story.",
            "logprobs": True,
            "top_logprobs": 20,
            "options": {"num_predict": 100000, "temperature": 0},
        }
    ).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    s.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    # One sequence at a time: this waits for the stalled stream's slot.
    t0 = time.monotonic()
    r = httpx.post(f"{srv.url}/api/generate", json=quick, timeout=30)
    assert r.status_code == 200 and r.json()["done"]
    assert time.monotonic() - t0 < 15
    assert "left its answer unread" in srv.log.read_text()
    s.close()


def test_when_every_connection_is_answering_a_newcomer_gets_a_503(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    env = {"OFFLOAD_MAX_CONNECTIONS": "2", "OFFLOAD_NUM_PARALLEL": "1"}
    with ServeProcess(tmp_path_factory.mktemp("cap-home"), env=env) as small:
        long = {
            "model": MODEL,
            "prompt": "Write a very long story.",
            "options": {"num_predict": 4000},
        }
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            with (
                c1.stream("POST", f"{small.url}/api/generate", json=long) as r1,
                c2.stream("POST", f"{small.url}/api/generate", json=long) as r2,
            ):
                assert r1.status_code == r2.status_code == 200
                s = _connect(small)
                status, body = _status_and_body(_closed_with(s, 5) or b"")
                assert status == 503 and "too many connections" in body["error"]
        assert small.answers()  # the streams ended: room again


def test_serve_raises_its_open_file_limit_to_the_hard_limit() -> None:
    code = (
        "import resource\n"
        "from offload.runtime.server.connections import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "print(raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    now, soft, hard = out.stdout.split()
    assert now == soft and (soft == hard or int(soft) >= 10240)


@pytest.mark.parametrize(
    "name", ["OFFLOAD_HEADER_TIMEOUT", "OFFLOAD_BODY_TIMEOUT", "OFFLOAD_WRITE_TIMEOUT"]
)
def test_bad_timeouts_fail_at_start(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    for bad in ("0", "soon", "-1"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(config.ConfigError, match=name):
            config.check()
    monkeypatch.setenv(name, "90s")
    config.check()


def test_connection_cap_defaults_to_what_the_open_file_limit_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OFFLOAD_MAX_CONNECTIONS", raising=False)
    assert ConnectionLimits.from_env(1024).max_connections == 384  # 128 kept, 2 x 256 accepting
    assert ConnectionLimits.from_env(256).max_connections == 64
    assert ConnectionLimits.from_env(1 << 20).max_connections == 4096
    monkeypatch.setenv("OFFLOAD_MAX_CONNECTIONS", "0")
    with pytest.raises(config.ConfigError, match="OFFLOAD_MAX_CONNECTIONS"):
        config.check()
