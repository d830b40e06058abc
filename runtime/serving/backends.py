"""What llama.cpp can use on this machine, asked through a short-lived child process.

llama.cpp is never loaded in the server or CLI process: ``probe()`` runs
``python -m offload.runtime.runner.probe`` with a timeout and caches its answer for the life of
the process, per llama-cpp-python install (a reinstall while the server runs is noticed). A probe
that crashes or hangs is reported in the answer, never raised.

``current()`` is the machine as llama.cpp can use it: NVML's GPUs when this build can offload to
them; the CPU alone (with a warning that gives the install command) when it cannot; and, where
NVML is absent (Vulkan, ROCm, Metal builds), the GPUs llama.cpp's backend devices report.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload.planner import hardware as hw_mod
from offload.planner.types import Hardware

__all__ = [
    "BackendReport",
    "Usable",
    "probe",
    "install_identity",
    "gpu_install_command",
    "usable_hardware",
    "current",
]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0
_PROBE = Path(__file__).parents[1] / "runner" / "probe.py"
_GPU_TYPES = ("GPU", "IGPU")


@dataclass(frozen=True)
class BackendReport:
    """The probe child's answer (``devices`` as it printed them), or why there is none."""

    ok: bool
    llama_cpp_version: str | None = None
    gpu_offload: bool | None = None
    devices: tuple[dict[str, Any], ...] = ()
    errors: tuple[str, ...] = ()
    elapsed_s: float = 0.0

    @property
    def gpu_devices(self) -> tuple[dict[str, Any], ...]:
        """The GPUs (discrete or integrated) among the backend devices."""
        return tuple(d for d in self.devices if d.get("type") in _GPU_TYPES)

    @property
    def error(self) -> str | None:
        """One line saying what went wrong, if anything."""
        return "; ".join(self.errors) or None


@dataclass(frozen=True)
class Usable:
    """The machine as llama.cpp can use it, and the warning to show when that is less than it has."""

    hardware: Hardware
    warning: str | None = None
    report: BackendReport = field(default_factory=lambda: BackendReport(ok=False))


_cache: dict[tuple[str, bool], BackendReport] = {}
_lock = threading.Lock()
_warned: set[str] = set()


def install_identity() -> str:
    """Which llama-cpp-python is installed (path, version, library time), without importing it."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return "absent"
    lib_dir = Path(spec.origin).parent / "lib"
    try:
        stamp = max((p.stat().st_mtime_ns for p in lib_dir.glob("libllama*")), default=0)
    except OSError:
        stamp = 0
    return f"{spec.origin}|{_version() or '?'}|{stamp}"


def _version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_child(bandwidth: bool, timeout_s: float) -> BackendReport:
    # By path: the child needs only the standard library and llama_cpp, not this package.
    cmd = [sys.executable, str(_PROBE), *(["--bandwidth"] if bandwidth else [])]
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return BackendReport(
            ok=False,
            errors=(f"the llama.cpp probe did not answer within {timeout_s:.0f} s",),
            elapsed_s=time.monotonic() - t0,
        )
    except OSError as e:
        return BackendReport(ok=False, errors=(f"the llama.cpp probe could not start: {e}",))
    elapsed = time.monotonic() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        how = f"exit code {r.returncode}" if r.returncode >= 0 else f"signal {-r.returncode}"
        return BackendReport(
            ok=False,
            errors=(f"the llama.cpp probe failed ({how}): {tail[0][:300]}",),
            elapsed_s=elapsed,
        )
    try:
        data = json.loads(lines[-1])
    except ValueError as e:
        return BackendReport(
            ok=False, errors=(f"the llama.cpp probe printed no JSON: {e}",), elapsed_s=elapsed
        )
    errors = tuple(str(e) for e in data.get("errors", ()))
    return BackendReport(
        ok=data.get("llama_cpp_python") is not None,
        llama_cpp_version=data.get("llama_cpp_python"),
        gpu_offload=data.get("gpu_offload"),
        devices=tuple(data.get("devices", ())),
        errors=errors,
        elapsed_s=elapsed,
    )


def probe(
    refresh: bool = False, bandwidth: bool = False, timeout_s: float = PROBE_TIMEOUT_S
) -> BackendReport:
    """Ask llama.cpp (in a child process) what it can use; cached per process and install."""
    key = (install_identity(), bandwidth)
    with _lock:
        if not refresh and key in _cache:
            return _cache[key]
    if key[0] == "absent":
        report = BackendReport(ok=False, errors=("llama-cpp-python is not installed",))
    else:
        report = _run_child(bandwidth, timeout_s)
    with _lock:
        _cache[key] = report
    if not report.ok:
        log.info("llama.cpp probe: %s", report.error)
    return report


def gpu_install_command(cmake_args: str = "-DGGML_CUDA=on", python: str | None = None) -> str:
    """The command that rebuilds this environment's llama-cpp-python for a GPU (CUDA by default)."""
    py = shlex.quote(python or sys.executable)
    version = _version() or "0.3.36"
    return (
        f'CMAKE_ARGS="{cmake_args}" {py} -m pip install --no-cache-dir --force-reinstall --no-deps '
        f"llama-cpp-python=={version}"
    )


def _names(hw: Hardware) -> str:
    names = sorted({g.name for g in hw.gpus})
    return f"{len(hw.gpus)} GPU{'s' if len(hw.gpus) != 1 else ''} ({', '.join(names)})"


def usable_hardware(hw: Hardware, report: BackendReport | None = None) -> Usable:
    """``hw`` cut down to what llama.cpp can use: no GPUs (and a warning) when this build cannot
    offload to the GPUs NVML found; as probed otherwise."""
    report = report or probe()
    if not hw.gpus:
        return Usable(hw, None, report)
    if not report.ok:
        # Without an answer the GPUs stay: a load that then fails says why in its own error.
        note = f"could not ask llama.cpp which devices it can use ({report.error}); planning with the GPUs NVML found"
        return Usable(dataclasses.replace(hw, notes=(*hw.notes, note)), None, report)
    if report.gpu_offload and report.gpu_devices:
        seen = len(report.gpu_devices)
        if seen < len(hw.gpus):
            note = f"llama.cpp sees {seen} of the {len(hw.gpus)} GPUs NVML found (CUDA_VISIBLE_DEVICES?): planning with the first {seen}"
            return Usable(
                dataclasses.replace(hw, gpus=hw.gpus[:seen], notes=(*hw.notes, note)), None, report
            )
        return Usable(hw, None, report)
    warning = (
        f"{_names(hw)} found, but llama.cpp here (llama-cpp-python {report.llama_cpp_version}) was built "
        f"without GPU support, so models run on the CPU. For a CUDA build run: {gpu_install_command()}"
    )
    _warn_once(warning)
    cpu_only = dataclasses.replace(hw, gpus=(), notes=(*hw.notes, warning))
    return Usable(cpu_only, warning, report)


def _warn_once(message: str) -> None:
    # Info, once: the server's log keeps it; the CLI shows it itself (``Usable.warning``).
    if message not in _warned:
        _warned.add(message)
        log.info("%s", message)


def _measured_backend_devices() -> list[dict[str, Any]]:
    """Backend GPUs with copy bandwidths measured, for a probe of a machine without NVML."""
    return list(probe(bandwidth=True).gpu_devices)


def current(cache_file: Path | None, refresh: bool = False) -> Usable:
    """This machine's profile (cached in ``cache_file``) as llama.cpp can use it."""
    report = probe(refresh=refresh)
    devices = list(report.gpu_devices) if report.ok and report.gpu_offload else None
    hw = hw_mod.current(
        cache_file,
        refresh=refresh,
        backend_devices=devices,
        measure_backend=_measured_backend_devices if devices else None,
    )
    return usable_hardware(hw, report)
