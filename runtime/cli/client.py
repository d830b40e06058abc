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
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError):  # a name IDNA cannot encode
            return False

    def _raise(self, r: httpx.Response) -> None:
        if r.status_code >= 400:
            r.read()
            try:
                got = r.json()
                msg = got.get("error") if isinstance(got, dict) else None
            except ValueError:
                msg = None
            if not isinstance(msg, str) or not msg:
                # Not one of ours (a proxy's HTML page, another program): its first words only.
                text = " ".join(r.text.split())[:200]
                msg = f"{self.base_url} answered HTTP {r.status_code}" + (
                    f": {text}" if text else ""
                )
            raise ApiError(r.status_code, msg)

    def _not_ours(self, path: str) -> OffloadError:
        return OffloadError(
            f"{self.base_url}{path} did not answer as an offload server does (no JSON object); "
            "is OFFLOAD_HOST the address of another program?"
        )

    def _json(self, r: httpx.Response, path: str) -> dict[str, Any]:
        self._raise(r)
        try:
            got = r.json()
        except ValueError:
            raise self._not_ours(path) from None
        if not isinstance(got, dict):
            raise self._not_ours(path)
        return got

    def _lost(self, e: httpx.HTTPError) -> ServerUnavailable:
        return ServerUnavailable(
            f"lost the connection to the server at {self.base_url} ({e or type(e).__name__}); "
            "is it still running? Its log is in the data dir's logs/server.log"
        )

    def get(self, path: str) -> dict[str, Any]:
        """GET a JSON object."""
        try:
            return self._json(self._http.get(path), path)
        except httpx.HTTPError as e:
            raise self._lost(e) from None

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST and return the (non-streamed) JSON answer."""
        try:
            return self._json(self._http.post(path, json={**body, "stream": False}), path)
        except httpx.HTTPError as e:
            raise self._lost(e) from None

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield each NDJSON object as it arrives; closing the iterator closes the stream."""
        try:
            with self._http.stream("POST", path, json=body) as r:
                self._raise(r)
                for line in r.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        raise self._not_ours(path) from None
                    if not isinstance(obj, dict):
                        raise self._not_ours(path)
                    if "error" in obj:
                        raise ApiError(500, str(obj["error"]))
                    yield obj
        except httpx.HTTPError as e:
            raise self._lost(e) from None

    def close(self) -> None:
        """Close connections."""
        self._http.close()


def _tail(path: Path, n: int = 8, start: int = 0) -> str:
    """The last ``n`` lines written to ``path`` from byte ``start`` on."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-n:])


def ensure_server(wait_s: float = 60.0) -> Client:
    """A client of a running server, starting ``offload serve`` in the background if none answers."""
    client = Client()
    if client.ping():
        return client
    log_path = config.log_dir() / "server.log"
    with log_path.open("ab") as log:
        start = log.tell()
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
            said = _tail(log_path, start=start)
            error = [line for line in said.splitlines() if line.startswith("Error: ")]
            if error:  # the server's own one-line reason (a bad setting, a port in use)
                raise ServerUnavailable(f"the server could not start: {error[-1][7:]}")
            raise ServerUnavailable(
                f"the server could not start (exit code {proc.returncode}); see {log_path}:\n{said}"
            )
        time.sleep(0.1)
    raise ServerUnavailable(
        f"the server did not answer at {client.base_url} within {wait_s:.0f}s; see {log_path}"
    )
