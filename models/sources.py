"""What ``create`` may read: the FROM and ADAPTER files, checked before a byte is copied.

Two policies. The CLI and the library run as the user, on the user's files: any path works, and a
bare word names a file when one of that name is there. A request over HTTP comes from whoever can
reach the server (a web page, another user of a LAN), so it may only name files inside allowed
folders (the store's blobs and ``OFFLOAD_ALLOWED_PATHS``), whether a word is a path is decided by
its spelling alone, and every path outside those folders gets the same answer without the file
system being asked: otherwise the answers tell which files exist (CVE-2024-39719 in Ollama).

A file that may be read is checked whole before it is imported: a regular file (a FIFO or a device
would block the reader forever), a GGUF whose header passes ``read_header``'s checks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from offload.models.modelfile import ModelfileError
from offload.planner.errors import GGUFError
from offload.planner.gguf_header import GGUFHeader, read_header

__all__ = ["PathNotAllowed", "is_path", "model_file"]

_PATH_PREFIXES = ("/", "./", "../", "~", ".\\")


class PathNotAllowed(ModelfileError):
    """A path a request over HTTP may not name; the same answer whether or not it exists."""

    def __init__(self, what: str, value: str, line: int | None) -> None:
        super().__init__(
            f"{what} {value[:200]}: not a model name, nor a file this server may read; upload "
            "the file with POST /api/blobs, or add its folder to OFFLOAD_ALLOWED_PATHS",
            line,
        )


def is_path(value: str, base_dir: Path, allowed: Sequence[Path] | None) -> bool:
    """True when a FROM value names a file rather than a model."""
    if value.startswith(_PATH_PREFIXES) or value.lower().endswith(".gguf"):
        return True
    if allowed is not None:
        return False  # over HTTP, asking the file system would answer whether the file exists
    try:
        return (base_dir / value).exists()
    except (OSError, ValueError):
        return False


def _inside(path: Path, allowed: Sequence[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(root)) for root in allowed)


def model_file(
    value: str,
    base_dir: Path,
    what: str,
    line: int | None,
    allowed: Sequence[Path] | None = None,
) -> tuple[Path, GGUFHeader]:
    """The checked file a FROM/ADAPTER value names, and its header; ``ModelfileError`` if unusable."""
    try:
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base_dir / p
        if allowed is not None and not _inside(p, allowed):
            raise PathNotAllowed(what, value, line)
        # Opened without blocking and checked on the open file: a FIFO or a device never blocks.
        f = os.fdopen(os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except (FileNotFoundError, NotADirectoryError):
        raise ModelfileError(f"{what} {value}: no such file", line) from None
    except (OSError, ValueError, RuntimeError) as e:
        if allowed is not None:
            raise PathNotAllowed(what, value, line) from None
        raise ModelfileError(f"{what} {value}: cannot read it ({e})", line) from None
    with f:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise ModelfileError(
                f"{what} {value} is a folder; offload imports GGUF files only (convert "
                "safetensors with llama.cpp's convert_hf_to_gguf.py first)",
                line,
            )
        if not stat.S_ISREG(mode):
            raise ModelfileError(
                f"{what} {value} is not a regular file (a pipe or a device?)", line
            )
        try:
            magic = f.read(4)
        except OSError as e:
            raise ModelfileError(f"{what} {value}: cannot read it ({e.strerror})", line) from None
    if magic != b"GGUF":
        raise ModelfileError(f"{what} {value} is not a GGUF file", line)
    try:
        header = read_header(p)
    except GGUFError as e:
        raise ModelfileError(f"{what} {value}: {e.problem}", line) from None
    return p, header
