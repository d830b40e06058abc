"""Client mistakes in /api/create (and a request ``template``) get a 4xx and one line, never a 500.

Before, a Go character literal of two characters crashed the template parser (``ord()``),
malformed ``messages`` were stored and broke /api/show for good, a missing blob, an unknown or
impossible ``quantize`` and a 10 MB ``system`` answered 500 "internal error".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from offload.models import gotemplate
from offload.models.create import check_sources
from offload.models.layout import MEDIA_MESSAGES, MEDIA_MODEL, MEDIA_SYSTEM
from offload.models.modelfile import Message, Modelfile, ModelfileError, parse_modelfile
from offload.models.names import parse_name
from offload.models.store import Store
from tests.conftest import ServerThread

BASE = "gemma3:270m"
MISSING = "sha256:" + "a" * 64


def one_line(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message and "\n" not in message
    assert "internal error" not in message and len(message) < 1000, message
    for w in words:
        assert w in message, (w, message)
    return message


def create(server: ServerThread, **body: object) -> httpx.Response:
    payload = {"model": "attack-create", "from": BASE, "stream": False, **body}
    return httpx.post(f"{server.url}/api/create", json=payload, timeout=120)


def show(server: ServerThread, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/api/show", json={"model": name}, timeout=60)


# ---------------------------------------------------------------- templates
@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{{ 'ab' }}", ("malformed character constant",)),
        ("{{ '' }}", ()),
        ("{{ '\\q' }}", ("malformed character constant",)),
        ('{{ "\\ud800" }}', ("bad string literal",)),
        ('{{ "\\x4" }}', ("bad string literal",)),
        ('{{ "a\\\'" }}', ("bad string literal",)),
        ("{{ 1e999 }}", ("bad number",)),
        ("{{ " + "9" * 5000 + " }}", ("bad number",)),
        ("{{ 0x_ }}", ("bad number",)),
        ("{{if .a}}x{{else if .b )}}y{{end}}", ("unexpected ')'",)),
    ],
)
def test_bad_literals_are_template_errors(template: str, words: tuple[str, ...]) -> None:
    with pytest.raises(gotemplate.TemplateError) as e:
        gotemplate.parse(template)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    ("template", "out"),
    [
        ("{{ 'a' }}", "97"),
        ("{{ '\\n' }}", "10"),
        ("{{ '\\'' }}", "39"),
        ("{{ '\"' }}", "34"),
        ("{{ '\\x41' }}", "65"),
        ("{{ '\\u00e9' }}", "233"),
        ("{{ 'é' }}", "233"),
        ('{{ "\\x41\\u00e9\\101\\t" }}', "AéA\t"),
        ('{{ "\\xc3\\xa9" }}', "é"),
        ("{{ 017 }}", "15"),
        ("{{ 0x1F }}", "31"),
        ("{{ 1_000 }}", "1000"),
    ],
)
def test_good_literals_read_as_go_reads_them(template: str, out: str) -> None:
    assert gotemplate.render(template) == out


def test_a_bad_char_literal_in_a_request_template_is_400(server: ServerThread) -> None:
    r = httpx.post(
        f"{server.url}/api/generate",
        json={"model": BASE, "prompt": "hi", "template": "{{ 'ab' }}", "stream": False},
        timeout=120,
    )
    one_line(r, 400, "malformed character constant")


def test_a_bad_char_literal_in_a_create_template_is_400(server: ServerThread) -> None:
    one_line(create(server, template="{{ 'ab' }}"), 400, "TEMPLATE", "malformed character")
    r = create(server, modelfile=f"FROM {BASE}\nTEMPLATE \"{{{{ 'ab' }}}}\"\n")
    one_line(r, 400, "line 2", "malformed character")


# ---------------------------------------------------------------- messages
@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ([{"role": 5, "content": {"a": 1}}], ("messages[0]", "role")),
        ([{"role": "user", "content": {"a": 1}}], ("messages[0]", "content must be a string")),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], ("messages[1]",)),
        ([{"content": "hi"}], ("role",)),
        ([{"role": None, "content": "hi"}], ("role",)),
        ([{"role": ["user"], "content": "hi"}], ("role",)),
        ([{"role": "user", "content": 3}], ("content",)),
    ],
)
def test_malformed_messages_are_refused_at_create(
    server: ServerThread, messages: list[dict[str, object]], words: tuple[str, ...]
) -> None:
    one_line(create(server, model="attack-msgs", messages=messages), 400, *words)
    one_line(show(server, "attack-msgs"), 404)


def test_good_messages_still_create_and_show(server: ServerThread) -> None:
    msgs = [
        {"role": "System", "content": "be brief"},
        {"role": "user", "content": 'say "hi"'},
        {"role": "assistant", "content": ""},
    ]
    r = create(server, model="attack-msgs-ok", messages=msgs)
    assert r.status_code == 200, r.text
    shown = show(server, "attack-msgs-ok").json()
    assert shown["messages"] == [{**m, "role": m["role"].lower()} for m in msgs]
    assert parse_modelfile(shown["modelfile"]).messages == [
        Message(m["role"].lower(), m["content"]) for m in msgs
    ]


def _plant(home: Path, name: str, extra: list[tuple[str, bytes]]) -> None:
    """A model written past create's checks, as an older offload (or another tool) could have."""
    store = Store(home / "models")
    base = store.resolve(BASE)
    model = next(x for x in base.manifest["layers"] if x["mediaType"] == MEDIA_MODEL)
    layers = [model] + [store.layer_for_bytes(media, data) for media, data in extra]
    store.write_manifest(parse_name(name), store.new_manifest(layers, base.config))


def test_a_stored_model_with_bad_messages_still_shows(
    server: ServerThread, offload_home: Path
) -> None:
    bad = [{"role": 5, "content": {"a": 1}}, "x", {"role": "user", "content": "kept"}]
    _plant(offload_home, "attack-planted", [(MEDIA_MESSAGES, json.dumps(bad).encode())])
    r = show(server, "attack-planted")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["messages"] == [{"role": "user", "content": "kept"}]
    assert "MESSAGE user kept" in body["modelfile"]


def test_a_stored_value_no_modelfile_can_hold_still_shows(
    server: ServerThread, offload_home: Path
) -> None:
    system = 'def f():\n    """doc"""\n'
    _plant(offload_home, "attack-planted-sys", [(MEDIA_SYSTEM, system.encode())])
    r = show(server, "attack-planted-sys")
    assert r.status_code == 200, r.text
    assert r.json()["system"] == system and "SYSTEM" in r.json()["modelfile"]
    # The same value given to create is kept (show writes it as near as it can).
    assert create(server, model="attack-sys", system=system).status_code == 200
    assert show(server, "attack-sys").json()["system"] == system


def test_the_library_refuses_messages_a_modelfile_cannot_say(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    for msg, word in [(Message("tool", "x"), "role"), (Message("user", {"a": 1}), "content")]:  # type: ignore[arg-type]
        mf = Modelfile(from_="nothing-here", messages=[msg])
        with pytest.raises(ModelfileError, match=word) as e:
            check_sources(store, mf, base_dir=tmp_path)
        assert e.value.http_status == 400
    strange = Modelfile(from_="x", messages=[Message("user", {"a": 1})])  # type: ignore[arg-type]
    assert "MESSAGE user" in strange.render(strict=False)
    with pytest.raises(ModelfileError):
        strange.render()


# ---------------------------------------------------------------- blobs
def test_files_naming_a_blob_never_uploaded_is_400(server: ServerThread) -> None:
    r = httpx.post(
        f"{server.url}/api/create",
        json={"model": "attack-files", "files": {"w.gguf": MISSING}, "stream": False},
        timeout=60,
    )
    one_line(r, 400, "not on the server", "/api/blobs")
    r = httpx.post(
        f"{server.url}/api/create",
        json={"model": "attack-files", "files": {"w.gguf": MISSING}},
        timeout=60,
    )
    one_line(r, 400, "not on the server")


def test_adapters_naming_a_blob_never_uploaded_is_400(server: ServerThread) -> None:
    one_line(create(server, adapters={"a.gguf": MISSING}), 400, "adapter blob", "not on the server")
    one_line(create(server, adapters={"a.gguf": "sha256:zz"}), 400, "invalid digest")


def test_uploaded_files_still_create(server: ServerThread, tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    up = httpx.post(f"{server.url}/api/blobs/{digest}", content=data, timeout=60)
    assert up.status_code in (200, 201)
    r = httpx.post(
        f"{server.url}/api/create",
        json={"model": "attack-files-ok", "files": {"w.gguf": digest}, "stream": False},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # An unknown type is refused before anything runs, even for weights that could be quantized.
    r = httpx.post(
        f"{server.url}/api/create",
        json={"model": "q", "files": {"w.gguf": digest}, "quantize": "q9_z", "stream": False},
        timeout=60,
    )
    one_line(r, 400, "unknown quantization", "Q4_K_M")


# ---------------------------------------------------------------- quantize
def test_an_unknown_quantization_type_is_400_and_lists_the_valid_ones(
    server: ServerThread,
) -> None:
    one_line(create(server, quantize="zz"), 400, "unknown quantization", "Q4_0", "Q8_0")
    one_line(create(server, quantize="q4\n_0"), 400, "unknown quantization")


@pytest.mark.parametrize("stream", [False, True])
def test_quantizing_a_quantized_model_is_400(server: ServerThread, stream: bool) -> None:
    r = create(server, quantize="q4_0", stream=stream)
    one_line(r, 400, "only F16, BF16 or F32", "Q4_K_M")


# ---------------------------------------------------------------- sizes
def test_a_10_mb_system_is_413(server: ServerThread) -> None:
    r = create(server, model="attack-big", system="x" * 10_000_000)
    one_line(r, 413, "SYSTEM", "8388608")
    one_line(show(server, "attack-big"), 404)


def test_a_10_mb_license_or_message_is_413(server: ServerThread) -> None:
    one_line(create(server, license=["ok", "y" * 9_000_000]), 413, "LICENSE")
    msgs = [{"role": "user", "content": "z" * 9_000_000}]
    one_line(create(server, messages=msgs), 413, "MESSAGE")


def test_too_many_licenses_is_400(server: ServerThread) -> None:
    r = create(server, license=[f"l{i}" for i in range(300)])
    one_line(r, 400, "layers", "256")


def test_valid_creates_still_work(server: ServerThread) -> None:
    r = create(
        server,
        model="attack-valid",
        template="{{ .Prompt }}{{ 'a' }}",
        system="S",
        license=["MIT"],
        parameters={"temperature": 0.5, "stop": ["<end>"]},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert r.status_code == 200, r.text
    shown = show(server, "attack-valid").json()
    assert shown["system"] == "S" and shown["template"] == "{{ .Prompt }}{{ 'a' }}"
    assert shown["license"] == "MIT" and shown["messages"] == [{"role": "user", "content": "hi"}]
    lines = [json.loads(x) for x in create(server, model="attack-valid2", stream=True).iter_lines()]
    assert lines[-1] == {"status": "success"}
