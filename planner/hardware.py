"""The hardware probe: what this machine has, measured where it matters; cached profiles."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from offload.planner.bandwidth import cpu_read_Bps, cuda_bandwidths_isolated
from offload.planner.errors import HardwareProfileError
from offload.planner.gpu_specs import tensor_flops
from offload.planner.types import CPUInfo, GPUInfo, Hardware

__all__ = ["probe", "fingerprint", "current", "load_profile", "profile_names", "PROFILES_DIR"]

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).with_name("profiles")
# PCIe GB/s per lane per direction, by generation (after encoding); pinned copies reach ~80% of it.
_PCIE_LANE_Bps = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.56e9}
_PINNED_EFF = 0.68  # GPU.md: 42.7 GB/s pinned on a gen5 x16 link (63 GB/s nominal)
# A GPU known only from llama.cpp's device list, with no copy probe and no profile of its name:
# a mid-range discrete card on PCIe 4 x16, so that plans stay modest rather than optimistic.
_UNKNOWN_GPU_Bps = 250e9
_UNKNOWN_H2D_Bps = 12e9

# What the runtime passes in: llama.cpp's backend devices as its probe printed them
# (``name``, ``description``, ``type``, ``memory_free_bytes``, ``memory_total_bytes`` and, when
# measured, ``h2d_pinned_Bps``, ``h2d_pageable_Bps``, ``device_copy_Bps``).
BackendDevices = Sequence[Mapping[str, Any]]


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


def _backend_gpus(devices: BackendDevices | None) -> list[Mapping[str, Any]]:
    return [d for d in devices or () if d.get("type") in ("GPU", "IGPU")]


def fingerprint(backend_devices: BackendDevices | None = None) -> str:
    """A stable id for this machine's hardware (CPU model, cores, RAM, GPUs).

    GPUs are NVML's; where NVML finds none, the GPUs in ``backend_devices`` (llama.cpp's view).
    """
    gpu_ids = _gpu_ids() or [
        f"{d.get('description') or d.get('name')}{d.get('memory_total_bytes')}"
        for d in _backend_gpus(backend_devices)
    ]
    parts = [
        platform.machine(),
        _cpu_name(),
        str(psutil.cpu_count(logical=True)),
        str(psutil.virtual_memory().total >> 30),
        *gpu_ids,
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
            cores = _nvml(getattr(pynvml, "nvmlDeviceGetNumGpuCores", None), 0, h)
            sm_mhz = _nvml(pynvml.nvmlDeviceGetMaxClockInfo, 0, h, pynvml.NVML_CLOCK_SM)
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
                    fp16_flops=tensor_flops(name, f"{cc[0]}.{cc[1]}", int(cores or 0), sm_mhz),
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
            notes.append(
                f"GPU {g.index}: CUDA bandwidth measurement failed ({why}); using link/bus estimates"
            )
            out.append(g)
            continue
        h2d, dev, pageable = (*measured[g.index], 0.0)[:3]
        # Without a nominal figure (NVML lacked bus width or clock), a copy reaches ~85% of it.
        nominal = g.mem_bandwidth_Bps or dev / 0.85
        out.append(
            replace(
                g,
                h2d_bandwidth_Bps=h2d,
                mem_bandwidth_Bps=nominal,
                mem_bandwidth_measured_Bps=dev,
                h2d_pageable_Bps=pageable,
            )
        )
    return out


def _profile_gpu(name: str) -> GPUInfo | None:
    """The GPU of a shipped profile with this name, for figures a device list does not give."""
    for p in sorted(PROFILES_DIR.glob("*.json")):
        try:
            for g in json.loads(p.read_text()).get("gpus", []):
                if str(g.get("name", "")).lower() == name.lower():
                    return GPUInfo(
                        **{k: v for k, v in g.items() if k in GPUInfo.__dataclass_fields__}
                    )
        except (OSError, ValueError, TypeError):
            continue
    return None


def _gpus_from_backend(
    devices: BackendDevices,
    notes: list[str],
    measure_backend: Callable[[], BackendDevices] | None = None,
) -> list[GPUInfo]:
    """GPUs from llama.cpp's backend devices (memory as the backend reports it), for machines
    without NVML: Vulkan, ROCm and Metal builds. Bandwidths from a copy probe through ggml when
    ``measure_backend`` gives one, else from a shipped profile of the same GPU, else assumed."""
    devs = [dict(d) for d in _backend_gpus(devices)]
    if devs and measure_backend is not None and not any("h2d_pinned_Bps" in d for d in devs):
        try:
            measured = {d.get("name"): d for d in measure_backend()}
        except Exception as e:  # noqa: BLE001 - memory figures stand without bandwidths
            notes.append(f"copy probe through llama.cpp failed ({type(e).__name__}: {e})")
            measured = {}
        devs = [{**d, **measured.get(d.get("name"), {})} for d in devs]
    gpus = []
    for i, d in enumerate(devs):
        name = str(d.get("description") or d.get("name") or f"GPU {i}")
        prof = _profile_gpu(name)
        dev_copy = float(d.get("device_copy_Bps") or 0.0)
        h2d = float(d.get("h2d_pinned_Bps") or 0.0)
        source = "measured through llama.cpp"
        if not h2d or not dev_copy:
            source = (
                "from the shipped profile of this GPU"
                if prof
                else "assumed (not measured, no profile)"
            )
        # As with the CUDA probe: a device copy reaches about 85% of the nominal bandwidth.
        bw = prof.mem_bandwidth_Bps if prof else (dev_copy / 0.85 if dev_copy else _UNKNOWN_GPU_Bps)
        h2d = h2d or (prof.h2d_bandwidth_Bps if prof else _UNKNOWN_H2D_Bps)
        gpus.append(
            GPUInfo(
                name=name,
                vram_bytes=int(d.get("memory_total_bytes") or 0),
                mem_bandwidth_Bps=bw,
                h2d_bandwidth_Bps=h2d,
                index=i,
                vram_free_bytes=int(d.get("memory_free_bytes") or 0),
                fp16_flops=prof.fp16_flops if prof else tensor_flops(name),
                mem_bandwidth_measured_Bps=dev_copy,
                h2d_pageable_Bps=float(d.get("h2d_pageable_Bps") or 0.0),
            )
        )
        notes.append(
            f"GPU {i} ({name}, {d.get('backend') or d.get('name')}) from llama.cpp's device list "
            f"(no NVML); bandwidths {source}"
        )
    return gpus


def probe(
    measure: bool = True,
    backend_devices: BackendDevices | None = None,
    measure_backend: Callable[[], BackendDevices] | None = None,
) -> Hardware:
    """Probe this machine: CPU, RAM, GPUs (NVML), measured CPU and PCIe/GPU bandwidths.

    Where NVML finds no GPU, the GPUs among ``backend_devices`` (llama.cpp's device list, given
    by the runtime) are used; ``measure_backend`` returns that list with copy bandwidths measured.
    """
    notes: list[str] = []
    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    bw = cpu_read_Bps(cores) if measure else 20e9
    if not measure:
        notes.append("CPU memory bandwidth not measured (assumed 20 GB/s)")
    gpus = _probe_gpus(notes)
    if gpus and measure:
        gpus = _measure_gpus(gpus, notes)
    elif not gpus and _backend_gpus(backend_devices):
        gpus = _gpus_from_backend(
            backend_devices or (), notes, measure_backend if measure else None
        )
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
        fingerprint=fingerprint(backend_devices),
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


def current(
    cache_file: Path | None,
    refresh: bool = False,
    backend_devices: BackendDevices | None = None,
    measure_backend: Callable[[], BackendDevices] | None = None,
) -> Hardware:
    """This machine's profile: from ``cache_file`` when its fingerprint matches, else probed and cached.

    ``backend_devices`` and ``measure_backend`` are passed to ``probe`` (GPUs where NVML is absent).
    """
    fp = fingerprint(backend_devices)
    if cache_file is not None and not refresh and cache_file.exists():
        try:
            hw = Hardware.from_dict(json.loads(cache_file.read_text()))
            if hw.fingerprint == fp:
                return _refresh_free_memory(hw, backend_devices)
            log.info("hardware changed (fingerprint %s != %s): probing again", hw.fingerprint, fp)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s is unreadable (%s): probing again", cache_file, e)
    hw = probe(backend_devices=backend_devices, measure_backend=measure_backend)
    if cache_file is not None:
        _write_atomic(Path(cache_file), hw.to_dict())
    return hw


def _refresh_free_memory(hw: Hardware, backend_devices: BackendDevices | None = None) -> Hardware:
    """Free RAM and VRAM change between runs; the measured bandwidths don't."""
    from dataclasses import replace

    cpu = replace(hw.cpu, ram_available_bytes=psutil.virtual_memory().available)
    notes: list[str] = []
    fresh = {g.index: g for g in _probe_gpus(notes)}
    if not fresh:  # GPUs known from llama.cpp's device list: its free memory, in its order
        fresh = {
            i: GPUInfo(
                name="",
                vram_bytes=0,
                mem_bandwidth_Bps=0,
                h2d_bandwidth_Bps=0,
                vram_free_bytes=int(d.get("memory_free_bytes") or 0),
            )
            for i, d in enumerate(_backend_gpus(backend_devices))
        }
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
