"""The hardware probe: what this machine has, measured where it matters; cached profiles."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from offload.planner.bandwidth import cpu_read_Bps, cuda_bandwidths_isolated
from offload.planner.errors import HardwareProfileError
from offload.planner.types import CPUInfo, GPUInfo, Hardware

__all__ = ["probe", "fingerprint", "current", "load_profile", "profile_names", "PROFILES_DIR"]

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).with_name("profiles")
# PCIe GB/s per lane per direction, by generation (after encoding); pinned copies reach ~80% of it.
_PCIE_LANE_Bps = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.56e9}
_PINNED_EFF = 0.68  # GPU.md: 42.7 GB/s pinned on a gen5 x16 link (63 GB/s nominal)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_ids() -> list[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [
                pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)).__str__()
                + str(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total)
                for i in range(pynvml.nvmlDeviceGetCount())
            ]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML: no NVIDIA GPUs to fingerprint
        return []


def fingerprint() -> str:
    """A stable id for this machine's hardware (CPU model, cores, RAM, GPUs)."""
    parts = [
        platform.machine(),
        _cpu_name(),
        str(psutil.cpu_count(logical=True)),
        str(psutil.virtual_memory().total >> 30),
        *_gpu_ids(),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _probe_gpus(notes: list[str]) -> list[GPUInfo]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:
        notes.append(f"no NVIDIA GPU found (NVML unavailable: {e.__class__.__name__})")
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gen = _nvml(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, 0, h)
            width = _nvml(pynvml.nvmlDeviceGetMaxPcieLinkWidth, 0, h)
            bus = _nvml(pynvml.nvmlDeviceGetMemoryBusWidth, 0, h)
            clock_mhz = _nvml(pynvml.nvmlDeviceGetMaxClockInfo, 0, h, pynvml.NVML_CLOCK_MEM)
            cc = _nvml(pynvml.nvmlDeviceGetCudaComputeCapability, (0, 0), h)
            # Memory clock is reported per data lane pair: DDR => x2 transfers per clock.
            bw = bus / 8 * clock_mhz * 1e6 * 2 if bus and clock_mhz else 0.0
            h2d = _PCIE_LANE_Bps.get(gen, 0.0) * width * _PINNED_EFF
            gpus.append(
                GPUInfo(
                    name=name,
                    vram_bytes=int(mem.total),
                    mem_bandwidth_Bps=bw,
                    h2d_bandwidth_Bps=h2d,
                    index=i,
                    vram_free_bytes=int(mem.free),
                    pcie_gen=int(gen),
                    pcie_width=int(width),
                    compute_capability=f"{cc[0]}.{cc[1]}",
                )
            )
    finally:
        pynvml.nvmlShutdown()
    return gpus


def _nvml(fn: Any, default: Any, *args: Any) -> Any:
    """Call an NVML query, or ``default`` where this GPU or driver does not support it."""
    try:
        return fn(*args)
    except Exception:
        return default


def _measure_gpus(gpus: list[GPUInfo], notes: list[str]) -> list[GPUInfo]:
    from dataclasses import replace

    if not gpus:
        return gpus
    lib, measured, errors = cuda_bandwidths_isolated([g.index for g in gpus])
    if lib is None and not errors:
        notes.append(
            "no CUDA runtime found: host-to-device bandwidth from the PCIe link, "
            "GPU bandwidth from bus width and clock (not measured)"
        )
        return gpus
    out = []
    for g in gpus:
        if g.index not in measured:
            why = errors.get(g.index, "no CUDA runtime")
            notes.append(f"GPU {g.index}: CUDA bandwidth measurement failed ({why}); using link/bus estimates")
            out.append(g)
            continue
        h2d, dev, pageable = (*measured[g.index], 0.0)[:3]
        # Without a nominal figure (NVML lacked bus width or clock), a copy reaches ~85% of it.
        nominal = g.mem_bandwidth_Bps or dev / 0.85
        out.append(replace(g, h2d_bandwidth_Bps=h2d, mem_bandwidth_Bps=nominal, mem_bandwidth_measured_Bps=dev,
                           h2d_pageable_Bps=pageable))
    return out


def probe(measure: bool = True) -> Hardware:
    """Probe this machine: CPU, RAM, GPUs (NVML), measured CPU and PCIe/GPU bandwidths."""
    notes: list[str] = []
    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    bw = cpu_read_Bps(cores) if measure else 20e9
    if not measure:
        notes.append("CPU memory bandwidth not measured (assumed 20 GB/s)")
    gpus = _probe_gpus(notes)
    if gpus and measure:
        gpus = _measure_gpus(gpus, notes)
    cpu = CPUInfo(
        cores=cores,
        ram_bytes=vm.total,
        mem_bandwidth_Bps=bw,
        threads=psutil.cpu_count() or cores,
        ram_available_bytes=vm.available,
        name=_cpu_name(),
    )
    return Hardware(
        name=platform.node() or "this machine",
        cpu=cpu,
        gpus=tuple(gpus),
        fingerprint=fingerprint(),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=tuple(notes),
    )


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current(cache_file: Path | None, refresh: bool = False) -> Hardware:
    """This machine's profile: from ``cache_file`` when its fingerprint matches, else probed and cached."""
    fp = fingerprint()
    if cache_file is not None and not refresh and cache_file.exists():
        try:
            hw = Hardware.from_dict(json.loads(cache_file.read_text()))
            if hw.fingerprint == fp:
                return _refresh_free_memory(hw)
            log.info("hardware changed (fingerprint %s != %s): probing again", hw.fingerprint, fp)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s is unreadable (%s): probing again", cache_file, e)
    hw = probe()
    if cache_file is not None:
        _write_atomic(Path(cache_file), hw.to_dict())
    return hw


def _refresh_free_memory(hw: Hardware) -> Hardware:
    """Free RAM and VRAM change between runs; the measured bandwidths don't."""
    from dataclasses import replace

    cpu = replace(hw.cpu, ram_available_bytes=psutil.virtual_memory().available)
    notes: list[str] = []
    fresh = {g.index: g for g in _probe_gpus(notes)}
    gpus = tuple(
        replace(g, vram_free_bytes=fresh[g.index].vram_free_bytes) if g.index in fresh else g
        for g in hw.gpus
    )
    return replace(hw, cpu=cpu, gpus=gpus)


def profile_names() -> list[str]:
    """Names of the shipped profiles (``planner/profiles/*.json``)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str | os.PathLike[str]) -> Hardware:
    """A shipped profile by name (``rtx3060``) or a profile JSON file."""
    p = Path(name_or_path)
    if not p.suffix == ".json" or not p.exists():
        p = PROFILES_DIR / f"{name_or_path}.json"
    if not p.exists():
        raise HardwareProfileError(
            f"no hardware profile {str(name_or_path)!r}; shipped: {', '.join(profile_names())}"
        )
    try:
        data = json.loads(p.read_text())
        hw = Hardware.from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise HardwareProfileError(f"{p}: not a hardware profile ({e})") from None
    if hw.cpu.cores <= 0 or hw.cpu.mem_bandwidth_Bps <= 0:
        raise HardwareProfileError(f"{p}: cpu.cores and cpu.mem_bandwidth_Bps must be positive")
    return hw
