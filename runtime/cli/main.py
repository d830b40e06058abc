"""The ``offload`` command: a thin face over the server and the library."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import click

from offload.planner.errors import OffloadError
from offload.runtime import __version__, config

__all__ = ["main", "cli"]


class _Group(click.Group):
    """Turns our errors into one-line messages and exit codes, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OffloadError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="offload")
@click.option("--verbose", "-v", "log_verbose", is_flag=True, hidden=True, help="Debug logging.")
def cli(log_verbose: bool) -> None:
    """Run large language models on the hardware you have, placed for speed."""
    logging.basicConfig(
        level=logging.DEBUG if log_verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# -- serve ------------------------------------------------------------------------------------


@cli.command()
def serve() -> None:
    """Start the server (OFFLOAD_HOST, default 127.0.0.1:11435)."""
    import uvicorn

    from offload.runtime.server.app import create_app
    from offload.runtime.server.connections import (
        BACKLOG,
        MAX_HEAD_BYTES,
        ConnectionLimits,
        protocol_class,
        raise_open_file_limit,
    )

    config.check()  # a bad OFFLOAD_* value fails here, not on the first request
    h = config.host()
    if h.scheme != "http":
        where = f"[{h.host}]" if ":" in h.host else h.host
        raise config.ConfigError(
            f"offload serve speaks plain http; set OFFLOAD_HOST={where}:{h.port} "
            "(and put a TLS proxy in front of it for https)"
        )
    _check_can_listen(h)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    limits = ConnectionLimits.from_env(raise_open_file_limit())
    uvicorn.run(
        create_app(),
        host=h.host,
        port=h.port,
        log_level="info",
        access_log=True,
        http=protocol_class(limits),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        backlog=BACKLOG,
    )


def _check_can_listen(h: config.Host) -> None:
    """Fail in one line, before the app starts, when ``OFFLOAD_HOST`` cannot be listened on (a
    name that does not resolve, a port in use, an address not on this machine); uvicorn would
    start the app first, then log the error among its own lines."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            h.host, h.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as e:
        raise config.ConfigError(
            f"OFFLOAD_HOST: cannot resolve {h.host!r} ({getattr(e, 'strerror', None) or e}); "
            "use an IP address of this machine, such as 127.0.0.1"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            hint = {
                errno.EADDRINUSE: "another program listens there; stop it or",
                errno.EACCES: "ports below 1024 need privileges;",
                errno.EADDRNOTAVAIL: "that address is not one of this machine's;",
            }.get(e.errno or 0, "")
            raise config.ConfigError(
                f"cannot listen on {h.host}:{h.port} ({e.strerror or e}): {hint} set "
                f"OFFLOAD_HOST to another address, e.g. 127.0.0.1:{config.DEFAULT_PORT + 1}"
            ) from None


# -- run --------------------------------------------------------------------------------------

_HELP = """Available commands:
  /set parameter NAME VALUE   Set a parameter (e.g. /set parameter temperature 0)
  /set system TEXT            Set the system message
  /set verbose | quiet        Show or hide statistics
  /clear                      Clear the conversation
  /bye                        Exit
  /?, /help                   This help

Use \"\"\" to begin and end a multi-line message."""


def _fmt_duration(ns: int) -> str:
    s = ns / 1e9
    return f"{s * 1000:.3f}ms" if s < 1 else f"{s:.3f}s"


def _print_stats(final: dict[str, Any]) -> None:
    pe, pd = final.get("prompt_eval_count", 0), final.get("prompt_eval_duration", 0)
    ec, ed = final.get("eval_count", 0), final.get("eval_duration", 0)
    lines = [
        ("total duration", _fmt_duration(final.get("total_duration", 0))),
        ("load duration", _fmt_duration(final.get("load_duration", 0))),
        ("prompt eval count", f"{pe} token(s)"),
        ("prompt eval duration", _fmt_duration(pd)),
        ("prompt eval rate", f"{pe / (pd / 1e9):.2f} tokens/s" if pd else "n/a"),
        ("eval count", f"{ec} token(s)"),
        ("eval duration", _fmt_duration(ed)),
        ("eval rate", f"{ec / (ed / 1e9):.2f} tokens/s" if ed else "n/a"),
    ]
    for k, v in lines:
        click.echo(f"{k + ':':<22}{v}", err=True)


def _chat_once(
    client: Any,
    model: str,
    messages: list[dict[str, Any]],
    options: dict[str, Any],
    keep_alive: str | None,
    fmt: str | None,
    verbose: bool,
) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "options": options,
        "stream": True,
    }
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    if fmt:
        body["format"] = fmt
    out: list[str] = []
    stream: Iterator[dict[str, Any]] = client.stream("/api/chat", body)
    final: dict[str, Any] = {}
    try:
        for chunk in stream:
            piece = (chunk.get("message") or {}).get("content", "")
            if piece:
                out.append(piece)
                click.echo(piece, nl=False)
                sys.stdout.flush()
            if chunk.get("done"):
                final = chunk
    except KeyboardInterrupt:
        # Closing the stream tells the server to stop; it stays up for the next request.
        stream.close()  # type: ignore[attr-defined]
        click.echo()
        raise
    click.echo()
    if verbose and final:
        _print_stats(final)
    return "".join(out)


def _check_utf8(text: str) -> None:
    """A prompt with bytes that are not UTF-8 (read with surrogate escapes) is refused in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00
        shown = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else "a character"
        raise OffloadError(
            f"the prompt is not UTF-8 text ({shown} at character {e.start}); convert it first, "
            "e.g. with iconv -t UTF-8"
        ) from None


def _read_multiline(first: str) -> str:
    lines = [first[3:]]
    if lines[0].endswith('"""') and len(first) > 3:
        return lines[0][:-3]
    while True:
        nxt = input("... ")
        if nxt.endswith('"""'):
            lines.append(nxt[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(nxt)


def _coerce_value(v: str) -> Any:
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _interactive(
    client: Any,
    model: str,
    options: dict[str, Any],
    keep_alive: str | None,
    fmt: str | None,
    verbose: bool,
) -> None:
    messages: list[dict[str, Any]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo("\nUse Ctrl + d or /bye to exit.")
            continue
        if line.startswith('"""'):
            line = _read_multiline(line)
        stripped = line.strip()
        if not stripped:
            continue
        if stripped in ("/bye", "/exit"):
            return
        if stripped in ("/?", "/help"):
            click.echo(_HELP)
            continue
        if stripped == "/clear":
            messages.clear()
            click.echo("Cleared session context")
            continue
        if stripped.startswith("/set"):
            parts = stripped.split(maxsplit=3)
            if len(parts) >= 4 and parts[1] == "parameter":
                name, value = parts[2], parts[3]
                options[name] = value.split() if name == "stop" else _coerce_value(value)
                click.echo(f"Set parameter '{name}' to '{value}'")
            elif len(parts) >= 3 and parts[1] == "system":
                text = stripped.split(maxsplit=2)[2]
                messages = [m for m in messages if m["role"] != "system"]
                messages.insert(0, {"role": "system", "content": text})
                click.echo("Set system message.")
            elif len(parts) == 2 and parts[1] in ("verbose", "quiet"):
                verbose = parts[1] == "verbose"
                click.echo(f"Set '{parts[1]}' mode.")
            else:
                click.echo(
                    "Usage: /set parameter NAME VALUE | /set system TEXT | /set verbose | /set quiet"
                )
            continue
        if stripped.startswith("/"):
            click.echo(f"Unknown command '{stripped.split()[0]}'. Type /? for help")
            continue
        try:
            _check_utf8(line)
        except OffloadError as e:
            click.echo(f"Error: {e}", err=True)
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = _chat_once(client, model, messages, options, keep_alive, fmt, verbose)
        except KeyboardInterrupt:
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


@cli.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--verbose", is_flag=True, help="Show timings and rates after each response.")
@click.option("--format", "fmt", default=None, help='Response format ("json").')
@click.option(
    "--keepalive", default=None, help="How long to keep the model loaded (e.g. 5m, 0, -1)."
)
def run(
    model: str, prompt: tuple[str, ...], verbose: bool, fmt: str | None, keepalive: str | None
) -> None:
    """Run a model: answer PROMPT, or chat interactively when none is given."""
    from offload.runtime.cli.client import ensure_server

    text = " ".join(prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        text = f"{piped.rstrip()}\n\n{text}".strip() if text else piped.strip()
        if not text:
            raise OffloadError("no prompt: stdin was empty and no PROMPT was given")
    _check_utf8(text)
    client = ensure_server()
    options: dict[str, Any] = {}
    if text:
        try:
            _chat_once(
                client, model, [{"role": "user", "content": text}], options, keepalive, fmt, verbose
            )
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        return
    # Load first, so an unknown model fails before the prompt appears.
    client.post(
        "/api/chat",
        {"model": model, "messages": [], **({"keep_alive": keepalive} if keepalive else {})},
    )
    _interactive(client, model, options, keepalive, fmt, verbose)


def _register_commands() -> None:
    """Add the commands that live in modules of their own (each a thin face over one library)."""
    from offload.runtime.cli import bench as cli_bench
    from offload.runtime.cli import models as cli_models
    from offload.runtime.cli import plan as cli_planner
    from offload.runtime.cli import ps as cli_api

    for module in (cli_models, cli_planner, cli_api, cli_bench):
        module.register(cli)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="offload")


if __name__ == "__main__":
    main()
