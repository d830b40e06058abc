#!/usr/bin/env python3
"""Check, on a machine with NVIDIA GPUs, that the path for GPUs without NVML agrees with NVML.

llama.cpp's backend devices (asked in a child process, as the runtime does) must report the
same total memory as NVML and a free memory lower only by the probing process's own context;
the GPUs the planner builds from that device list (NVML hidden) are compared with the ones it
builds from NVML, and the copy probe through ggml with the CUDA runtime probe. Prints one JSON
object and PASS/FAIL lines; exit code 1 on a failed check.

    python bench/backend_check.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_sweep  # noqa: E402,F401 - puts this checkout's offload on the path

GiB = 1 << 30
CONTEXT_MAX_BYTES = 2 * GiB  # a CUDA context with cuBLAS handles is well under this


def nvml_memory() -> list[dict[str, int]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            out.append(
                {
                    "total_bytes": int(mem.total),
                    "free_bytes": int(mem.free),
                    "used_bytes": int(mem.used),
                }
            )
        return out
    finally:
        pynvml.nvmlShutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from offload.planner import hardware as hw_mod
    from offload.runtime.serving import backends

    checks: list[tuple[str, bool, str]] = []
    nvml = nvml_memory()
    report = backends.probe(bandwidth=True)
    gpus = list(report.gpu_devices)
    res: dict[str, Any] = {"nvml": nvml, "backend": dataclass_dict(report)}
    checks.append(
        (
            "llama.cpp offloads and lists every NVML GPU",
            bool(report.gpu_offload) and len(gpus) == len(nvml),
            f"gpu_offload={report.gpu_offload}, {len(gpus)} backend GPUs, {len(nvml)} NVML GPUs",
        )
    )
    for i, (n, d) in enumerate(zip(nvml, gpus, strict=False)):
        total_diff = abs(d["memory_total_bytes"] - n["total_bytes"]) / n["total_bytes"]
        free_gap = n["free_bytes"] - d["memory_free_bytes"]
        checks.append(
            (
                f"GPU {i}: total memory agrees within 1%",
                total_diff <= 0.01,
                f"NVML {n['total_bytes'] / GiB:.2f} GiB, llama.cpp {d['memory_total_bytes'] / GiB:.2f} GiB",
            )
        )
        checks.append(
            (
                f"GPU {i}: free memory agrees up to the probe's own context",
                0 <= free_gap <= CONTEXT_MAX_BYTES,
                f"NVML {n['free_bytes'] / GiB:.2f} GiB free before, llama.cpp {d['memory_free_bytes'] / GiB:.2f} "
                f"GiB (gap {free_gap / 2**20:.0f} MiB)",
            )
        )
    # The planner's two paths: NVML (and the CUDA copy probe), and the device list with NVML hidden.
    via_nvml = hw_mod.probe()
    real = hw_mod._probe_gpus
    hw_mod._probe_gpus = lambda notes: []  # as on a machine without NVML
    try:
        via_backend = hw_mod.probe(backend_devices=gpus, measure_backend=lambda: gpus)
    finally:
        hw_mod._probe_gpus = real
    res["planner_nvml"] = [g.__dict__ for g in via_nvml.gpus]
    res["planner_backend"] = [g.__dict__ for g in via_backend.gpus]
    res["planner_backend_notes"] = list(via_backend.notes)
    for a, b in zip(via_nvml.gpus, via_backend.gpus, strict=False):
        checks.append(
            (
                f"GPU {a.index}: planner's VRAM agrees within 1%",
                abs(a.vram_bytes - b.vram_bytes) <= 0.01 * a.vram_bytes,
                f"{a.vram_bytes / GiB:.2f} vs {b.vram_bytes / GiB:.2f} GiB",
            )
        )
        if a.h2d_bandwidth_Bps and b.h2d_bandwidth_Bps:
            ratio = b.h2d_bandwidth_Bps / a.h2d_bandwidth_Bps
            checks.append(
                (
                    f"GPU {a.index}: pinned host-to-device copy through ggml within 25% of CUDA's",
                    0.75 <= ratio <= 1.25,
                    f"{b.h2d_bandwidth_Bps / 1e9:.1f} vs {a.h2d_bandwidth_Bps / 1e9:.1f} GB/s",
                )
            )
        if a.mem_bandwidth_measured_Bps and b.mem_bandwidth_measured_Bps:
            ratio = b.mem_bandwidth_measured_Bps / a.mem_bandwidth_measured_Bps
            checks.append(
                (
                    f"GPU {a.index}: device copy through ggml within 25% of CUDA's",
                    0.75 <= ratio <= 1.25,
                    f"{b.mem_bandwidth_measured_Bps / 1e9:.0f} vs {a.mem_bandwidth_measured_Bps / 1e9:.0f} GB/s",
                )
            )
    res["checks"] = [{"check": c, "ok": ok, "detail": d} for c, ok, d in checks]
    res["ok"] = all(ok for _, ok, _ in checks)
    text = json.dumps(res, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    for c, ok, d in checks:
        print(f"{'PASS' if ok else 'FAIL'} {c}: {d}")
    return 0 if res["ok"] else 1


def dataclass_dict(x: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(x)


if __name__ == "__main__":
    sys.exit(main())
