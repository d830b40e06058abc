"""What this llama.cpp build can use, asked in a child process and printed as one JSON object.

Run as ``python -m offload.runtime.runner.probe [--bandwidth]``. The parent
(``offload.runtime.serving.backends``) never loads llama.cpp itself: a build that crashes on a driver it
does not understand takes only this process down. The object holds the llama-cpp-python version,
``llama_supports_gpu_offload()`` and every ggml backend device (name, description, type, the
backend that registered it, free and total memory as the backend reports them). With
``--bandwidth`` each GPU also gets copy bandwidths measured through ggml's own buffers (pinned and
pageable host-to-device, device-to-device), which works for CUDA, ROCm, Vulkan and Metal alike.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["probe", "main"]

# enum ggml_backend_dev_type, in ggml-backend.h's order
_DEV_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")
_GGML_TYPE_I8 = 24
_COPY_BYTES = 256 << 20


class _InitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


class _Ggml:
    """The ggml functions the probe needs, looked up in the libraries llama-cpp-python ships."""

    _SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
        "ggml_backend_dev_count": (ctypes.c_size_t, []),
        "ggml_backend_dev_get": (ctypes.c_void_p, [ctypes.c_size_t]),
        "ggml_backend_dev_name": (ctypes.c_char_p, [ctypes.c_void_p]),
        "ggml_backend_dev_description": (ctypes.c_char_p, [ctypes.c_void_p]),
        "ggml_backend_dev_type": (ctypes.c_int, [ctypes.c_void_p]),
        "ggml_backend_dev_memory": (
            None,
            [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
        ),
        "ggml_backend_dev_backend_reg": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_backend_reg_name": (ctypes.c_char_p, [ctypes.c_void_p]),
        "ggml_backend_dev_buffer_type": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_backend_dev_host_buffer_type": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_backend_buft_alloc_buffer": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        "ggml_backend_buffer_get_base": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_backend_buffer_free": (None, [ctypes.c_void_p]),
        "ggml_init": (ctypes.c_void_p, [_InitParams]),
        "ggml_free": (None, [ctypes.c_void_p]),
        "ggml_new_tensor_1d": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]),
        "ggml_backend_alloc_ctx_tensors_from_buft": (
            ctypes.c_void_p,
            [ctypes.c_void_p, ctypes.c_void_p],
        ),
        "ggml_backend_tensor_set": (
            None,
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
        ),
        "ggml_backend_tensor_copy": (None, [ctypes.c_void_p, ctypes.c_void_p]),
    }

    def __init__(self, lib_dir: Path) -> None:
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        self.libs = [
            ctypes.CDLL(str(p), mode=mode)
            for name in ("libggml-base", "libggml")
            for p in sorted(lib_dir.glob(name + ".*"))
            if p.suffix in (".so", ".dylib", ".dll")
        ]

    def __getattr__(self, name: str) -> Any:
        restype, argtypes = self._SIGNATURES[name]
        for lib in self.libs:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype, fn.argtypes = restype, argtypes
                setattr(self, name, fn)
                return fn
        raise AttributeError(f"{name} is not exported by the ggml libraries")


def _best_s(fn: Any, reps: int = 3, inner: int = 1) -> float:
    """Seconds per call, the best of ``reps`` timings of ``inner`` calls each (a fast device copy
    takes about as long as the call around it, so it is timed in a row)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def _copy_bandwidths(g: _Ggml, dev: int, n_bytes: int = _COPY_BYTES) -> dict[str, float]:
    """Host-to-device (pinned and pageable) and device-to-device copy bandwidth, bytes/s."""
    out: dict[str, float] = {}
    ctx = g.ggml_init(_InitParams(1 << 16, None, True))
    buffers: list[int] = []
    try:
        src = g.ggml_new_tensor_1d(ctx, _GGML_TYPE_I8, n_bytes)
        dst = g.ggml_new_tensor_1d(ctx, _GGML_TYPE_I8, n_bytes)
        buf = g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, g.ggml_backend_dev_buffer_type(dev))
        if not buf:
            raise MemoryError(f"could not allocate {2 * n_bytes >> 20} MiB on the device")
        buffers.append(buf)
        pageable = ctypes.create_string_buffer(n_bytes)
        g.ggml_backend_tensor_set(src, pageable, 0, n_bytes)  # first touch, not timed
        out["h2d_pageable_Bps"] = n_bytes / _best_s(
            lambda: g.ggml_backend_tensor_set(src, pageable, 0, n_bytes)
        )
        host_buft = g.ggml_backend_dev_host_buffer_type(dev)
        host = g.ggml_backend_buft_alloc_buffer(host_buft, n_bytes) if host_buft else None
        if host:
            buffers.append(host)
            pinned = g.ggml_backend_buffer_get_base(host)
            g.ggml_backend_tensor_set(src, pinned, 0, n_bytes)
            out["h2d_pinned_Bps"] = n_bytes / _best_s(
                lambda: g.ggml_backend_tensor_set(src, pinned, 0, n_bytes)
            )
        g.ggml_backend_tensor_copy(src, dst)
        # Read and write: counted twice, as a device memory bandwidth figure is.
        out["device_copy_Bps"] = (
            2 * n_bytes / _best_s(lambda: g.ggml_backend_tensor_copy(src, dst), inner=10)
        )
    finally:
        for b in buffers:
            g.ggml_backend_buffer_free(b)
        g.ggml_free(ctx)
    return out


def probe(bandwidth: bool = False) -> dict[str, Any]:
    """Ask the installed llama.cpp what it supports; errors are recorded, not raised."""
    out: dict[str, Any] = {
        "llama_cpp_python": None,
        "gpu_offload": None,
        "devices": [],
        "errors": [],
    }
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as llama_c
    except Exception as e:  # noqa: BLE001 - a broken install is the answer, not a crash
        out["errors"].append(f"import llama_cpp: {type(e).__name__}: {e}")
        return out
    out["llama_cpp_python"] = getattr(llama_cpp, "__version__", None)
    out["gpu_offload"] = bool(llama_c.llama_supports_gpu_offload())
    try:
        g = _Ggml(Path(llama_cpp.__file__).parent / "lib")
        for i in range(g.ggml_backend_dev_count()):
            dev = g.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            kind = g.ggml_backend_dev_type(dev)
            reg = g.ggml_backend_dev_backend_reg(dev)
            d: dict[str, Any] = {
                "index": i,
                "name": (g.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                "description": (g.ggml_backend_dev_description(dev) or b"").decode(
                    errors="replace"
                ),
                "type": _DEV_TYPES[kind] if 0 <= kind < len(_DEV_TYPES) else str(kind),
                "backend": (g.ggml_backend_reg_name(reg) or b"").decode(errors="replace")
                if reg
                else "",
                "memory_free_bytes": int(free.value),
                "memory_total_bytes": int(total.value),
            }
            if bandwidth and d["type"] in ("GPU", "IGPU"):
                try:
                    d.update(_copy_bandwidths(g, dev))
                except Exception as e:  # noqa: BLE001 - memory figures stand without it
                    out["errors"].append(f"copy probe on {d['name']}: {type(e).__name__}: {e}")
            out["devices"].append(d)
    except Exception as e:  # noqa: BLE001
        out["errors"].append(f"ggml device list: {type(e).__name__}: {e}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the probe's JSON object as the last line of stdout."""
    args = sys.argv[1:] if argv is None else argv
    result = probe(bandwidth="--bandwidth" in args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
