"""Helpers of the GPU sweep that talk to the outside: NVML, llama.cpp's own tools, a memory blocker.

Each degrades to ``None`` (and a note) where the thing is absent, so the sweep runs on a CPU too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["gpu_memory", "parse_fit_params", "run_fit_params", "run_llama_bench", "GpuBlocker"]


def gpu_memory(index: int = 0) -> dict[str, Any] | None:
    """Name and total/used/free bytes of a GPU through NVML; None without a GPU or pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        name = pynvml.nvmlDeviceGetName(h)
        return {"name": name.decode() if isinstance(name, bytes) else str(name), "total_bytes": int(mem.total),
                "used_bytes": int(mem.used), "free_bytes": int(mem.free)}
    except Exception:  # noqa: BLE001 - no driver, no GPU, no pynvml: all mean "no reading"
        return None


_NGL = re.compile(r"(?:^|\s)(?:-ngl|--n-gpu-layers|--gpu-layers)[\s=]+(-?\d+)")
_OT = re.compile(r"(?:^|\s)(?:-ot|--override-tensor)[\s=]+(\"[^\"]*\"|'[^']*'|\S+)")


def parse_fit_params(text: str) -> dict[str, Any] | None:
    """``-ngl N`` and the ``-ot PATTERN=BUFT,...`` overrides from llama-fit-params' output."""
    lines = [ln for ln in text.splitlines() if _NGL.search(ln)]
    if not lines:
        return None
    line = lines[-1]
    ngl = int(_NGL.search(line)[1])  # type: ignore[index]
    patterns: list[str] = []
    other: list[str] = []
    for m in _OT.finditer(line):
        value = shlex.split(m[1])[0] if m[1][:1] in "\"'" else m[1]
        # Overrides are comma-separated PATTERN=BUFT pairs (llama.cpp's -ot syntax).
        for pm in re.finditer(r"([^,]+?)=([A-Za-z0-9_]+)(?:,|$)", value):
            (patterns if pm[2].upper() == "CPU" else other).append(pm[1])
    return {"n_gpu_layers": ngl, "cpu_tensor_patterns": patterns, "other_overrides": other, "line": line.strip()}


def run_fit_params(tool: Path, model: Path, n_ctx: int, margin_mib: int, timeout_s: float = 120) -> dict[str, Any]:
    """Run ``llama-fit-params`` for a margin (MiB of free memory to leave); parsed result and raw output."""
    cmd = [str(tool), "-m", str(model), "-c", str(n_ctx), "-fa", "on", "-fitt", str(margin_mib)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"cmd": shlex.join(cmd), "error": str(e)}
    out = r.stdout + "\n" + r.stderr
    return {"cmd": shlex.join(cmd), "rc": r.returncode, "parsed": parse_fit_params(r.stdout) or parse_fit_params(out),
            "output_tail": out[-3000:]}


def run_llama_bench(tool: Path, model: Path, n_gpu_layers: int, cpu_patterns: list[str], *, threads: int,
                    prompt: int, gen: int, n_ubatch: int = 512, depth: int = 0,
                    timeout_s: float = 240) -> dict[str, Any]:
    """One llama-bench measurement of a placement: prompt and decode t/s (decode after ``depth``)."""
    cmd = [str(tool), "-m", str(model), "-ngl", str(n_gpu_layers), "-fa", "1", "-p", str(prompt), "-n", str(gen),
           "-t", str(threads), "-ub", str(n_ubatch), "-r", "1", "-o", "json"]
    if depth:
        cmd += ["-d", str(depth)]
    if cpu_patterns:
        cmd += ["-ot", ";".join(f"{p}=CPU" for p in cpu_patterns)]  # llama-bench separates with ';'
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"cmd": shlex.join(cmd), "error": str(e)}
    res: dict[str, Any] = {"cmd": shlex.join(cmd), "rc": r.returncode}
    try:
        start = r.stdout.index("[")
        for row in json.loads(r.stdout[start:]):
            if row.get("n_prompt") and not row.get("n_gen"):
                res["prompt_tps"] = row.get("avg_ts")
            elif row.get("n_gen") and not row.get("n_prompt"):
                res["decode_tps"] = row.get("avg_ts")
    except (ValueError, TypeError) as e:
        res["error"] = f"unparsable output: {e}"
        res["output_tail"] = (r.stdout + r.stderr)[-2000:]
    return res


class GpuBlocker:
    """Holds GPU memory (cudaMalloc) so that a plan meets a smaller card; frees it on ``close``."""

    def __init__(self, n_bytes: int) -> None:
        self.n_bytes = n_bytes
        self.ptr = ctypes.c_void_p()
        self.lib = self._cudart()
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        rc = self.lib.cudaMalloc(ctypes.byref(self.ptr), ctypes.c_size_t(n_bytes))
        if rc != 0:
            raise RuntimeError(f"cudaMalloc({n_bytes}) failed with error {rc}")

    @staticmethod
    def _cudart() -> ctypes.CDLL:
        names = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"]
        try:  # the CUDA runtime llama.cpp's build links, wherever it is
            import llama_cpp

            for p in (Path(llama_cpp.__file__).parent / "lib").glob("libggml-cuda*"):
                out = subprocess.run(["ldd", str(p)], capture_output=True, text=True).stdout
                names += [ln.split("=>")[1].split()[0] for ln in out.splitlines() if "libcudart" in ln and "=>" in ln]
        except Exception:  # noqa: BLE001
            pass
        for name in names:
            if not name:
                continue
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
        raise RuntimeError("no CUDA runtime library found")

    def close(self) -> None:
        """Free the held memory."""
        if self.ptr.value:
            self.lib.cudaFree(self.ptr)
            self.ptr = ctypes.c_void_p()
