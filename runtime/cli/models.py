"""CLI commands of the model library: pull, push, create, show, cp, rm, list.

Thin: each parses its arguments, calls an ``offload.models`` function on the configured store,
and formats the result. Errors are ``OffloadError``s that the ``offload`` group turns into one
line and an exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from offload.models import embedded, registry
from offload.models.create import create
from offload.models.modelfile import parse_modelfile
from offload.models.show import modelfile_text, show
from offload.runtime.serving.planning import list_models, open_store

__all__ = ["register", "open_store", "human_bytes", "human_ago"]


def human_bytes(n: int) -> str:
    """Decimal units as Ollama prints them: ``253 MB``, ``4.1 GB``."""
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            value = n / div
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"


def human_ago(when: datetime, now: datetime | None = None) -> str:
    """``5 minutes ago`` style."""
    seconds = max(0.0, ((now or datetime.now(UTC)) - when).total_seconds())
    for unit, size in (("year", 31536000), ("month", 2592000), ("week", 604800), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):  # fmt: skip
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago" if seconds >= 1 else "Less than a second ago"


@contextmanager
def _progress_bars() -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress callback drawing one bar per layer (size, speed, ETA) and status lines."""
    console = Console(stderr=True)
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}

    def on(event: dict[str, Any]) -> None:
        digest = event.get("digest")
        if digest:
            if digest not in tasks:
                tasks[digest] = bars.add_task(event["status"], total=event.get("total") or None)
            bars.update(tasks[digest], completed=event.get("completed", 0))
        else:
            bars.console.print(event.get("status", ""))

    with bars:
        yield on


def _run_with_bars(fn: Callable[[Callable[[dict[str, Any]], None]], Any]) -> Any:
    try:
        with _progress_bars() as on:
            return fn(on)
    except KeyboardInterrupt:
        click.echo(
            "Interrupted; partial downloads are kept, run the command again to resume.", err=True
        )
        sys.exit(130)


@click.command()
@click.argument("name")
@click.option("--insecure", is_flag=True, help="Allow a plain-http registry.")
def pull(name: str, insecure: bool) -> None:
    """Pull a model from a registry (registry.ollama.ai, hf.co, ...)."""
    store = open_store()
    _run_with_bars(lambda on: registry.pull(store, name, insecure=insecure, progress=on))


@click.command()
@click.argument("name")
@click.option("--insecure", is_flag=True, help="Allow a plain-http registry.")
def push(name: str, insecure: bool) -> None:
    """Push a model to a registry."""
    store = open_store()
    _run_with_bars(lambda on: registry.push(store, name, insecure=insecure, progress=on))


# The largest Modelfile read: its texts (SYSTEM, TEMPLATE, LICENSE, MESSAGEs) are at most 8 MiB
# a layer, and a device such as /dev/zero never ends.
MAX_MODELFILE_BYTES = 64 << 20


def _read_modelfile(path: Path) -> str:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MODELFILE_BYTES + 1)
    except OSError as e:
        raise click.ClickException(f"cannot read Modelfile {path}: {e.strerror or e}") from None
    if data.startswith(b"GGUF"):
        raise click.ClickException(
            f"{path} is a GGUF model file, not a Modelfile; write a Modelfile with the line "
            f"FROM {path} and pass that with -f"
        )
    if len(data) > MAX_MODELFILE_BYTES:
        raise click.ClickException(
            f"Modelfile {path} is larger than {MAX_MODELFILE_BYTES >> 20} MiB; "
            "a Modelfile holds instructions, FROM names the weights"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise click.ClickException(
            f"Modelfile {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


@click.command("create")
@click.argument("name")
@click.option(
    "-f",
    "--file",
    "path",
    default="Modelfile",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The Modelfile to build from.",
)
@click.option("-q", "--quantize", default=None, help="Quantize F16/F32 weights, e.g. q4_K_M.")
def create_cmd(name: str, path: Path, quantize: str | None) -> None:
    """Create a model from a Modelfile."""
    text = _read_modelfile(path)
    store = open_store()
    mf = parse_modelfile(text)
    embedded.ensure(store, mf.from_)  # FROM gemma3:270m works before its first run
    quantizer = None
    if quantize:
        from offload.runtime.serving.quantize import quantize_gguf

        quantizer = quantize_gguf

    def on(event: dict[str, Any]) -> None:
        click.echo(event["status"], err=True)

    create(store, name, mf, base_dir=path.resolve().parent, quantize=quantize,
           quantizer=quantizer, progress=on)  # fmt: skip


@click.command("show")
@click.argument("name")
@click.option("--modelfile", "what", flag_value="modelfile", help="The Modelfile of the model.")
@click.option("--parameters", "what", flag_value="parameters", help="Its parameters.")
@click.option("--template", "what", flag_value="template", help="Its prompt template.")
@click.option("--system", "what", flag_value="system", help="Its system prompt.")
@click.option("--license", "what", flag_value="license", help="Its license.")
def show_cmd(name: str, what: str | None) -> None:
    """Show what a model is made of."""
    store = open_store()
    if what == "modelfile":
        click.echo(modelfile_text(store, name), nl=False)
        return
    info = show(store, name)
    if what:
        click.echo(info.get(what, ""))
        return
    d, mi = info["details"], info["model_info"]
    arch = d.get("family", "")
    rows = [("architecture", arch), ("parameters", d.get("parameter_size", "")),
            ("context length", mi.get(f"{arch}.context_length", "")),
            ("embedding length", mi.get(f"{arch}.embedding_length", "")),
            ("quantization", d.get("quantization_level", ""))]  # fmt: skip
    click.echo("  Model")
    for k, v in rows:
        if v != "":
            click.echo(f"    {k:<20}{v}")
    for title, key in (("Parameters", "parameters"), ("System", "system"), ("License", "license")):
        if info.get(key):
            click.echo(f"\n  {title}")
            for line in str(info[key]).strip().splitlines()[:6]:
                click.echo(f"    {line}")


@click.command("cp")
@click.argument("source")
@click.argument("destination")
def cp(source: str, destination: str) -> None:
    """Copy a model under a new name (blobs are shared)."""
    store = open_store()
    store.copy(source, destination)
    click.echo(f"copied '{source}' to '{destination}'")


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
def rm(names: tuple[str, ...]) -> None:
    """Remove models; blobs no other model uses are deleted."""
    store = open_store()
    for name in names:
        store.delete(name)
        click.echo(f"deleted '{name}'")


@click.command("list")
def list_cmd() -> None:
    """List models: ours, and those of an Ollama store read in place."""
    store = open_store()
    rows = [(m.name.display, m.digest[7:19], human_bytes(m.size_bytes), human_ago(m.modified_at))
            for m in list_models(store)]  # fmt: skip
    width = max([len(r[0]) for r in rows] + [4]) + 4
    click.echo(f"{'NAME':<{width}}{'ID':<16}{'SIZE':<10}MODIFIED")
    for name, ident, size, modified in rows:
        click.echo(f"{name:<{width}}{ident:<16}{size:<10}{modified}")


def register(group: click.Group) -> None:
    """Add the model commands to the ``offload`` group."""
    for cmd in (pull, push, create_cmd, show_cmd, cp, rm, list_cmd):
        group.add_command(cmd)
    if "ls" not in group.commands:
        group.add_command(list_cmd, "ls")
