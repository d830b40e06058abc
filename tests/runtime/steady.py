"""What every attack test checks after it: the server is up, and it gave back its threads and memory.

The test server runs in this process (uvicorn in a thread), so the process's thread count and
resident memory are the server's. Idle worker threads of the thread pool and generation threads
take a moment to end, so the check waits for the counts to come back (up to ``settle_s``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Iterator

import httpx
import psutil

__all__ = ["stays_steady", "assert_one_line_error"]


def _counts() -> tuple[int, int]:
    gc.collect()
    p = psutil.Process()
    return p.num_threads(), p.memory_info().rss


def _within(now: int, before: int, share: float = 0.10) -> bool:
    # At least one thread of slack: 10% of a dozen threads is less than one.
    return now <= before + max(1, int(before * share))


@contextlib.contextmanager
def stays_steady(url: str, settle_s: float = 30.0) -> Iterator[None]:
    """Around an attack: afterwards ``/api/version`` answers, and thread count and RSS are back
    within 10% of what they were before."""
    threads0, rss0 = _counts()
    yield
    deadline = time.monotonic() + settle_s
    while True:
        threads, rss = _counts()
        if (_within(threads, threads0) and _within(rss, rss0)) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    r = httpx.get(f"{url}/api/version", timeout=10)
    assert r.status_code == 200 and r.json()["version"]
    assert _within(threads, threads0), f"threads {threads0} -> {threads}"
    assert _within(rss, rss0), f"RSS {rss0 >> 20} MiB -> {rss >> 20} MiB"


def assert_one_line_error(r: httpx.Response, status: int, *words: str) -> str:
    """The response is ``status`` with a one-line JSON error (Ollama's or OpenAI's shape) that
    holds each of ``words``; returns the message."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    err = body["error"]
    message = err["message"] if isinstance(err, dict) else err
    assert isinstance(message, str) and message and "\n" not in message
    assert "Traceback" not in r.text and len(json.dumps(body)) < 2000
    for w in words:
        assert w in message, (w, message)
    return message
