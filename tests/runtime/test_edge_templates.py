"""Template bombs stop themselves: bounded steps, output and time, and a 400 that names the limit.

Before, a request ``template`` or a Modelfile TEMPLATE with nested ``range`` pinned the model for
every client and SIGTERM no longer stopped the server; a huge ``printf`` width took a gigabyte;
a GGUF's Jinja chat template with nested loops did the same.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from offload.models.create import create
from tests.conftest import free_port
from tests.runtime.conftest import MODEL, Running
from tests.runtime.steady import assert_one_line_error, stays_steady
from tests.synth import tiny_llama, write_model

# Work bombs stop at the step limit, or at the time limit first on a busy machine.
CPU = ("step limit", "time limit")
# Nested loops of a hundred thousand, a billion iterations, gigabyte widths, a doubling string.
GO_BOMBS = [
    ("{{range 100000}}{{range 100000}}{{end}}{{end}}", CPU),
    ("{{range 1000000000}}{{end}}", CPU),
    ('{{range 100000}}{{printf "%999999d" 1}}{{end}}', ("output limit",)),
    ('{{$x := "ab"}}{{range 64}}{{$x = printf "%s%s" $x $x}}{{end}}{{$x}}', ("value limit",)),
    ("{{range 3000}}{{range 3000}}{{$.Prompt}}{{end}}{{end}}", CPU),
]
JINJA_BOMBS = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", CPU),
    ("{{ 'x' * 1000000000 }}", ("value limit",)),
    ("{{ 'x'|center(1000000000) }}", ("value limit",)),
    ("{{ '%999999999d' % 1 }}", ("value limit",)),
    ("{{ 9 ** 999999999 }}", ("value limit",)),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        ("value limit",),
    ),
    (
        "{% macro d(n) %}{% if n %}{{ d(n-1) }}{{ d(n-1) }}{% else %}x{% endif %}{% endmacro %}{{ d(40) }}",
        CPU,
    ),
    ("{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}", ("output limit",)),
]
_CHAT = [{"role": "user", "content": "hi"}]


def _generate(server: Running, template: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/generate",
        timeout=timeout,
        json={
            "model": MODEL,
            "prompt": "hi",
            "stream": False,
            "template": template,
            "options": {"num_predict": 1},
        },
    )


@pytest.fixture(autouse=True)
def warm(server: Running) -> None:
    """The model loaded, so that memory measured around an attack is the steady state."""
    assert _generate(server, "{{ .Prompt }}").status_code == 200


@pytest.mark.parametrize(("template", "limit"), GO_BOMBS)
def test_request_template_bombs_stop_at_a_limit_and_say_which(
    server: Running, template: str, limit: tuple[str, ...]
) -> None:
    with stays_steady(server.url):
        t0 = time.monotonic()
        r = _generate(server, template)
        assert any(word in assert_one_line_error(r, 400) for word in limit)
        assert time.monotonic() - t0 < 20


def test_template_source_too_large_or_unclosed_is_refused_quickly(server: Running) -> None:
    with stays_steady(server.url):
        t0 = time.monotonic()
        assert_one_line_error(_generate(server, "{{" * 100_000), 400, "unclosed action")
        assert_one_line_error(_generate(server, "{{ .Prompt }}" * 30_000), 413, "source limit")
        assert_one_line_error(
            _generate(server, "{{" + "(" * 5000 + "1" + ")" * 5000 + "}}"), 400, "nests"
        )
        assert time.monotonic() - t0 < 20


def test_the_server_keeps_answering_while_a_template_bomb_renders(server: Running) -> None:
    done: list[httpx.Response] = []
    bomb = threading.Thread(target=lambda: done.append(_generate(server, GO_BOMBS[0][0])))
    with stays_steady(server.url):
        bomb.start()
        time.sleep(0.2)
        for _ in range(5):
            t0 = time.monotonic()
            assert httpx.get(f"{server.url}/api/version", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 3
        bomb.join(timeout=60)
        assert any(word in assert_one_line_error(done[0], 400) for word in CPU)


def test_a_modelfile_template_bomb_fails_the_chat_not_the_server(server: Running) -> None:
    name = "bomb-template:latest"
    modelfile = f'FROM {MODEL}\nTEMPLATE """{{{{range 100000}}}}{{{{range 100000}}}}x{{{{end}}}}{{{{end}}}}"""\n'
    r = httpx.post(
        f"{server.url}/api/create",
        timeout=120,
        json={"model": name, "modelfile": modelfile, "stream": False},
    )
    assert r.status_code == 200, r.text
    body = {"model": name, "messages": _CHAT, "stream": False, "options": {"num_predict": 1}}
    try:
        # The first chat loads the model (the template renders after loading), then the attack.
        assert httpx.post(f"{server.url}/api/chat", timeout=120, json=body).status_code == 400
        with stays_steady(server.url):
            r = httpx.post(f"{server.url}/api/chat", timeout=60, json=body)
            assert any(word in assert_one_line_error(r, 400) for word in CPU)
    finally:
        server.scheduler.unload(name)
        httpx.request("DELETE", f"{server.url}/api/delete", json={"model": name}, timeout=30)


@pytest.fixture(scope="module")
def jinja_models(
    server: Running, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Tiny real GGUFs (llama.cpp loads them) whose chat templates are Jinja: one plain, and one
    per bomb."""
    names = {}
    folder = tmp_path_factory.mktemp("jinja-models")
    for i, (source, _) in enumerate(
        [("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", ""), *JINJA_BOMBS]
    ):
        spec = dataclasses.replace(
            tiny_llama(n_layers=1), extra_kv={"tokenizer.chat_template": source}
        )
        path = write_model(folder / f"m{i}.gguf", spec, tokenizer=True)
        name = f"jinja{i}:latest"
        create(server.store, name, f"FROM {path}")
        names[source] = name
    yield names
    for name in names.values():
        server.scheduler.unload(name)
        server.store.delete(name)


def _chat(server: Running, model: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/chat",
        timeout=120,
        json={"model": model, "messages": _CHAT, "stream": False, "options": {"num_predict": 1}},
    )


def test_a_plain_gguf_chat_template_still_renders(
    server: Running, jinja_models: dict[str, str]
) -> None:
    plain = next(iter(jinja_models.values()))
    r = _chat(server, plain)
    assert r.status_code == 200 and r.json()["prompt_eval_count"] >= len("<user>hi") // 4


@pytest.mark.parametrize(("template", "limit"), JINJA_BOMBS)
def test_gguf_jinja_template_bombs_stop_at_a_limit_and_say_which(
    server: Running, jinja_models: dict[str, str], template: str, limit: tuple[str, ...]
) -> None:
    assert _chat(server, jinja_models[template]).status_code == 400  # loads the model, warms up
    with stays_steady(server.url):
        t0 = time.monotonic()
        assert any(
            word in assert_one_line_error(_chat(server, jinja_models[template]), 400)
            for word in limit
        )
        assert time.monotonic() - t0 < 20


def test_sigterm_stops_a_server_that_is_rendering_a_template_bomb(offload_home: Path) -> None:
    port = free_port()
    env = {**os.environ, "OFFLOAD_HOST": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "offload.runtime.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(
            f"{url}/api/generate",
            timeout=120,
            json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
        )
        assert r.status_code == 200
        bomb = threading.Thread(
            target=lambda: httpx.post(
                f"{url}/api/generate",
                timeout=120,
                json={"model": MODEL, "prompt": "hi", "stream": False, "template": GO_BOMBS[0][0]},
            ),
            daemon=True,
        )
        bomb.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
