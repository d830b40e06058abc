"""``offload ps`` and ``offload stop`` against the real server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from click.testing import CliRunner

from offload.runtime.cli import cli
from offload.runtime.cli.ps import processor, until
from tests.runtime.conftest import MODEL, Running


def test_processor_column_reads_like_ollamas() -> None:
    assert processor(1000, 0) == "100% CPU"
    assert processor(1000, 1000) == "100% GPU"
    assert processor(1000, 520) == "48%/52% CPU/GPU"


def test_until_column_reads_like_ollamas() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert until((now + timedelta(minutes=4, seconds=30)).isoformat(), now) == "4 minutes from now"
    assert until("2100-01-01T00:00:00Z", now) == "Forever"
    assert until((now - timedelta(seconds=1)).isoformat(), now) == "Stopping..."


def test_ps_lists_a_loaded_model_and_stop_unloads_it(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFLOAD_HOST", server.url.removeprefix("http://"))
    httpx.post(
        f"{server.url}/api/generate",
        timeout=60,
        json={
            "model": MODEL,
            "prompt": "hi",
            "stream": False,
            "keep_alive": "10m",
            "options": {"num_predict": 1},
        },
    )
    out = CliRunner().invoke(cli, ["ps"])
    assert out.exit_code == 0, out.output
    header, *rows = out.output.splitlines()
    assert header.split() == [
        "NAME",
        "ID",
        "SIZE",
        "PROCESSOR",
        "CONTEXT",
        "PARALLEL",
        "PID",
        "UNTIL",
    ]
    row = next(r for r in rows if r.startswith(MODEL))
    assert "100% CPU" in row and "minutes from now" in row
    pid = next(
        m["pid"] for m in httpx.get(f"{server.url}/api/ps").json()["models"] if m["name"] == MODEL
    )
    assert f" {pid} " in row
    assert CliRunner().invoke(cli, ["stop", MODEL]).exit_code == 0
    assert MODEL not in {m["name"] for m in httpx.get(f"{server.url}/api/ps").json()["models"]}
    again = CliRunner().invoke(cli, ["stop", MODEL])
    assert again.exit_code != 0 and "couldn't find a running model" in again.output
