"""Quantizing a GGUF for ``create --quantize``, through llama.cpp in a child process.

``offload.models.create`` may not import llama.cpp (nor may the server), so the CLI and the
server hand it this function, which runs ``offload.runtime.runner.quantize``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from offload.models.errors import ModelError

__all__ = ["quantize_gguf"]


def quantize_gguf(src: Path, dst: Path, ftype: int) -> None:
    """Write ``src`` quantized to llama.cpp file type ``ftype`` at ``dst``."""
    cmd = [
        sys.executable,
        "-m",
        "offload.runtime.runner.quantize",
        str(src),
        str(dst),
        str(int(ftype)),
    ]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {r.returncode}"
        raise ModelError(f"quantize: could not quantize {src}: {why}")
