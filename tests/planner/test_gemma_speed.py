"""Predicted decode speed on the real Gemma 3 270M matches a measurement on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import psutil
import pytest

from offload.planner import PlanRequest, anatomy, plan
from offload.planner.types import CPUInfo, Hardware


def _measure_decode_tps(path: Path, threads: int, n_tokens: int = 64) -> float:
    m = llama_cpp.Llama(
        str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    try:
        best = 0.0
        for _ in range(2):  # the first run warms the page cache and the repacked weights
            m.reset()
            toks = m.tokenize(b"The history of the printing press begins")
            n, t_first = 0, 0.0
            for _tok in m.generate(toks, temp=0.0):
                if n == 0:
                    t_first = time.perf_counter()
                n += 1
                if n > n_tokens:
                    break
            best = max(best, n_tokens / (time.perf_counter() - t_first))
        return best
    finally:
        m.close()


def _probe_read_Bps(cores: int) -> float:
    # A fresh process, as `offload hardware` probes: after llama.cpp ran in this one (its OpenMP
    # threads, its freed buffers) numpy's bandwidth readings here swing far from the truth.
    code = f"from offload.planner.bandwidth import cpu_read_Bps; print(cpu_read_Bps({cores}))"
    return float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )


def test_cpu_decode_prediction_within_25_percent_of_measured(gemma_path: Path) -> None:
    # The development machine is shared: a neighbour's test run starves llama.cpp's spinning threads
    # (decode drops 5-10x) long before it dents a bandwidth probe. Rounds are measured back to back;
    # a miss on a quiet machine fails, a miss while others load the cores is inconclusive (skip).
    cores = psutil.cpu_count(logical=False) or 1
    a = anatomy.read(gemma_path)
    seen = []
    for _ in range(3):
        busy = os.getloadavg()[0] > cores + 0.5
        hw = Hardware(
            "here",
            CPUInfo(
                cores=cores,
                ram_bytes=psutil.virtual_memory().total,
                mem_bandwidth_Bps=_probe_read_Bps(cores),
            ),
        )
        predicted = plan(a, hw, PlanRequest(n_ctx=4096, prompt_tokens=8)).predicted.decode_tps
        measured = _measure_decode_tps(gemma_path, cores)
        busy = busy or os.getloadavg()[0] > cores + 0.5
        seen.append(
            (
                round(predicted, 1),
                round(measured, 1),
                round(hw.cpu.mem_bandwidth_Bps / 1e9, 1),
                busy,
            )
        )
        print(
            f"read {seen[-1][2]} GB/s; gemma decode predicted {predicted:.1f} t/s, measured {measured:.1f} t/s"
        )
        if 0.75 <= predicted / measured <= 1.25:
            return
    if all(r[3] for r in seen):
        pytest.skip(
            f"machine busy (load {os.getloadavg()[0]:.1f} on {cores} cores); rounds: {seen}"
        )
    pytest.fail(f"(predicted t/s, measured t/s, read GB/s, busy) per round: {seen}")
