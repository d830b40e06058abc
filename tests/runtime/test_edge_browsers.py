"""Web pages cannot reach the server: foreign Host and Origin headers get a 403 on every method.

Before, a request with ``Host: evil.example.com`` was answered (DNS rebinding, CVE-2024-28224 in
Ollama), and a ``text/plain`` POST from any page ran without a preflight.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.conftest import MODEL, Running, start_server
from tests.runtime.steady import assert_one_line_error, stays_steady

_HEADERS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _get(url: str, path: str = "/api/version", **headers: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers=headers, timeout=30)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example.com",
        "evil.example.com:11435",
        "localhost.evil.com",
        "127.0.0.1.nip.io",
        "attacker.localhost.example",
        "evil.com.",
        "a b",
        "localhost:notaport",
        "::1",
        "[evil]",
        # What follows an address or a loopback name must not be read past: a zone id, a user
        # part, a port out of range, or characters no host name holds.
        "127.0.0.1%evil.com",
        "10.0.0.7%evil.com:11435",
        "localhost%2e.evil.com",
        "127.0.0.1@evil.com",
        "evil.com@localhost",
        "[::1%25evil.com]",
        "[::1%eth0]:11435",
        "[127.0.0.1]",
        "[::1]evil.com",
        "evil.com#.localhost",
        "evil.com/.localhost",
        "a..localhost",
        "-evil.localhost",
        "localhost:0",
        "localhost:65536",
        "127.0.0.1:",
        "127.0.0.1:+80",
    ],
)
def test_requests_naming_a_foreign_host_are_refused(server: Running, host: str) -> None:
    with stays_steady(server.url):
        for method in ("GET", "POST", "OPTIONS", "DELETE"):
            r = httpx.request(method, f"{server.url}/api/tags", headers={"Host": host}, timeout=30)
            assert_one_line_error(r, 403, "host", "OFFLOAD_HOSTS")


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:11435",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]:11435",
        "app.localhost",
        "ui.app.localhost:3000",
        "192.168.1.20:11435",
        "10.0.0.7",
        "[fe80::1]",
        "[::ffff:127.0.0.1]:1",
        "localhost.",
        "127.0.0.1:65535",
        "my_service.localhost",
        socket.gethostname(),
    ],
)
def test_loopback_names_ip_addresses_and_the_machines_name_are_served(
    server: Running, host: str
) -> None:
    r = _get(server.url, "/api/tags", Host=host)
    assert r.status_code == 200 and "models" in r.json()


def test_a_text_plain_post_from_a_foreign_page_is_refused_and_not_run(server: Running) -> None:
    # What any web page can send without a preflight: text/plain, which the server reads as JSON.
    body = f'{{"source": "{MODEL}", "destination": "pwned:latest"}}'
    with stays_steady(server.url):
        r = httpx.post(
            f"{server.url}/api/copy",
            content=body,
            timeout=30,
            headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
        )
        assert_one_line_error(r, 403, "origin", "OFFLOAD_ORIGINS")
        names = [
            m["name"] for m in httpx.get(f"{server.url}/api/tags", timeout=30).json()["models"]
        ]
        assert "pwned:latest" not in names and MODEL in names
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=30,
            content='{"model": "x", "messages": []}',
            headers={"Content-Type": "text/plain", "Origin": "null"},
        )
        assert_one_line_error(r, 403, "origin")
        assert r.json()["error"]["type"] == "permission_error"  # OpenAI's shape on /v1
        r = httpx.options(
            f"{server.url}/api/generate",
            timeout=30,
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert_one_line_error(r, 403, "origin")


def test_local_pages_and_the_servers_own_origin_are_let_in(server: Running) -> None:
    port = server.url.rsplit(":", 1)[1]
    for origin in (
        "http://localhost:5173",
        "http://127.0.0.1:3000",
        "https://app.localhost",
        "tauri://localhost",
        "app://obsidian.md",
        f"http://127.0.0.1:{port}",
    ):
        r = httpx.post(
            f"{server.url}/api/show", json={"model": MODEL}, timeout=30, headers={"Origin": origin}
        )
        assert r.status_code == 200, (origin, r.text)
        pre = httpx.options(
            f"{server.url}/api/show",
            timeout=30,
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin


def _preflight(url: str, origin: str, **headers: str) -> httpx.Response:
    return httpx.options(
        f"{url}/api/chat",
        timeout=30,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
            **headers,
        },
    )


def _assert_preflight_ok(r: httpx.Response, origin: str) -> None:
    assert r.status_code == 200, (origin, r.status_code, r.text)
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "content-type, authorization"


def test_a_preflight_from_an_origin_the_guard_lets_in_is_answered(server: Running) -> None:
    """CORS allowed only the OFFLOAD_ORIGINS pattern, the guard the server's own origin too: a
    preflight from a page on the machine's name got Starlette's plain-text 400."""
    port = server.url.rsplit(":", 1)[1]
    machine = socket.gethostname().lower()
    for origin, host in (
        (f"http://{machine}:{port}", f"{machine}:{port}"),
        (f"http://127.0.0.1:{port}", None),
        (f"http://localhost:{port}", f"localhost:{port}"),
        (f"http://[::1]:{port}", f"[::1]:{port}"),
        (f"http://192.168.1.20:{port}", f"192.168.1.20:{port}"),
    ):
        r = _preflight(server.url, origin, **({"Host": host} if host else {}))
        _assert_preflight_ok(r, origin)
        answer = httpx.get(
            f"{server.url}/api/version",
            timeout=30,
            headers={"Origin": origin, **({"Host": host} if host else {})},
        )
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == origin


def test_a_preflight_from_an_origin_the_guard_refuses_is_its_403(server: Running) -> None:
    port = server.url.rsplit(":", 1)[1]
    machine = socket.gethostname().lower()
    for origin, host in (
        ("https://evil.example", None),
        (f"http://{machine}:{port}", f"127.0.0.1:{port}"),  # not the server's own origin then
        (f"http://evil.example:{port}", f"{machine}:{port}"),
        ("null", None),
    ):
        r = _preflight(server.url, origin, **({"Host": host} if host else {}))
        assert_one_line_error(r, 403, "origin", "OFFLOAD_ORIGINS")
        assert "access-control-allow-origin" not in r.headers


def test_a_preflight_for_a_method_no_route_takes_is_a_one_line_400(server: Running) -> None:
    r = _preflight(server.url, "http://localhost:5173", **{"Access-Control-Request-Method": "FOO"})
    assert "CORS preflight refused" in assert_one_line_error(r, 400, "method")
    r = httpx.options(
        f"{server.url}/v1/chat/completions",
        timeout=30,
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Private-Network": "true",
        },
    )
    assert_one_line_error(r, 400, "private-network")
    assert r.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape on /v1


@pytest.fixture()
def configured(store, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:  # noqa: ANN001
    """A second server over the same store, bound (as it believes) to all interfaces, with
    OFFLOAD_HOSTS and OFFLOAD_ORIGINS set."""
    monkeypatch.setenv("OFFLOAD_HOST", "0.0.0.0:11435")
    monkeypatch.setenv("OFFLOAD_HOSTS", "llm.lan, *.corp.example:8080")
    monkeypatch.setenv("OFFLOAD_ORIGINS", "https://ui.corp.example")
    running, srv, thread = start_server(store)
    yield running.url
    srv.should_exit = True
    thread.join(timeout=10)
    running.scheduler.close()


def test_offload_hosts_and_origins_open_the_server_to_named_hosts_and_pages(
    configured: str,
) -> None:
    for host in (
        "llm.lan",
        "llm.lan:11435",
        "gpu.corp.example",
        "a.b.corp.example:1",
        socket.gethostname(),
    ):
        assert _get(configured, Host=host).status_code == 200, host
    # Bound to all interfaces, the host check still stands: a rebinding name is still refused.
    for host in ("evil.example.com", "corp.example", "llm.lan.evil.com"):
        assert_one_line_error(_get(configured, Host=host), 403, "host")
    r = httpx.post(
        f"{configured}/api/show",
        json={"model": MODEL},
        timeout=30,
        headers={"Origin": "https://ui.corp.example", "Host": "llm.lan"},
    )
    assert r.status_code == 200
    # A configured origin and the server's own origin on a configured name both get preflights.
    for origin, host in (
        ("https://ui.corp.example", "llm.lan"),
        ("http://llm.lan:11435", "llm.lan:11435"),
        ("http://gpu.corp.example", "gpu.corp.example"),
    ):
        _assert_preflight_ok(_preflight(configured, origin, Host=host), origin)
    assert_one_line_error(
        _preflight(configured, "https://other.corp.example", Host="llm.lan"), 403, "origin"
    )
    assert_one_line_error(_get(configured, Origin="https://other.corp.example"), 403, "origin")


def test_a_star_in_offload_hosts_answers_every_name(store, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("OFFLOAD_HOSTS", "*")
    running, srv, thread = start_server(store)
    try:
        assert _get(running.url, Host="anything.example.net").status_code == 200
        assert_one_line_error(
            _get(running.url, Origin="https://anything.example.net"), 403, "origin"
        )
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        running.scheduler.close()


# -- properties ----------------------------------------------------------------------------

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)


def _should_serve(name: str) -> bool:
    """The rule, written out: loopback names, IP addresses and this machine's names."""
    machine = socket.gethostname().lower()
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in (
        "localhost",
        machine,
        machine.split(".")[0] + ".local",
        "127.0.0.1",
    ) or name.endswith(".localhost")


@_HEADERS
@given(
    name=_names | st.sampled_from(["localhost", "a.localhost", "localhost.a", "127.0.0.1"]),
    port=st.none() | st.integers(1, 65535),
)
def test_a_host_is_served_exactly_when_it_is_loopback_an_address_or_the_machine(
    server: Running, name: str, port: int | None
) -> None:
    header = name if port is None else f"{name}:{port}"
    r = _get(server.url, Host=header)
    if _should_serve(name):
        assert r.status_code == 200
    else:
        assert_one_line_error(r, 403, "host")


def _loopback_v4(name: str) -> bool:
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


@_HEADERS
@given(
    scheme=st.sampled_from(["http", "https", "ws", "chrome-extension"]),
    name=_names | st.sampled_from(["localhost", "127.0.0.1", "[::1]", "x.localhost", "0.0.0.0"]),
    port=st.none() | st.integers(1, 65535),
)
def test_an_origin_is_let_in_exactly_when_it_is_a_local_page(
    server: Running, scheme: str, name: str, port: int | None
) -> None:
    origin = f"{scheme}://{name}" + ("" if port is None else f":{port}")
    local = scheme in ("http", "https") and (
        name in ("localhost", "[::1]", "0.0.0.0")
        or name.endswith(".localhost")
        or _loopback_v4(name)
    )
    r = _get(server.url, Origin=origin)
    pre = _preflight(server.url, origin)
    if local:
        assert r.status_code == 200
        _assert_preflight_ok(pre, origin)
    else:
        assert_one_line_error(r, 403, "origin")
        assert_one_line_error(pre, 403, "origin")


@_HEADERS
@given(
    host=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    origin=st.none() | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
)
def test_odd_host_and_origin_headers_get_a_clean_answer_never_a_crash(
    server: Running, host: str, origin: str | None
) -> None:
    headers = {"Host": host.strip() or "localhost"}
    if origin is not None and origin.strip():
        headers["Origin"] = origin.strip()
    try:
        r = httpx.get(f"{server.url}/api/version", headers=headers, timeout=30)
    except httpx.LocalProtocolError:
        return  # the client itself will not send it
    assert r.status_code in (200, 400, 403), r.text
    if r.status_code != 200 and r.headers.get("content-type", "").startswith("application/json"):
        assert_one_line_error(r, r.status_code)
    assert _get(server.url).status_code == 200
