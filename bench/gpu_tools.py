"""Helpers of the GPU sweep that talk to the outside: nvidia-smi, and llama.cpp's own
``llama-fit-params`` and ``llama-bench``.

Each degrades to ``None`` (and a note) where the thing is absent, so the sweep runs on a CPU too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "gpu_memory",
    "PeakMonitor",
    "parse_fit_params",
    "run_fit_params",
    "fit_bench_args",
    "plan_bench_args",
    "run_llama_bench",
    "parse_buffers",
]


def gpu_memory() -> list[dict[str, Any]] | None:
    """Every GPU as nvidia-smi counts it (MiB); None without nvidia-smi or a GPU."""
    try:
        r = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.total,memory.used,memory.free",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = []
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5 and parts[0].isdigit():
            rows.append(
                {
                    "index": int(parts[0]),
                    "name": parts[1],
                    "total_mib": int(parts[2]),
                    "used_mib": int(parts[3]),
                    "free_mib": int(parts[4]),
                }
            )
    return rows or None


class PeakMonitor:
    """The largest ``memory.used`` per GPU that nvidia-smi reports every 100 ms while open."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.peaks: dict[int, int] = {}
        self.samples = 0
        self.proc: subprocess.Popen[str] | None = None
        try:
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=index,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    str(interval_ms),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                i, used = int(parts[0]), int(parts[1])
                self.peaks[i] = max(self.peaks.get(i, 0), used)
                self.samples += 1

    def close(self) -> dict[int, int] | None:
        """Stop sampling; the peaks (MiB by GPU index), or None when nvidia-smi never answered."""
        if self.proc is None:
            return None
        time.sleep(0.25)  # one more sample after the measured process has gone
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.thread.join(timeout=5)
        return dict(self.peaks) if self.samples else None


_NGL = re.compile(r"(?:^|\s)(?:-ngl|--n-gpu-layers|--gpu-layers)[\s=]+(-?\d+)")
_CTX = re.compile(r"(?:^|\s)(?:-c|--ctx-size)[\s=]+(\d+)")
_TS = re.compile(r"(?:^|\s)(?:-ts|--tensor-split)[\s=]+([\d.,/;]+)")
_OT = re.compile(r"(?:^|\s)(?:-ot|--override-tensor)[\s=]+(\"[^\"]*\"|'[^']*'|\S+)")


def parse_fit_params(text: str) -> dict[str, Any] | None:
    """``-c``, ``-ngl``, ``-ts`` and the ``-ot PATTERN=BUFT,...`` overrides that llama-fit-params prints."""
    lines = [ln for ln in text.splitlines() if _NGL.search(ln)]
    if not lines:
        return None
    line = lines[-1]
    overrides: list[list[str]] = []
    for m in _OT.finditer(line):
        value = shlex.split(m[1])[0] if m[1][:1] in "\"'" else m[1]
        # Overrides are comma-separated PATTERN=BUFT pairs (llama.cpp's -ot syntax).
        for pm in re.finditer(r"([^,]+?)=([A-Za-z0-9_]+)(?:,|$)", value):
            overrides.append([pm[1], pm[2]])
    ts = _TS.search(line)
    ctx = _CTX.search(line)
    return {
        "n_gpu_layers": int(_NGL.search(line)[1]),  # type: ignore[index]
        "n_ctx": int(ctx[1]) if ctx else None,
        "tensor_split": [float(x) for x in re.split(r"[,/;]", ts[1]) if x] if ts else [],
        "overrides": overrides,
        "cpu_tensor_patterns": [p for p, b in overrides if b.upper() == "CPU"],
        "other_overrides": [p for p, b in overrides if b.upper() != "CPU"],
        "line": line.strip(),
    }


def run_fit_params(
    tool: Path,
    model: Path,
    n_ctx: int,
    margins_mib: list[int],
    extra: list[str] | None = None,
    timeout_s: float = 180,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``llama-fit-params`` for per-device margins (MiB of free memory to leave)."""
    cmd = [
        str(tool),
        "-m",
        str(model),
        "-c",
        str(n_ctx),
        "-fa",
        "on",
        "-fitt",
        ",".join(str(m) for m in margins_mib),
        *(extra or []),
    ]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"cmd": shlex.join(cmd), "error": str(e)}
    out = r.stdout + "\n" + r.stderr
    return {
        "cmd": shlex.join(cmd),
        "rc": r.returncode,
        "wall_s": round(time.monotonic() - t0, 2),
        "parsed": parse_fit_params(r.stdout) if r.returncode == 0 else None,
        "output_tail": out[-1500:],
    }


def _check_patterns(patterns: list[str]) -> None:
    for p in patterns:
        # llama-bench splits -ot values on ',' (test variants) and ';' (patterns).
        if "," in p or ";" in p:
            raise ValueError(f"tensor pattern {p!r} holds a separator llama-bench cannot take")


def fit_bench_args(parsed: dict[str, Any]) -> list[str]:
    """llama-bench arguments that replay a llama-fit-params line."""
    args = ["-ngl", str(parsed["n_gpu_layers"])]
    if len([x for x in parsed.get("tensor_split") or [] if x > 0]) > 1:
        args += ["-ts", "/".join(f"{x:g}" for x in parsed["tensor_split"])]
    if parsed.get("overrides"):
        _check_patterns([p for p, _ in parsed["overrides"]])
        args += ["-ot", ";".join(f"{p}={b}" for p, b in parsed["overrides"])]
    return args


# Plan keys the replay applies or that do not change what llama-bench runs.
_PLAN_KEYS = {
    "n_gpu_layers",
    "cpu_tensor_patterns",
    "gpu_tensor_patterns",
    "tensor_split",
    "n_batch",
    "n_ubatch",
    "threads",
    "threads_batch",
    "kv_type",
    "flash_attn",
    "use_mmap",
    "op_offload",
    "main_gpu",
    "split_mode",
    "offload_kqv",
    "devices",
    "predicted",
    "reasons",
    "n_ctx",
    "n_ctx_total",
    "n_parallel",
    "optimize",
    "model_path",
    "hardware_fingerprint",
    "use_mlock",
    "swa_full",
    "workload",
    "pinned_weights",
}


# llama.cpp's name for the buffer type of GPU i, as its -ot option takes it (the CUDA backend).
GPU_BUFT = "CUDA"


def override_rules(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """A plan's tensor overrides as (pattern, buffer type) in llama.cpp's order: the GPU ones
    first (a tensor takes the first pattern it matches), then the CPU ones."""
    rules = [(str(p), f"{GPU_BUFT}{int(g)}") for p, g in plan.get("gpu_tensor_patterns") or []]
    return rules + [(str(p), "CPU") for p in plan.get("cpu_tensor_patterns") or []]


def plan_bench_args(plan: dict[str, Any]) -> tuple[list[str], list[str]]:
    """llama-bench arguments that replay an ``offload plan --json`` placement, and notes on what
    llama-bench cannot express."""
    notes: list[str] = []
    args = ["-ngl", str(plan["n_gpu_layers"])]
    split = [float(x) for x in plan.get("tensor_split") or []]
    if len([x for x in split if x > 0]) > 1:
        args += ["-ts", "/".join(f"{x:g}" for x in split)]
    rules = override_rules(plan)
    if rules:
        _check_patterns([p for p, _ in rules])
        args += ["-ot", ";".join(f"{p}={b}" for p, b in rules)]
    args += ["-b", str(plan.get("n_batch", 2048)), "-ub", str(plan.get("n_ubatch", 512))]
    if plan.get("threads"):
        args += ["-t", str(plan["threads"])]
    if plan.get("threads_batch") and plan.get("threads_batch") != plan.get("threads"):
        notes.append(
            f"threads_batch {plan['threads_batch']} not expressible: llama-bench uses -t for both"
        )
    kv = plan.get("kv_type") or "f16"
    if kv != "f16":
        args += ["-ctk", kv, "-ctv", kv]
    args += ["-fa", "1" if plan.get("flash_attn") else "0"]
    mapped = plan.get("use_mmap", True)
    args += ["-lm", "mmap" if mapped else "none"]
    if not mapped and plan.get("pinned_weights") is False:
        args += ["--no-host", "1"]  # read in, but into ordinary memory: llama.cpp would pin it
    if plan.get("op_offload") is False:
        args += ["-nopo", "1"]
    if plan.get("offload_kqv") is False:
        args += ["-nkvo", "1"]
    if plan.get("main_gpu"):
        args += ["-mg", str(plan["main_gpu"])]
    if plan.get("split_mode", "layer") != "layer":
        args += ["-sm", str(plan["split_mode"])]
    unknown = sorted(set(plan) - _PLAN_KEYS)
    if unknown:
        notes.append(f"plan keys not replayed: {', '.join(unknown)}")
    return args, notes


_BUF = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")
_OOM = re.compile(
    r"out of memory|cudaMalloc failed|failed to allocate|unable to allocate|ErrorOutOfDeviceMemory",
    re.IGNORECASE,
)


def parse_buffers(log: str) -> dict[str, dict[str, float]]:
    """llama.cpp's buffer sizes by buffer type (``CUDA0``, ``CUDA_Host``, ``CPU_Mapped``...) and kind,
    in MiB; the largest of each where several contexts were made."""
    out: dict[str, dict[str, float]] = {}
    for m in _BUF.finditer(log):
        kinds = out.setdefault(m[1], {})
        kinds[m[2]] = max(kinds.get(m[2], 0.0), float(m[3]))
    return out


def run_llama_bench(
    tool: Path,
    model: Path,
    args: list[str],
    *,
    prompt: int,
    gen: int,
    reps: int = 1,
    timeout_s: float = 300,
    env: dict[str, str] | None = None,
    monitor: bool = True,
    more_prompts: tuple[int, ...] = (),
    depth: int = 0,
) -> dict[str, Any]:
    """One llama-bench process (one load of the model): prompt and decode t/s, llama.cpp's buffers
    and, with nvidia-smi, the peak memory of every GPU while it ran. ``prompt_tps`` is at
    ``prompt`` tokens; ``prompt_tps_at`` has every length, ``more_prompts`` included (measured in
    the same load). With ``depth``, every test also runs with that many tokens already in the
    context (llama-bench -d), and ``decode_tps_at_depth`` has the decode there: a request's answer
    is decoded after its prompt, where CPU-resident attention reads the KV cache at every token."""
    lengths = [prompt, *(n for n in more_prompts if n != prompt)]
    cmd = [
        str(tool),
        "-m",
        str(model),
        *args,
        "-p",
        ",".join(str(n) for n in lengths),
        "-n",
        str(gen),
        *(["-d", f"0,{depth}"] if depth else []),
        "-r",
        str(reps),
        "-o",
        "json",
        "-v",
    ]
    res: dict[str, Any] = {"cmd": shlex.join(cmd)}
    mon = PeakMonitor() if monitor else None
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
    except OSError as e:
        if mon:
            mon.close()
        return {**res, "error": str(e)}
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        res["error"] = f"timed out after {timeout_s:.0f} s"
    res["wall_s"] = round(time.monotonic() - t0, 2)
    res["gpu_peak_mib"] = mon.close() if mon else None
    res["rc"] = proc.returncode
    res["buffers_mib"] = parse_buffers(stderr)
    res["oom"] = bool(proc.returncode and _OOM.search(stderr))
    lm = re.search(r"load_mode = (\S+)\)", stderr)
    res["load_mode"] = lm[1] if lm else None
    try:
        rows = json.loads(stdout[stdout.index("[") :])
        for row in rows:
            if row.get("n_depth"):
                if row.get("n_gen") and not row.get("n_prompt"):
                    res.setdefault("decode_tps_at_depth", {})[str(row["n_depth"])] = row.get(
                        "avg_ts"
                    )
                continue
            if row.get("n_prompt") and not row.get("n_gen"):
                res.setdefault("prompt_tps_at", {})[str(row["n_prompt"])] = row.get("avg_ts")
                if row["n_prompt"] == prompt:
                    res["prompt_tps"] = row.get("avg_ts")
                    res["prompt_samples_ts"] = row.get("samples_ts")
            elif row.get("n_gen") and not row.get("n_prompt"):
                res["decode_tps"] = row.get("avg_ts")
                res["decode_samples_ts"] = row.get("samples_ts")
        if rows:
            keep = (
                "build_commit",
                "n_threads",
                "n_gpu_layers",
                "n_batch",
                "n_ubatch",
                "type_k",
                "type_v",
                "flash_attn",
                "load_mode",
                "tensor_split",
                "tensor_buft_overrides",
                "gpu_info",
                "backends",
            )
            res["bench_row"] = {k: rows[0].get(k) for k in keep if k in rows[0]}
    except (ValueError, TypeError) as e:
        res.setdefault("error", f"no llama-bench JSON: {e}")
    if "error" in res or proc.returncode:
        res["stderr_tail"] = stderr[-2500:]
    return res
