"""The responses this server remembers, so that a request can continue one by its id.

OpenAI's Responses API lets a request name a ``previous_response_id`` instead of resending the
conversation. Here those conversations live in memory only, and boundedly: the most recent
``MAX_KEPT`` responses, each for ``MAX_AGE_S`` after it was made. Older ones are forgotten (a
request naming one is refused), and a restart forgets them all.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_AGE_S", "MAX_KEPT", "KeptResponse", "ResponseMemory"]

MAX_KEPT = 100
MAX_AGE_S = 3600.0


@dataclass(frozen=True)
class KeptResponse:
    """A finished response: its conversation in ``service.chat``'s message shape, and its object."""

    messages: tuple[dict[str, Any], ...]
    response: dict[str, Any]
    kept_at_s: float


class ResponseMemory:
    """A bounded, thread-safe map of response id to ``KeptResponse``: by count and by age."""

    def __init__(
        self,
        max_kept: int = MAX_KEPT,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_kept = max_kept
        self.max_age_s = max_age_s
        self._clock = clock
        self._items: OrderedDict[str, KeptResponse] = OrderedDict()
        self._lock = threading.Lock()

    def _drop_expired(self) -> None:
        limit = self._clock() - self.max_age_s
        while self._items:
            oldest = next(iter(self._items.values()))
            if oldest.kept_at_s > limit:
                break
            self._items.popitem(last=False)

    def keep(self, rid: str, messages: list[dict[str, Any]], response: dict[str, Any]) -> None:
        """Remember a response; the oldest is forgotten when more than ``max_kept`` are kept."""
        with self._lock:
            self._items[rid] = KeptResponse(tuple(messages), response, self._clock())
            self._items.move_to_end(rid)
            self._drop_expired()
            while len(self._items) > self.max_kept:
                self._items.popitem(last=False)

    def get(self, rid: str) -> KeptResponse | None:
        """The kept response, or None when it was never kept, was forgotten or has expired."""
        with self._lock:
            self._drop_expired()
            return self._items.get(rid)

    def forget(self, rid: str) -> bool:
        """Forget a response; True when it was kept."""
        with self._lock:
            return self._items.pop(rid, None) is not None
