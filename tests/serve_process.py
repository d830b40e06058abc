"""A real ``offload serve`` in a child process, watched from outside as an attacker would see it.

Attack tests run against it and then check that it is still whole: it answers ``/api/version``,
and its thread count and memory come back to within 10% of where they were before the attack.
``limit_file_bytes`` starts it under a file-size limit, which makes the kernel refuse writes past
that size as a full disk does (SIGXFSZ ignored, so the writes fail with EFBIG instead).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from tests.conftest import free_port

__all__ = ["ServeProcess"]


class ServeProcess:
    """``python -m offload.runtime.cli serve`` on a free loopback port with extra environment."""

    def __init__(
        self, home: Path, env: dict[str, str] | None = None, limit_file_bytes: int | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.env = {
            **os.environ,
            "OFFLOAD_HOME": str(home),
            "OLLAMA_MODELS": str(home / "no-ollama"),
            "OFFLOAD_HOST": f"127.0.0.1:{self.port}",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.env.pop("OFFLOAD_MODELS", None)
        self.limit_file_bytes = limit_file_bytes
        self.log = home / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _limits(self) -> None:  # runs in the child before exec
        if self.limit_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit_file_bytes,) * 2)

    def __enter__(self) -> ServeProcess:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "offload.runtime.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limits,
            )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"offload serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("offload serve did not start")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ps(self) -> psutil.Process:
        """The server process as psutil sees it."""
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def stop(self, timeout_s: float = 30) -> float:
        """SIGTERM the server; return how long it took to exit (killing it if it does not)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return float("inf")
        return time.monotonic() - t0

    def answers(self) -> bool:
        """True when ``/api/version`` answers 200 within 5 s."""
        try:
            return httpx.get(f"{self.url}/api/version", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def vitals(self) -> tuple[int, int]:
        """(threads, resident bytes) of the server process."""
        p = self.ps
        return p.num_threads(), p.memory_info().rss

    @contextmanager
    def unharmed(self, settle_s: float = 30.0) -> Iterator[None]:
        """Around an attack: afterwards the server answers and its threads and memory settle back
        to within 10% of before (anyio's idle worker threads exit after 10 s, so this waits)."""
        assert self.answers(), "the server was not answering before the attack"
        threads0, rss0 = self.vitals()
        yield
        assert self.answers(), f"the server stopped answering: {self.log.read_text()[-2000:]}"
        deadline = time.monotonic() + settle_s
        while True:
            threads, rss = self.vitals()
            if threads <= threads0 * 1.1 and rss <= rss0 * 1.1:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"after the attack: {threads} threads (before {threads0}), "
                    f"{rss >> 20} MiB resident (before {rss0 >> 20} MiB)"
                )
            time.sleep(0.5)
