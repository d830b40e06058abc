"""What llama.cpp actually allocated, read from its load log, and how a failure reads.

Pure text parsing, so it is testable without a model: the engine feeds it the lines its log
callback captured while loading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "measured_bytes",
    "is_out_of_memory",
    "overridden_tensors",
    "device_name",
    "buffer_names",
]

# "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB"
# "llama_kv_cache:        CPU KV buffer size =    12.00 MiB"
# "sched_reserve:        CPU compute buffer size =   514.50 MiB"
# "llama_context:        CPU  output buffer size =     1.00 MiB"
_BUFFER = re.compile(
    r"^\S*:?\s*(?P<dev>\S+)\s+(?P<kind>model|KV|compute|output)\s+buffer size\s*=\s*"
    r"(?P<mib>[0-9.]+)\s*MiB"
)
_KIND = {"model": "weights", "KV": "kv", "compute": "compute", "output": "compute"}
# Messages llama.cpp/ggml print when an allocation fails (host or CUDA); anything else is not
# something a smaller plan can fix.
_OOM = (
    "failed to allocate",
    "insufficient memory",
    "out of memory",
    "cudamalloc failed",
    "unable to allocate",
    "not enough memory",
    "failed to reserve",
    "cannot allocate memory",
)
_OVERRIDE = re.compile(r"tensor (?P<name>\S+) \(.*\) buffer type overridden to (?P<buft>\S+)")


def device_name(buffer_name: str) -> str:
    """The device a llama.cpp buffer lives on: host buffers (mapped, repacked, pinned) are ``CPU``."""
    if buffer_name.startswith("CPU") or buffer_name.endswith("_Host"):
        return "CPU"
    return buffer_name


def measured_bytes(lines: Iterable[str]) -> dict[str, dict[str, int]]:
    """Bytes per device and kind (``weights``, ``kv``, ``compute``) from llama.cpp's log lines."""
    out: dict[str, dict[str, int]] = {}
    for line in lines:
        m = _BUFFER.search(line.strip())
        if not m:
            continue
        dev = device_name(m["dev"])
        slot = out.setdefault(dev, {"weights": 0, "kv": 0, "compute": 0})
        slot[_KIND[m["kind"]]] += round(float(m["mib"]) * 2**20)
    return out


def is_out_of_memory(lines: Iterable[str]) -> bool:
    """True when the log shows an allocation failure (the kind of failure a smaller plan fixes)."""
    return any(any(k in line.lower() for k in _OOM) for line in lines)


def overridden_tensors(lines: Iterable[str]) -> dict[str, str]:
    """Tensor name -> buffer type for each tensor llama.cpp says it overrode."""
    return {m["name"]: m["buft"] for line in lines if (m := _OVERRIDE.search(line))}


def buffer_names(lines: Iterable[str]) -> list[str]:
    """The weight buffers llama.cpp made (``CPU_Mapped``, ``CPU_REPACK``, ``CUDA0``...), in order."""
    names: list[str] = []
    for line in lines:
        m = _BUFFER.search(line.strip())
        if m and m["kind"] == "model" and m["dev"] not in names:
            names.append(m["dev"])
    return names
