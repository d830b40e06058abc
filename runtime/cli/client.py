"""The CLI's way to the server: a small HTTP client, and starting a server when none answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from offload.planner.errors import OffloadError
from offload.runtime import config
from offload.runtime.errors import ServerUnavailable

__all__ = ["ApiError", "Client", "ensure_server"]


class ApiError(OffloadError):
    """The server answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class Client:
    """Talks to an offload server at ``base_url``."""

    def __init__(self, base_url: str | None = None, timeout_s: float = 600.0) -> None:
        self.base_url = base_url or config.host().url
        self._http = httpx.Client(
            base_url=self.base_url, timeout=httpx.Timeout(timeout_s, connect=2.0)
        )

    def ping(self) -> bool:
        """True when a server answers at the base URL."""
        try:
            return self._http.get("/", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        if r.status_code >= 400:
            r.read()
            try:
                msg = r.json().get("error") or r.text
            except ValueError:
                msg = r.text or f"HTTP {r.status_code}"
            raise ApiError(r.status_code, msg)

    def get(self, path: str) -> Any:
        """GET a JSON document."""
        r = self._http.get(path)
        self._raise(r)
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST and return the (non-streamed) JSON answer."""
        r = self._http.post(path, json={**body, "stream": False})
        self._raise(r)
        return r.json()

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield each NDJSON object as it arrives; closing the iterator closes the stream."""
        with self._http.stream("POST", path, json=body) as r:
            self._raise(r)
            for line in r.iter_lines():
                if not line.strip():
                    continue
                obj = json.loads(line)
                if "error" in obj:
                    raise ApiError(500, obj["error"])
                yield obj

    def close(self) -> None:
        """Close connections."""
        self._http.close()


def _tail(path: Path, n: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def ensure_server(wait_s: float = 60.0) -> Client:
    """A client of a running server, starting ``offload serve`` in the background if none answers."""
    client = Client()
    if client.ping():
        return client
    log_path = config.log_dir() / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "offload.runtime.cli", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if client.ping():
            return client
        if proc.poll() is not None:
            raise ServerUnavailable(
                f"the server could not start (exit code {proc.returncode}); see {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.1)
    raise ServerUnavailable(
        f"the server did not answer at {client.base_url} within {wait_s:.0f}s; see {log_path}"
    )
