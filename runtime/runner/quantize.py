"""Quantizing a GGUF with llama.cpp's quantizer, in a child process of its own.

``python -m offload.runtime.runner.quantize SRC DST FTYPE`` writes ``SRC`` quantized to llama.cpp
file type ``FTYPE`` at ``DST``; like every use of llama.cpp, it never runs in the server.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Quantize; exit code 0 on success, 1 with a one-line message on stderr otherwise."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m offload.runtime.runner.quantize SRC DST FTYPE", file=sys.stderr)
        return 2
    from offload.runtime.runner.native import llama_c

    src, dst, ftype = args[0], args[1], int(args[2])
    params = llama_c.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_c.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"llama.cpp could not quantize {src} (error {rc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
