"""What a generation takes and yields: sampling options, text pieces, stats, stop-string scanning.

Pure data and text handling, apart from the engine so that it can be used and tested without a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Sampling", "Piece", "Stats", "StopScanner", "TokenLogprob", "CancelEvent"]


@dataclass(frozen=True)
class Sampling:
    """Sampling options, with Ollama's defaults."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None
    num_predict: int = -1
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    # None: no log probabilities; k >= 0: each token's, with its k most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model, and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Ollama's and OpenAI's shape: token, logprob, bytes, top_logprobs."""
        return {
            "token": self.token,
            "logprob": self.logprob,
            "bytes": list(self.bytes),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in self.top
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLogprob:
        """Inverse of ``to_dict``."""
        top = tuple(
            (str(t.get("token", "")), float(t.get("logprob", 0.0)), tuple(t.get("bytes") or ()))
            for t in d.get("top_logprobs") or ()
        )
        return cls(
            str(d.get("token", "")), float(d.get("logprob", 0.0)), tuple(d.get("bytes") or ()), top
        )


@dataclass(frozen=True)
class Piece:
    """A piece of generated text (one or more tokens' worth)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Stats:
    """Counts and durations of one generation, as Ollama reports them."""

    prompt_eval_count: int = 0  # prompt tokens evaluated (a reused cached prefix is not counted)
    prompt_eval_s: float = 0.0
    eval_count: int = 0
    eval_s: float = 0.0
    done_reason: str = "stop"
    cached_tokens: int = 0  # prompt tokens whose cache was reused
    tokens: list[int] = field(default_factory=list)  # generated ids (when asked for)
    prompt_tokens: list[int] = field(
        default_factory=list
    )  # the prompt as evaluated (when asked for)
    max_gap_s: float = 0.0  # longest wait between two of this request's tokens
    alone: bool = True  # no other request shared its steps (its speeds are single-stream speeds)
    stop_sequence: str | None = None  # the stop string that ended it, if one did

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        """Stats from the runner's JSON (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CancelEvent(threading.Event):
    """An event that also calls back when set, so a waiting generation can be told at once.

    It also carries the other signal a streaming response needs: ``accept()``, called when the
    request has passed every check and waits only for the model, so the response can start (its
    status and headers go out; errors after that travel inside the stream).
    """

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []
        self._on_accept: list[Callable[[], None]] = []
        self._cb_lock = threading.Lock()
        self.accepted = threading.Event()

    def on_accept(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (once) when the request is accepted."""
        self._on_accept.append(fn)

    def accept(self) -> None:
        """The request is valid and queued for its model."""
        if not self.accepted.is_set():
            self.accepted.set()
            for fn in self._on_accept:
                fn()

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the event is set (at once if it already is)."""
        with self._cb_lock:
            self._callbacks.append(fn)
            done = self.is_set()
        if done:
            fn()

    def set(self) -> None:
        """Set the event and run the callbacks (each at most once)."""
        super().set()
        with self._cb_lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()


class StopScanner:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit: str | None = None  # the stop string that ended the text, once one has

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [(i, s) for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            at, self.hit = min(hits)
            out, self.buf = self.buf[:at], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self) -> str:
        """Whatever is held back, at the end of generation."""
        out, self.buf = self.buf, ""
        return out
