"""Blob uploads (``POST /api/blobs/:digest``) that no client can use to pin or fill the server.

The body is read in the event loop and written in short thread calls, a megabyte at a time, so an
upload holds no thread while it waits for bytes. A body that stops sending (for
``OFFLOAD_UPLOAD_TIMEOUT``) or trickles (slower than 16 KiB/s once that time has passed) is cut
off with 408; a body larger than ``OFFLOAD_MAX_UPLOAD_SIZE`` gets 413, at once when its
``Content-Length`` says so; more than ``OFFLOAD_MAX_UPLOADS`` at once get 503; one the disk cannot
hold gets 507. Whatever ends an upload (those, a client that hangs up, a wrong digest) removes its
temporary file before the answer goes out.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request

from offload.models.errors import DiskFull
from offload.models.store import BlobWriter, Store
from offload.planner.errors import OffloadError
from offload.runtime import config

__all__ = ["TooManyUploads", "UploadTooLarge", "UploadTooSlow", "receive_blob"]

_FLUSH_BYTES = 1 << 20
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
        self.threads = anyio.CapacityLimiter(limit)


def _slots(request: Request) -> _Slots:
    state: Any = request.app.state
    slots = getattr(state, "upload_slots", None)
    if slots is None:
        slots = state.upload_slots = _Slots(config.max_uploads())
    return slots


def _declared_bytes(request: Request) -> int | None:
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def _pump(request: Request, writer: BlobWriter, cap: int, limiter: Any) -> None:
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
            await anyio.to_thread.run_sync(writer.write, bytes(buf), limiter=limiter)
            buf.clear()
    if buf:
        await anyio.to_thread.run_sync(writer.write, bytes(buf), limiter=limiter)


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
    writer: BlobWriter | None = None
    try:
        writer = await anyio.to_thread.run_sync(
            store.blob_writer, digest, limiter=slots.threads
        )
        await _pump(request, writer, cap, slots.threads)
        await anyio.to_thread.run_sync(writer.commit, limiter=slots.threads)
        writer = None
    finally:
        if writer is not None:
            writer.abort()  # fast (close and unlink), so it is safe even while being cancelled
        slots.active -= 1
