"""The CLI commands and HTTP routes of the model library, against a real registry."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient

from offload.models.store import Store
from offload.planner.errors import OffloadError
from offload.runtime.cli import models as cli_models
from offload.runtime.server.models_api import router
from tests.registry_server import RegistryServer

MODEL = "application/vnd.ollama.image.model"


@click.group()
def group() -> None:
    pass


cli_models.register(group)


def invoke(*args: str) -> tuple[int, str]:
    # The real `offload` group turns OffloadError into one line and its exit code; so do we here.
    runner = CliRunner()
    result = runner.invoke(group, list(args), catch_exceptions=True)
    if isinstance(result.exception, OffloadError):
        return result.exception.exit_code, f"Error: {result.exception}"
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OFFLOAD_MODELS", str(tmp_path / "ours"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path


def test_cli_pull_list_show_cp_rm(env: Path, reg: RegistryServer, tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    reg.state.add_model(
        "library/tiny",
        "latest",
        [(MODEL, data)],
        config=b'{"model_format":"gguf","model_family":"llama","file_type":"F32","model_type":"1M"}',
    )
    name = f"{reg.host}/library/tiny"
    code, out = invoke("pull", "--insecure", name)
    assert code == 0, out
    code, out = invoke("list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    expected_id = hashlib.sha256(reg.state.manifests[("library/tiny", "latest")]).hexdigest()[:12]
    row = next(line.split() for line in lines[1:] if line.startswith(name))
    assert row[:4] == [f"{name}:latest", expected_id, "1.9", "MB"]
    code, out = invoke("show", name, "--modelfile")
    assert code == 0 and "FROM " in out and "sha256-" in out
    code, out = invoke("show", name)
    assert "architecture" in out and "llama" in out
    assert invoke("cp", name, "mine")[0] == 0
    code, out = invoke("rm", name)
    assert code == 0 and "deleted" in out
    assert "mine:latest" in invoke("list")[1]
    code, out = invoke("rm", "nope")
    assert (
        code == 1 and out == 'Error: model "nope:latest" not found, try "offload pull nope:latest"'
    )


def test_cli_create_from_modelfile_and_errors(env: Path, tiny_gguf: Path) -> None:
    work = env / "work"
    work.mkdir()
    shutil.copy(tiny_gguf, work / "w.gguf")
    (work / "Modelfile").write_text("FROM ./w.gguf\nSYSTEM hi\nPARAMETER temperature 0.1\n")
    code, out = invoke("create", "mine", "-f", str(work / "Modelfile"))
    assert code == 0, out
    assert invoke("show", "mine", "--system")[1].strip() == "hi"
    assert invoke("show", "mine", "--parameters")[1].strip() == "temperature                    0.1"
    (work / "Bad").write_text("FROM ./w.gguf\nADAPTER ./missing.gguf\n")
    code, out = invoke("create", "bad", "-f", str(work / "Bad"))
    assert code == 1 and out == "Error: Modelfile line 2: ADAPTER ./missing.gguf: no such file"
    assert "bad" not in invoke("list")[1]


def test_cli_pull_errors_are_one_line(env: Path, reg: RegistryServer) -> None:
    reg.state.require_auth = "401"
    code, out = invoke("pull", "--insecure", f"{reg.host}/library/tiny")
    assert code == 1 and out.startswith("Error: model requires authentication") and "\n" not in out
    code, out = invoke("pull", "../../etc/passwd")
    assert code == 1 and out.startswith('Error: invalid model name "../../etc/passwd"')


@pytest.fixture
def api(tmp_path: Path) -> TestClient:
    app = FastAPI()
    app.state.store = Store(tmp_path / "api-store")
    app.include_router(router)
    return TestClient(app)


def test_api_pull_streams_ollama_progress_then_show_copy_delete(
    api: TestClient, reg: RegistryServer, tiny_gguf: Path
) -> None:
    data = tiny_gguf.read_bytes()
    reg.state.add_model("library/tiny", "latest", [(MODEL, data)])
    name = f"{reg.host}/library/tiny"
    with api.stream("POST", "/api/pull", json={"model": name, "insecure": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0] == {"status": "pulling manifest"} and events[-1] == {"status": "success"}
    layer = [e for e in events if e.get("digest") == "sha256:" + hashlib.sha256(data).hexdigest()]
    assert layer[-1]["total"] == layer[-1]["completed"] == len(data)
    shown = api.post("/api/show", json={"model": name}).json()
    assert shown["details"]["family"] == "llama" and "FROM " in shown["modelfile"]
    assert api.post("/api/copy", json={"source": name, "destination": "copy"}).status_code == 200
    assert api.request("DELETE", "/api/delete", json={"model": name}).status_code == 200
    r = api.request("DELETE", "/api/delete", json={"model": name})
    assert r.status_code == 404 and "not found" in r.json()["error"]
    assert api.post("/api/show", json={"model": "copy"}).status_code == 200


def test_api_errors_have_ollama_shape_and_status(api: TestClient, reg: RegistryServer) -> None:
    r = api.post(
        "/api/pull", json={"model": f"{reg.host}/library/none", "insecure": True, "stream": False}
    )
    assert r.status_code == 404 and "not found" in r.json()["error"]
    r = api.post("/api/pull", json={"model": "a/../b"})
    assert r.status_code == 400 and "invalid model name" in r.json()["error"]
    with api.stream(
        "POST", "/api/pull", json={"model": f"{reg.host}/library/none", "insecure": True}
    ) as s:
        last = [json.loads(line) for line in s.iter_lines() if line][-1]
    assert "not found" in last["error"]
    r = api.post("/api/create", json={"model": "x", "modelfile": "FROM x\nPARAMETER nope 1\n"})
    assert r.status_code == 400 and r.json()["error"].startswith(
        "Modelfile line 2: unknown parameter"
    )


def test_api_blobs_then_create_from_files_then_push(
    api: TestClient, reg: RegistryServer, tiny_gguf: Path
) -> None:
    data = tiny_gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert api.head(f"/api/blobs/{digest}").status_code == 404
    bad = api.post(f"/api/blobs/{digest}", content=data[:-1] + b"x")
    assert bad.status_code == 400 and "digest mismatch" in bad.json()["error"]
    assert api.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert api.head(f"/api/blobs/{digest}").status_code == 200
    name = f"{reg.host}/me/made:v1"
    r = api.post("/api/create", json={"model": name, "files": {"w.gguf": digest}, "system": "S",
                                      "parameters": {"stop": ["a", "b"], "temperature": 0.2}, "stream": False})  # fmt: skip
    assert r.status_code == 200, r.text
    shown = api.post("/api/show", json={"model": name}).json()
    assert shown["system"] == "S" and 'stop                           "a"' in shown["parameters"]
    r = api.post("/api/push", json={"model": name, "insecure": True, "stream": False})
    assert r.status_code == 200, r.text
    assert ("me/made", "v1") in reg.state.manifests


@pytest.fixture
def live_url(api: TestClient) -> Iterator[str]:
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def test_official_ollama_client_talks_to_our_routes(
    live_url: str, reg: RegistryServer, tiny_gguf: Path
) -> None:
    import ollama

    reg.state.add_model("library/tiny", "latest", [(MODEL, tiny_gguf.read_bytes())])
    client = ollama.Client(host=live_url)
    name = f"{reg.host}/library/tiny"
    statuses = [p.status for p in client.pull(name, insecure=True, stream=True)]
    assert statuses[-1] == "success"
    assert client.show(name).details.family == "llama"
    client.copy(name, "other")
    client.delete("other")
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("other")
    assert info.value.status_code == 404
