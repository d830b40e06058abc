"""Quantizing a GGUF through llama.cpp's quantizer, for ``create --quantize``.

``offload.models.create`` may not import llama.cpp, so the CLI and server hand it this function.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from offload.models.errors import ModelError

__all__ = ["quantize_gguf"]


def quantize_gguf(src: Path, dst: Path, ftype: int) -> None:
    """Write ``src`` quantized to llama.cpp file type ``ftype`` at ``dst``."""
    import llama_cpp  # imported here: loading llama.cpp costs time the other commands don't need

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"quantize: llama.cpp could not quantize {src} (error {rc})")
