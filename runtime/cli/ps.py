"""``offload ps`` and ``offload stop``: the loaded models, and unloading one."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click

from offload.planner.errors import OffloadError

__all__ = ["register", "processor", "until", "ps_rows", "ps_notes", "PS_HEADER"]


def processor(size: int, size_vram: int) -> str:
    """Ollama's PROCESSOR column: ``100% GPU``, ``48%/52% CPU/GPU`` or ``100% CPU``."""
    if size <= 0 or size_vram <= 0:
        return "100% CPU"
    if size_vram >= size:
        return "100% GPU"
    gpu = round(100 * size_vram / size)
    return f"{100 - gpu}%/{gpu}% CPU/GPU"


def until(expires_at: str, now: datetime | None = None) -> str:
    """Ollama's UNTIL column: ``4 minutes from now``, ``Forever``, ``Stopping...``."""
    when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    now = now or datetime.now(UTC)
    left_s = (when - now).total_seconds()
    if when.year >= 2100:
        return "Forever"
    if left_s <= 0:
        return "Stopping..."
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if left_s >= size:
            n = int(left_s // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    n = int(left_s)
    return "Less than a second from now" if n < 1 else f"{n} second{'s' if n != 1 else ''} from now"


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 10 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


PS_HEADER = ("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "PARALLEL", "PID", "UNTIL")


def ps_rows(models: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """Table rows (``PS_HEADER``'s columns: Ollama's, plus each runner's sequences and process)."""
    return [
        (
            m["name"],
            m.get("digest", "")[:12],
            _human_bytes(m.get("size", 0)),
            processor(m.get("size", 0), m.get("size_vram", 0)),
            str(m.get("context_length", "")),
            str(m.get("parallel", 1)),
            str(m.get("pid", "")),
            until(m["expires_at"]),
        )
        for m in models
    ]


def ps_notes(models: list[dict[str, Any]]) -> list[str]:
    """What a healing load gave up, or turned off on this machine, per model."""
    return [
        f"{m['name']}: {s}"
        for m in models
        for s in [*(m.get("gave_up") or []), *(m.get("safety") or [])]
    ]


def _loaded(client: Any) -> list[dict[str, Any]]:
    """``/api/ps``'s models, each an object; an answer of another shape is one line of error."""
    models = client.get("/api/ps").get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise OffloadError(
            f"{client.base_url}/api/ps did not answer a list of models; is OFFLOAD_HOST the "
            "address of another program?"
        )
    return models


@click.command("ps")
def ps_command() -> None:
    """List the models loaded now."""
    from offload.runtime.cli.client import ensure_server

    client = ensure_server()
    models = _loaded(client)
    try:
        rows = ps_rows(models)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise OffloadError(
            f"{client.base_url}/api/ps answered models this offload cannot read; is OFFLOAD_HOST "
            "the address of another program, or of another version of offload?"
        ) from None
    header = PS_HEADER
    widths = [max(len(str(r[i])) for r in [header, *rows]) + 3 for i in range(len(header))]
    for r in [header, *rows]:
        click.echo("".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for note in ps_notes(models):
        click.echo(note)


@click.command("stop")
@click.argument("model")
def stop_command(model: str) -> None:
    """Unload a model now."""
    from offload.runtime.cli.client import ensure_server

    client = ensure_server()
    loaded = {m.get("name") for m in _loaded(client)}
    if model not in loaded and f"{model}:latest" not in loaded:
        raise OffloadError(f"couldn't find a running model named {model!r} to stop")
    client.post("/api/generate", {"model": model, "keep_alive": 0})


def register(group: click.Group) -> None:
    """Add ``ps`` and ``stop`` to the CLI."""
    group.add_command(ps_command)
    group.add_command(stop_command)
