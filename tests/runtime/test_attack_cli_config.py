"""Mistakes on the command line and in the environment: each is one line of error and a non-zero
exit code, never a traceback, a hang, or a server started in a broken state.

Every case runs the ``offload`` command in a subprocess, as a user does. The "servers" that answer
garbage or die mid-answer are tiny HTTP servers on 127.0.0.1 started here.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port


def offload(
    env: dict[str, str], *args: str, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    def limit_memory() -> None:  # a command that reads without end fails here, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    r = subprocess.run(
        [sys.executable, "-m", "offload.runtime.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        preexec_fn=limit_memory,
    )
    return subprocess.CompletedProcess(
        r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    )


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """The single ``Error:`` line of a failed command (and that it failed)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """A data dir of its own (no model in it) and a port nobody listens on."""
    return {
        **os.environ,
        "OFFLOAD_HOME": str(tmp_path / "home"),
        "OLLAMA_MODELS": str(tmp_path / "no-ollama"),
        "OFFLOAD_HOST": f"127.0.0.1:{free_port()}",
        "PYTHONUNBUFFERED": "1",
    }


# -- the environment, read by `offload serve` ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # A timeout socket and thread timers cannot hold: every load failed with "timestamp out of
        # range for platform time_t" in a server that had started.
        ("OFFLOAD_LOAD_TIMEOUT", "-1"),
        ("OFFLOAD_LOAD_TIMEOUT", "inf"),
        ("OFFLOAD_LOAD_TIMEOUT", str(2**64)),
        ("OFFLOAD_HEADER_TIMEOUT", str(2**64)),
        # Errors that did not name their variable.
        ("OFFLOAD_KEEP_ALIVE", "5 parsecs"),
        ("OFFLOAD_LOAD_TIMEOUT", "10mm"),
        ("OFFLOAD_MAX_UPLOAD_SIZE", "-1"),
    ],
)
def test_serve_refuses_a_setting_it_cannot_use_naming_it(
    env: dict[str, str], name: str, value: str
) -> None:
    r = offload({**env, name: value}, "serve", timeout=30)
    one_line_error(r, name)


def test_serve_refuses_an_address_it_cannot_listen_on_in_one_line(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = offload({**env, "OFFLOAD_HOST": f"127.0.0.1:{port}"}, "serve", timeout=30)
        one_line_error(r, f"127.0.0.1:{port}", "Address already in use", "OFFLOAD_HOST")
    r = offload({**env, "OFFLOAD_HOST": "no-such-host.invalid:5000"}, "serve", timeout=30)
    one_line_error(r, "cannot resolve", "no-such-host.invalid")
    # It would listen in plain http where clients speak TLS.
    r = offload({**env, "OFFLOAD_HOST": f"https://127.0.0.1:{free_port()}"}, "serve", timeout=30)
    one_line_error(r, "plain http")


@pytest.mark.parametrize(
    "value", ["127.0.0.1:-1", "127.0.0.1:1e3", "[::1", "127.0.0.1:80/api", "5 parsecs", "ftp://x"]
)
def test_a_malformed_offload_host_is_one_line_in_a_client(env: dict[str, str], value: str) -> None:
    r = offload({**env, "OFFLOAD_HOST": value}, "ps", timeout=30)
    one_line_error(r, "OFFLOAD_HOST")


def test_a_client_says_why_the_server_it_started_could_not_start(env: dict[str, str]) -> None:
    r = offload({**env, "OFFLOAD_HOST": "unix:"}, "ps", timeout=60)
    one_line_error(r, "the server could not start", "cannot resolve 'unix'")


def test_offload_home_that_is_a_file_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for home in (a_file, a_file / "below"):
        for args in (("list",), ("hardware",), ("ps",)):
            r = offload({**env, "OFFLOAD_HOME": str(home)}, *args)
            one_line_error(r, str(home), "OFFLOAD_HOME")


# -- command-line arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("--ctx", "-1"), ("--max-ctx", "0"), ("--gpu-layers", "-5"), ("--prompt-tokens", "-1")],
)
def test_plan_refuses_counts_out_of_range(
    env: dict[str, str], offload_home: Path, args: tuple[str, ...]
) -> None:
    # --ctx -1 was planned as a context of -1 tokens; --prompt-tokens -1 predicted a negative speed.
    r = offload({**env, "OFFLOAD_HOME": str(offload_home)}, "plan", "gemma3:270m", *args)
    assert r.returncode == 2 and args[0] in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_create_refuses_a_modelfile_that_is_not_text(env: dict[str, str], tmp_path: Path) -> None:
    binary = tmp_path / "Modelfile"
    binary.write_bytes(b"FROM gemma3:270m\nSYSTEM \xff\xfe\n")
    one_line_error(offload(env, "create", "x", "-f", str(binary)), "not UTF-8", "0xff")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    one_line_error(offload(env, "create", "x", "-f", str(gguf)), "GGUF", f"FROM {gguf}")
    # /dev/zero never ends: it was read until the memory ran out.
    one_line_error(offload(env, "create", "x", "-f", "/dev/zero", timeout=120), "larger than")


# -- servers that answer garbage, or stop mid-answer ----------------------------------------------


def _serve_raw(answer: Callable[[bytes], bytes | None]) -> Iterator[str]:
    """A server on 127.0.0.1 that reads each request head and writes ``answer(head)`` raw, then
    closes the connection; yields its host:port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                out = answer(head)
                if out:
                    conn.sendall(out)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    t.join(5)
    listener.close()


def _http(body: bytes, ctype: str = "application/json", status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


def _garbage(api_answer: bytes) -> Callable[[bytes], bytes]:
    """Answers / as offload does (so clients take it for a server) and everything else with
    ``api_answer``."""
    return lambda head: (
        _http(b"Offload is running", "text/plain") if head.startswith(b"GET / ") else api_answer
    )


@pytest.mark.parametrize(
    "api_answer",
    [
        _http(b"<html><body>Welcome to nginx</body></html>", "text/html"),
        _http(b'{"models": ['),
        _http(b"[1, 2, 3]"),
        _http(b'{"models": "many"}'),
        _http(b'{"models": [{"name": 5}]}'),
        _http(b'{"error": {"code": 1}}', status="400 Bad Request"),
    ],
    ids=[
        "html",
        "truncated-json",
        "a-list",
        "models-a-string",
        "models-missing-fields",
        "odd-error",
    ],
)
def test_ps_against_a_server_that_answers_garbage_is_one_line(
    env: dict[str, str], api_answer: bytes
) -> None:
    for address in _serve_raw(_garbage(api_answer)):
        r = offload({**env, "OFFLOAD_HOST": address}, "ps")
        one_line_error(r, address)


def test_run_when_the_server_dies_mid_answer_is_one_line(env: dict[str, str]) -> None:
    line = b'{"model":"m","message":{"role":"assistant","content":"Once"},"done":false}\n'
    dies = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + f"{len(line):x}\r\n".encode() + line + b"\r\n"
    )  # then the connection closes, mid-stream
    for address in _serve_raw(_garbage(dies)):
        r = offload({**env, "OFFLOAD_HOST": address}, "run", "m", "Tell me a story.")
        assert r.stdout.startswith("Once")
        one_line_error(r, "lost the connection", address)


def test_run_refuses_a_prompt_that_is_not_utf8(env: dict[str, str]) -> None:
    for address in _serve_raw(_garbage(_http(b"{}"))):
        r = offload({**env, "OFFLOAD_HOST": address}, "run", "m", stdin=b"Say \xff\xfe hi\n")
        one_line_error(r, "not UTF-8", "0xff")
