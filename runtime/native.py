"""Loading llama.cpp's native libraries before anything else in a process that runs models.

Seen on a CUDA build: when numpy's native libraries are loaded first (numpy comes in through
``gguf`` and the planner), llama.cpp crashes with a segmentation fault on its first GPU load;
when llama.cpp's libraries are loaded first, both work. The libraries are located without
importing ``llama_cpp`` (that stays the engine's edge) and loaded once with ``RTLD_GLOBAL``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

__all__ = ["preload"]

_done = False


def preload() -> None:
    """Load ``libllama`` (and through it ggml) if llama-cpp-python is installed; never raises."""
    global _done
    if _done:
        return
    _done = True
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None:
        return
    lib_dir = Path(spec.origin).parent / "lib"
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    lib = lib_dir / f"libllama{suffix}"
    if lib.exists():
        try:
            ctypes.CDLL(str(lib), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        except OSError:
            pass  # the engine reports a broken install when it imports llama_cpp
