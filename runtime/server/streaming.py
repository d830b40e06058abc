"""Running a blocking generation in its own thread and streaming what it yields.

Generation holds a model for its whole length, so it runs to its end in a worker thread whatever
the client does: a client that goes away sets the cancel event, the engine stops within a token,
and the worker returns the model to the scheduler. The event loop never blocks on llama.cpp.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from starlette.responses import StreamingResponse

from offload.planner.errors import OffloadError
from offload.runtime.runner.generation import CancelEvent

__all__ = ["ThreadedStream", "CancellingStreamingResponse", "first_chunk", "stream_events"]

log = logging.getLogger(__name__)

_END = object()
_ACCEPTED = object()


class ThreadedStream:
    """Iterate ``make(cancel)`` in a thread; ``first()`` surfaces errors before any byte is sent."""

    def __init__(self, make: Callable[[threading.Event], Iterator[Any]]) -> None:
        self.cancel = CancelEvent()
        self.cancel.on_accept(lambda: self._put(_ACCEPTED))
        self._make = make
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="offload-generate", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _work(self) -> None:
        try:
            for item in self._make(self.cancel):
                self._put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the event loop to report
            self._put(e)
        finally:
            self._put(_END)

    async def next(self) -> Any:
        """The next item; raises what the worker raised; ``StopAsyncIteration`` at the end."""
        item = await self._queue.get()
        while item is _ACCEPTED:
            item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def start(self) -> Any:
        """Wait until the request is accepted or yields its first item; returns that item (None
        when it was accepted first or ended empty). Errors before either are raised here, so
        they can still get a status code."""
        item = await self._queue.get()
        if item is _ACCEPTED:
            return None
        if item is _END:
            self._queue.put_nowait(_END)
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                try:
                    yield await self.next()
                except StopAsyncIteration:
                    return
        finally:
            # Reached on normal end, on error, and when the client disconnects (the task is
            # cancelled): the worker sees the event at its next token and lets go of the model.
            self.cancel.set()


class CancellingStreamingResponse(StreamingResponse):
    """A streaming response that cancels its generation however it ends.

    Starlette ends a response whose client went away by raising out of ``__call__`` (or cancelling
    it); the body generator itself may not be closed until garbage collection, so the cancel is
    set here, where the end is certain.
    """

    def __init__(self, content: Any, stream: ThreadedStream, media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Send the stream; on any exit (done, disconnect, error) tell the worker to stop."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel.set()


async def first_chunk(ts: ThreadedStream) -> dict[str, Any] | None:
    """Wait until the request is accepted (queued for its model) or yields its first chunk, so that
    errors before then still get their status; the chunk, or None."""
    return await ts.start()


async def stream_events(
    ts: ThreadedStream,
    first: dict[str, Any] | None,
    convert: Callable[[dict[str, Any]], Iterable[bytes]],
    tail: Callable[[], Iterable[bytes]],
    on_error: Callable[[str], bytes],
) -> AsyncIterator[bytes]:
    """The bytes of a streamed answer: ``convert`` of each chunk, then ``tail()``.

    The headers are sent by then, so an error becomes ``on_error(message)``, the face's error
    event, and ends the stream; the generation is cancelled however the stream ends.
    """
    try:
        if first is not None:
            for b in convert(first):
                yield b
        async for c in ts:
            for b in convert(c):
                yield b
        for b in tail():
            yield b
    except OffloadError as e:
        yield on_error(str(e))
    except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
        log.exception("generation failed mid-stream")
        yield on_error(f"internal error: {e}")
    finally:
        ts.cancel.set()
