"""Blob uploads (``POST /api/blobs/:digest``) that no client can use to pin or fill the server.

The body is read in the event loop and handed, a megabyte at a time, to a writer thread of the
upload's own, which hashes and writes it and ends with the upload whatever happens, so no thread
outlives its upload or waits on a client that is gone. A body that stops sending (for
``OFFLOAD_UPLOAD_TIMEOUT``) or trickles (slower than 16 KiB/s once that time has passed) is cut
off with 408; a body larger than ``OFFLOAD_MAX_UPLOAD_SIZE`` gets 413, at once when its
``Content-Length`` says so; more than ``OFFLOAD_MAX_UPLOADS`` at once get 503; one the disk cannot
hold gets 507. Whatever ends an upload (those, a client that hangs up, a wrong digest) removes its
temporary file before the answer goes out.
"""

from __future__ import annotations

import asyncio
import ctypes
import queue
import shutil
import sys
import threading
import time
from typing import Any

from fastapi import Request

from offload.models.errors import DiskFull
from offload.models.store import BlobWriter, Store
from offload.planner.errors import OffloadError
from offload.runtime import config

__all__ = ["TooManyUploads", "UploadTooLarge", "UploadTooSlow", "receive_blob"]

_FLUSH_BYTES = 1 << 20
_QUEUE_CHUNKS = 4
_MIN_RATE_BPS = 16 << 10


class UploadTooLarge(OffloadError):
    """A blob upload larger than the server accepts."""

    http_status = 413

    def __init__(self, size_bytes: int, cap_bytes: int) -> None:
        super().__init__(
            f"upload of {size_bytes} bytes is larger than the {cap_bytes} this server accepts "
            "(OFFLOAD_MAX_UPLOAD_SIZE)"
        )


class UploadTooSlow(OffloadError):
    """A blob upload that stopped sending, or sends too slowly to ever finish."""

    http_status = 408


class TooManyUploads(OffloadError):
    """Every upload slot is taken."""

    http_status = 503

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} blob uploads are already in progress (OFFLOAD_MAX_UPLOADS); try again later"
        )


class _Slots:
    """Upload slots of one app; used from its event loop only, so a counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0


def _slots(request: Request) -> _Slots:
    state: Any = request.app.state
    slots = getattr(state, "upload_slots", None)
    if slots is None:
        slots = state.upload_slots = _Slots(config.max_uploads())
    return slots


def _declared_bytes(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


class _Writer:
    """The upload's thread: writes what the event loop hands it, then commits or drops the blob.

    The thread only ever waits on its queue, and the event loop always ends it (a final ``None``
    after setting ``commit`` or not), so it cannot be left waiting by a client that went away.
    """

    def __init__(self, store: Store, digest: str, loop: asyncio.AbstractEventLoop) -> None:
        self.store, self.digest, self.loop = store, digest, loop
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self.commit = False
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.finished: asyncio.Future[None] = loop.create_future()
        self.thread = threading.Thread(target=self._run, name="offload-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        writer: BlobWriter | None = None
        try:
            writer = self.store.blob_writer(self.digest)
            while (chunk := self.queue.get()) is not None and not self.stopped.is_set():
                writer.write(chunk)
            if self.commit and not self.stopped.is_set():
                writer.commit()
                writer = None
        except BaseException as e:  # noqa: BLE001 - handed to the event loop, which raises it
            self.error = e
            self.stopped.set()
        finally:
            if writer is not None:
                writer.abort()
            self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    async def put(self, chunk: bytes) -> None:
        """Hand over a chunk, waiting (without a thread) while the writer is behind."""
        while not self.stopped.is_set():
            try:
                self.queue.put_nowait(chunk)
                return
            except queue.Full:
                await asyncio.sleep(0.002)
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def end(self, commit: bool) -> None:
        """Tell the thread to finish; never blocks (a full queue is drained by the thread)."""
        self.commit = commit
        if not commit:
            self.stopped.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            self.stopped.set()  # the thread sees this after the chunk in hand, and drops the blob


async def _pump(request: Request, writer: _Writer, cap: int) -> None:
    idle_s = config.upload_timeout_s()
    start = time.monotonic()
    received = 0
    buf = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout=idle_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise UploadTooSlow(
                f"upload sent nothing for {idle_s:g}s after {received} bytes; it was dropped "
                "(OFFLOAD_UPLOAD_TIMEOUT)"
            ) from None
        received += len(chunk)
        if received > cap:
            raise UploadTooLarge(received, cap)
        elapsed = time.monotonic() - start
        if elapsed > idle_s + received / _MIN_RATE_BPS:
            raise UploadTooSlow(
                f"upload sent {received} bytes in {elapsed:.0f}s, too slowly to finish; it was "
                "dropped"
            )
        buf += chunk
        if len(buf) >= _FLUSH_BYTES:
            await writer.put(bytes(buf))
            buf.clear()
    if buf:
        await writer.put(bytes(buf))


def _libc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _libc_trim() if sys.platform.startswith("linux") else None


def _give_back_heap() -> None:
    """Return the heap pages that megabyte chunks left free to the system (glibc keeps them:
    after freeing large blocks it raises its mmap threshold, and later chunks come from the heap),
    so that uploads do not ratchet the server's memory up."""
    if _malloc_trim is not None:
        _malloc_trim(0)


async def receive_blob(request: Request, store: Store, digest: str) -> None:
    """Store the request body as the blob ``digest``; typed errors for every way it can fail."""
    cap = config.max_upload_bytes()
    declared = _declared_bytes(request)
    if declared is not None:
        if declared > cap:
            raise UploadTooLarge(declared, cap)
        store.blobs_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(store.blobs_dir).free
        if declared > free:
            raise DiskFull(f"blob {digest[:19]}", total_bytes=declared, free_bytes=free)
    slots = _slots(request)
    if slots.active >= slots.limit:
        raise TooManyUploads(slots.limit)
    slots.active += 1
    writer = _Writer(store, digest, asyncio.get_running_loop())
    committed = False
    try:
        await _pump(request, writer, cap)
        writer.end(commit=True)
        committed = True
        await asyncio.shield(writer.finished)
        writer.raise_error()
    finally:
        if not committed:
            writer.end(commit=False)
        slots.active -= 1
        if slots.active == 0:
            _give_back_heap()
