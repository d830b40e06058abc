"""Pulling and pushing against a real registry server on 127.0.0.1, faults included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from offload.models import registry
from offload.models.errors import (
    AuthRequired,
    DigestMismatch,
    DiskFull,
    DownloadInterrupted,
    RegistryModelNotFound,
    RegistryUnreachable,
)
from offload.models.names import parse_name
from offload.models.store import Store
from tests.registry_server import RegistryServer, gguf_bytes, sha256

MODEL = "application/vnd.ollama.image.model"
TEMPLATE = "application/vnd.ollama.image.template"


def weights(n_bytes: int, seed: int = 1) -> bytes:
    # A real (tiny) GGUF of random, incompressible-looking data: pulls check model layers.
    return gguf_bytes(n_bytes, seed)


def blob_path(root: Path, digest: str) -> Path:
    return Store(root).blob_path(digest)


def manifest_path(root: Path, name: object) -> Path:
    return Store(root).manifest_path(name)  # type: ignore[arg-type]


def add_tiny(reg: RegistryServer, n_bytes: int = 300_000, repo: str = "library/tiny") -> bytes:
    data = weights(n_bytes)
    reg.state.add_model(
        repo,
        "latest",
        [(MODEL, data), (TEMPLATE, b"{{ .Prompt }}")],
        config=b'{"model_format":"gguf"}',
    )
    return data


def test_pull_then_blobs_and_manifest_are_in_the_store(reg: RegistryServer, tmp_path: Path) -> None:
    data = add_tiny(reg)
    reg.state.redirect_blobs = True
    events: list[dict] = []
    name = f"{reg.host}/library/tiny"
    manifest = registry.pull(Store(tmp_path), name, insecure=True, progress=events.append)
    assert blob_path(tmp_path, sha256(data)).read_bytes() == data
    raw = manifest_path(tmp_path, parse_name(name)).read_bytes()
    assert raw == reg.state.manifests[("library/tiny", "latest")]
    assert json.loads(raw) == manifest
    assert any(path.startswith("/cdn/") for _, path in reg.state.requests), "redirect was followed"
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    last_for_model = [e for e in events if e.get("digest") == sha256(data)][-1]
    assert last_for_model == {
        "status": f"pulling {sha256(data)[7:19]}",
        "digest": sha256(data),
        "total": len(data),
        "completed": len(data),
    }
    assert not list((tmp_path / "blobs").glob("*-partial*"))


@pytest.mark.parametrize("chunk_bytes", [registry.CHUNK_BYTES, 64 * 1024], ids=["stream", "chunks"])
def test_pull_resumes_after_dropped_connection(
    reg: RegistryServer, tmp_path: Path, chunk_bytes: int
) -> None:
    data = add_tiny(reg, 1_000_000)
    reg.state.drop_after_bytes[sha256(data)] = min(150_000, chunk_bytes // 2)
    name = f"{reg.host}/library/tiny"
    with pytest.raises(DownloadInterrupted, match="run pull again to resume"):
        registry.pull(Store(tmp_path), name, insecure=True, retries=0, chunk_bytes=chunk_bytes)
    assert not manifest_path(tmp_path, parse_name(name)).exists()
    assert not blob_path(tmp_path, sha256(data)).exists()
    served_before = reg.state.bytes_served
    registry.pull(Store(tmp_path), name, insecure=True, retries=0, chunk_bytes=chunk_bytes)
    served_second = reg.state.bytes_served - served_before
    assert served_second < len(data), "the second pull re-downloaded the whole blob"
    assert blob_path(tmp_path, sha256(data)).read_bytes() == data
    assert manifest_path(tmp_path, parse_name(name)).exists()


def test_pull_retries_an_interrupted_blob_by_itself(reg: RegistryServer, tmp_path: Path) -> None:
    data = add_tiny(reg, 500_000)
    reg.state.drop_after_bytes[sha256(data)] = 100_000
    registry.pull(
        Store(tmp_path), f"{reg.host}/library/tiny", insecure=True, chunk_bytes=128 * 1024
    )
    assert blob_path(tmp_path, sha256(data)).read_bytes() == data


def test_pull_starts_over_when_server_answers_200_to_a_range(
    reg: RegistryServer, tmp_path: Path
) -> None:
    data = add_tiny(reg, 400_000)
    partial = blob_path(tmp_path, sha256(data)).with_name(
        blob_path(tmp_path, sha256(data)).name + "-partial"
    )
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"garbage that must not be kept" * 10)
    reg.state.ignore_range = True
    for chunk_bytes in (registry.CHUNK_BYTES, 64 * 1024):
        registry.pull(
            Store(tmp_path), f"{reg.host}/library/tiny", insecure=True, chunk_bytes=chunk_bytes
        )
        assert blob_path(tmp_path, sha256(data)).read_bytes() == data
        blob_path(tmp_path, sha256(data)).unlink()


def test_corrupt_blob_is_refused_and_nothing_of_the_model_is_left(
    reg: RegistryServer, tmp_path: Path
) -> None:
    data = add_tiny(reg)
    reg.state.corrupt.add(sha256(data))
    name = f"{reg.host}/library/tiny"
    with pytest.raises(DigestMismatch):
        registry.pull(Store(tmp_path), name, insecure=True)
    assert not manifest_path(tmp_path, parse_name(name)).exists()
    assert not blob_path(tmp_path, sha256(data)).exists()
    assert not list((tmp_path / "blobs").glob("*-partial*"))


def test_concurrent_pulls_of_one_model_download_each_blob_once(
    reg: RegistryServer, tmp_path: Path
) -> None:
    data = add_tiny(reg, 2_000_000)
    name = f"{reg.host}/library/tiny"
    errors: list[BaseException] = []

    def go() -> None:
        try:
            registry.pull(Store(tmp_path), name, insecure=True, chunk_bytes=256 * 1024)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert blob_path(tmp_path, sha256(data)).read_bytes() == data
    total = sum(len(b) for b in reg.state.blobs.values())
    assert reg.state.bytes_served == total


@pytest.mark.parametrize("status", ["401", "403"])
def test_auth_required_is_a_clear_error(reg: RegistryServer, tmp_path: Path, status: str) -> None:
    add_tiny(reg)
    reg.state.require_auth = status
    with pytest.raises(AuthRequired, match=f"model requires authentication: .* answered {status}"):
        registry.pull(Store(tmp_path), f"{reg.host}/library/tiny", insecure=True)
    assert not (tmp_path / "manifests").exists()


def test_missing_model_is_not_found(reg: RegistryServer, tmp_path: Path) -> None:
    with pytest.raises(
        RegistryModelNotFound, match='model "127.0.0.1:.*/library/nope:latest" not found'
    ):
        registry.pull(Store(tmp_path), f"{reg.host}/library/nope", insecure=True)


def test_unreachable_registry_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RegistryUnreachable, match=f"registry 127.0.0.1:{port} is unreachable"):
        registry.pull(Store(tmp_path), f"127.0.0.1:{port}/library/tiny", insecure=True, timeout_s=5)


def test_disk_full_during_pull_keeps_a_resumable_partial_and_no_manifest(
    reg: RegistryServer, tmp_path: Path
) -> None:
    data = add_tiny(reg, 3_000_000)
    name = f"{reg.host}/library/tiny"
    # A file-size limit makes the kernel refuse writes past 1 MB, as a full disk does.
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
        "from offload.models import registry\n"
        "from offload.models.errors import DiskFull\n"
        "from offload.models.store import Store\n"
        "try:\n"
        f"    registry.pull(Store({str(tmp_path)!r}), {name!r}, insecure=True, retries=0)\n"
        "except DiskFull as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert proc.returncode == 3, proc.stderr
    assert "disk full while writing" in proc.stdout
    assert not manifest_path(tmp_path, parse_name(name)).exists()
    assert not blob_path(tmp_path, sha256(data)).exists()
    registry.pull(Store(tmp_path), name, insecure=True)
    assert blob_path(tmp_path, sha256(data)).read_bytes() == data
    assert DiskFull.http_status == 507


def test_push_uploads_missing_blobs_then_manifest(reg: RegistryServer, tmp_path: Path) -> None:
    data = add_tiny(reg)
    src = f"{reg.host}/library/tiny"
    registry.pull(Store(tmp_path), src, insecure=True)
    raw = manifest_path(tmp_path, parse_name(src)).read_bytes()
    reg.state.blobs.pop(sha256(data))  # make the registry lack one blob so it must be uploaded
    events: list[dict] = []
    registry.push(
        Store(tmp_path),
        f"{reg.host}/me/copy:v1",
        source=src,
        insecure=True,
        progress=events.append,
        chunk_bytes=100_000,
    )
    assert reg.state.manifests[("me/copy", "v1")] == raw
    assert reg.state.blobs[sha256(data)] == data
    assert events[-1] == {"status": "success"}
    pushed = [e for e in events if e.get("digest") == sha256(data)]
    assert pushed[-1]["completed"] == len(data) and len(pushed) >= 3


def test_pull_copies_blobs_the_ollama_store_already_has(
    reg: RegistryServer, tmp_path: Path
) -> None:
    data = add_tiny(reg)
    name = f"{reg.host}/library/tiny"
    registry.pull(Store(tmp_path / "ollama"), name, insecure=True)
    served = reg.state.bytes_served
    ours = Store(tmp_path / "ours", read_only_roots=[tmp_path / "ollama"])
    registry.pull(ours, name, insecure=True)
    assert reg.state.bytes_served == served, "blobs were downloaded again"
    assert ours.blob_path(sha256(data)).read_bytes() == data


def test_a_killed_pull_leaves_no_model_and_resumes(reg: RegistryServer, tmp_path: Path) -> None:
    import signal
    import time

    data = add_tiny(reg, 2_000_000)
    reg.state.stall_after_bytes[sha256(data)] = 700_000
    name = f"{reg.host}/library/tiny"
    code = (
        "from offload.models import registry\n"
        "from offload.models.store import Store\n"
        f"registry.pull(Store({str(tmp_path)!r}), {name!r}, insecure=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    partial = blob_path(tmp_path, sha256(data)).with_name(
        blob_path(tmp_path, sha256(data)).name + "-partial"
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        partial.exists() and partial.stat().st_size >= 700_000
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert partial.stat().st_size == 700_000
    assert not manifest_path(tmp_path, parse_name(name)).exists(), "a killed pull left a manifest"
    assert not blob_path(tmp_path, sha256(data)).exists()
    served = reg.state.bytes_served
    registry.pull(Store(tmp_path), name, insecure=True)
    assert reg.state.bytes_served - served < len(data) - 600_000
    assert blob_path(tmp_path, sha256(data)).read_bytes() == data


def test_a_chunked_partial_resumes_as_a_single_stream(reg: RegistryServer, tmp_path: Path) -> None:
    data = add_tiny(reg, 1_000_000)
    reg.state.drop_after_bytes[sha256(data)] = 50_000
    name = f"{reg.host}/library/tiny"
    with pytest.raises(DownloadInterrupted):
        registry.pull(
            Store(tmp_path), name, insecure=True, retries=0, chunk_bytes=100_000, parallel=2
        )
    # Pull again with settings that make the blob a single stream: the chunk state is honoured.
    registry.pull(Store(tmp_path), name, insecure=True)
    assert blob_path(tmp_path, sha256(data)).read_bytes() == data
