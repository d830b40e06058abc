"""Measured bandwidths: CPU memory (threaded numpy reads) and, with a CUDA runtime, pinned
host-to-device and device memory bandwidth (ctypes on libcudart; no CUDA Python package needed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "cpu_read_Bps",
    "cpu_copy_Bps",
    "find_cudart",
    "cuda_bandwidths",
    "cuda_bandwidths_isolated",
]

log = logging.getLogger(__name__)


def _threaded_median_s(
    threads: int, n: int, work: Callable[[int, int], object], repeats: int
) -> float:
    bounds = np.linspace(0, n, max(threads, 1) + 1).astype(int)
    times = []
    for _ in range(repeats):
        ts = [
            threading.Thread(target=work, args=(bounds[i], bounds[i + 1]))
            for i in range(len(bounds) - 1)
        ]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _read_share(src: np.ndarray, a: int, b: int, chunk: int) -> None:
    sink = np.empty(chunk)
    for i in range(a, b, chunk):
        j = min(i + chunk, b)
        np.copyto(sink[: j - i], src[i:j])


def _reader(
    src: np.ndarray, a: int, b: int, chunk: int, repeats: int, barrier: Any, out: Any
) -> None:
    times = []
    for _ in range(repeats):
        barrier.wait()
        t0 = time.perf_counter()
        _read_share(src, a, b, chunk)
        times.append((t0, time.perf_counter()))
    out.put(times)


def _process_read_s(src: np.ndarray, workers: int, chunk: int, repeats: int) -> float | None:
    """Median wall time for ``workers`` processes to read ``src`` together; None without fork."""
    import multiprocessing as mp

    try:
        ctx = mp.get_context("fork")
    except ValueError:
        return None
    bounds = np.linspace(0, src.size, workers + 1).astype(int)
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(
            target=_reader,
            args=(src, int(bounds[i]), int(bounds[i + 1]), chunk, repeats, barrier, out),
            daemon=True,
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        per_worker = [out.get(timeout=60) for _ in procs]
    except Exception:  # noqa: BLE001 - a worker died: fall back to threads
        return None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes.
    walls = [
        max(w[r][1] for w in per_worker) - min(w[r][0] for w in per_worker) for r in range(repeats)
    ]
    return sorted(walls)[len(walls) // 2]


def cpu_read_Bps(threads: int, size_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Median parallel streaming-read bandwidth (bytes read per second); well under a second.

    Decode streams weights through the cores, so each worker copies its share of a buffer far larger
    than the caches into a small cache-resident one: memcpy-speed reads, writes that stay in cache
    (a reduction like ``sum`` is compute-bound on slow cores). Workers are processes where the
    platform forks: threads serialise on the GIL between chunks, and on a 16-core host that made
    the reading 3x too low (14 GB/s probed where decode streamed 41 GB/s). The median, not the
    best: on shared machines single runs swing by 1.5x either way.
    """
    src = np.ones(size_bytes // 8)
    chunk = 1 << 15  # 256 KiB: stays in L2
    wall = _process_read_s(src, max(threads, 1), chunk, repeats) if threads > 1 else None
    if wall is None:
        wall = _threaded_median_s(
            threads, src.size, lambda a, b: _read_share(src, a, b, chunk), repeats
        )
    return src.nbytes / wall


def cpu_copy_Bps(threads: int, size_bytes: int = 256 << 20, repeats: int = 7) -> float:
    """Median multi-threaded copy bandwidth (bytes read + written per second)."""
    src = np.ones(size_bytes // 8)
    dst = np.empty_like(src)
    dst[:] = 0  # fault the pages in before timing

    def work(a: int, b: int) -> None:
        np.copyto(dst[a:b], src[a:b])

    return 2 * src.nbytes / _threaded_median_s(threads, src.size, work, repeats)


def find_cudart() -> str | None:
    """Path of the CUDA runtime llama.cpp's CUDA build links (next to llama_cpp's libs), else the system's."""
    dirs = []
    spec = importlib.util.find_spec(
        "llama_cpp"
    )  # locate without importing: planner never imports it
    if spec and spec.origin:
        base = os.path.dirname(spec.origin)
        dirs += [os.path.join(base, "lib"), base]
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, "libcudart.so*")))
        if hits:
            return hits[0]
    # The runtime llama.cpp's CUDA backend really resolves comes before any other copy.
    linked = _cudart_linked_by_ggml(dirs[:2])
    if linked:
        return linked
    # pip-installed CUDA runtimes (nvidia-cuda-runtime wheels) live under site-packages/nvidia/.
    for entry in sys.path:
        for d in glob.glob(os.path.join(entry, "nvidia", "cuda_runtime", "lib")) + glob.glob(
            os.path.join(entry, "nvidia", "cu*", "lib")
        ):
            hits = sorted(glob.glob(os.path.join(d, "libcudart.so*")))
            if hits:
                return hits[0]
    found = ctypes.util.find_library("cudart")
    if found:
        return found
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def _cudart_linked_by_ggml(dirs: list[str]) -> str | None:
    """Load llama.cpp's CUDA backend library and read which libcudart the loader resolved for it."""
    for d in dirs:
        for lib in glob.glob(os.path.join(d, "libggml-cuda.so*")):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                with open("/proc/self/maps") as f:
                    for line in f:
                        if "libcudart" in line:
                            return line.split()[-1]
            except OSError:
                continue
    return None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


def cuda_bandwidths(
    device: int, lib_path: str, size_bytes: int = 256 << 20
) -> tuple[float, float, float]:
    """(pinned host-to-device Bps, device copy Bps, pageable host-to-device Bps).

    Pinned and device copies are timed with cudaMemcpyAsync and events; the pageable copy (from
    ordinary memory, as llama.cpp copies from a memory-mapped model) with a wall clock, since the
    driver stages it synchronously.
    """
    rt = ctypes.CDLL(lib_path)
    _check(rt.cudaSetDevice(device), "cudaSetDevice")
    host, dev_a, dev_b = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    size = ctypes.c_size_t(size_bytes)
    _check(rt.cudaMallocHost(ctypes.byref(host), size), "cudaMallocHost")
    try:
        _check(rt.cudaMalloc(ctypes.byref(dev_a), size), "cudaMalloc")
        _check(rt.cudaMalloc(ctypes.byref(dev_b), size), "cudaMalloc")
        start, stop = ctypes.c_void_p(), ctypes.c_void_p()
        _check(rt.cudaEventCreate(ctypes.byref(start)), "cudaEventCreate")
        _check(rt.cudaEventCreate(ctypes.byref(stop)), "cudaEventCreate")

        def timed(dst: ctypes.c_void_p, src: ctypes.c_void_p, kind: int, reps: int) -> float:
            rt.cudaMemcpyAsync(dst, src, size, kind, None)  # warm-up
            _check(rt.cudaEventRecord(start, None), "cudaEventRecord")
            for _ in range(reps):
                _check(rt.cudaMemcpyAsync(dst, src, size, kind, None), "cudaMemcpyAsync")
            _check(rt.cudaEventRecord(stop, None), "cudaEventRecord")
            _check(rt.cudaEventSynchronize(stop), "cudaEventSynchronize")
            ms = ctypes.c_float()
            _check(rt.cudaEventElapsedTime(ctypes.byref(ms), start, stop), "cudaEventElapsedTime")
            return reps * size_bytes / (ms.value / 1e3)

        h2d = timed(dev_a, host, 1, 4)  # cudaMemcpyHostToDevice
        d2d = 2 * timed(dev_b, dev_a, 3, 10)  # device-to-device: read + write
        rt.cudaEventDestroy(start)
        rt.cudaEventDestroy(stop)
        pageable = np.ones(size_bytes, dtype=np.uint8)  # written, so every page is resident
        src = ctypes.c_void_p(pageable.ctypes.data)
        _check(rt.cudaMemcpy(dev_a, src, size, 1), "cudaMemcpy")  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            _check(rt.cudaMemcpy(dev_a, src, size, 1), "cudaMemcpy")
            _check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            times.append(time.perf_counter() - t0)
        return h2d, d2d, size_bytes / min(times)
    finally:
        for p in (dev_a, dev_b):
            if p.value:
                rt.cudaFree(p)
        rt.cudaFreeHost(host)


def cuda_bandwidths_isolated(
    devices: list[int], timeout_s: float = 120.0
) -> tuple[str | None, dict[int, tuple[float, ...]], dict[int, str]]:
    """Measure every GPU's bandwidths in a child process: (libcudart used, results, errors).

    A second CUDA runtime loaded beside the one llama.cpp links can crash the process that later
    runs the model, and a driver fault would take the caller down with it: the child keeps both
    away from the process that asked.
    """
    import json
    import subprocess

    code = (
        "import json, sys\n"
        "from offload.planner.bandwidth import cuda_bandwidths, find_cudart\n"
        "lib = find_cudart()\n"
        "out = {'lib': lib, 'ok': {}, 'err': {}}\n"
        "for d in map(int, sys.argv[1:]):\n"
        "    try:\n"
        "        out['ok'][d] = cuda_bandwidths(d, lib) if lib else None\n"
        "    except Exception as e:\n"
        "        out['err'][d] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, *map(str, devices)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, {}, {d: f"measurement process failed: {e}" for d in devices}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return (
            None,
            {},
            {d: f"measurement process exited with {r.returncode}: {tail}" for d in devices},
        )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ok = {int(d): tuple(v) for d, v in out["ok"].items() if v}
    return out["lib"], ok, {int(d): e for d, e in out["err"].items()}
