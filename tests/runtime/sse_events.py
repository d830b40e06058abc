"""Reading a server-sent-event stream as (event name, data) pairs, for tests that check its bytes."""

from __future__ import annotations

import json
from typing import Any

import httpx


def post_events(
    url: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[tuple[str | None, Any]]]:
    """POST ``body`` and read the answer's events: each ``event:`` name with its parsed ``data:``."""
    events: list[tuple[str | None, Any]] = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        name: str | None = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
                name = None
    return r, events
