"""The hardware probe: what this machine has, measured where it matters."""

from __future__ import annotations

import hashlib
import platform
from datetime import UTC, datetime

import psutil

from offload.planner.types import CPUInfo, Hardware

__all__ = ["probe", "fingerprint"]


def fingerprint() -> str:
    """A stable id for this machine's hardware (CPU model, cores, RAM, GPUs)."""
    parts = [platform.machine(), platform.processor(), str(psutil.cpu_count(logical=True)),
             str(psutil.virtual_memory().total >> 30)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def probe() -> Hardware:
    """Probe this machine (CPU and RAM only so far)."""
    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    cpu = CPUInfo(
        cores=cores,
        ram_bytes=vm.total,
        mem_bandwidth_Bps=20e9,
        threads=psutil.cpu_count() or cores,
        ram_available_bytes=vm.available,
        name=platform.processor() or platform.machine(),
    )
    return Hardware(
        name=platform.node() or "this machine",
        cpu=cpu,
        gpus=(),
        fingerprint=fingerprint(),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=("memory bandwidth not measured yet (assumed 20 GB/s)",),
    )
