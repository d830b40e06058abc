"""The memory model agrees with what llama.cpp itself allocates for the real Gemma 3 270M."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from offload.planner import Placement, anatomy
from offload.planner.evaluate import memory_by_device
from offload.planner.placement import CPU
from offload.planner.types import CPUInfo, Hardware

_MiB = 1 << 20
_SIZES = {
    "model": re.compile(r"CPU_Mapped model buffer size =\s+([\d.]+) MiB"),
    "kv": re.compile(r"llama_kv_cache:\s+CPU KV buffer size =\s+([\d.]+) MiB"),
    "compute": re.compile(r"CPU compute buffer size =\s+([\d.]+) MiB"),
    "output": re.compile(r"CPU\s+output buffer size =\s+([\d.]+) MiB"),
}


def _llama_sizes(path: Path, **kw: object) -> dict[str, float]:
    # In a subprocess: other tests may have routed llama.cpp's log elsewhere (llama_log_set).
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    code = (
        f"import llama_cpp\nm = llama_cpp.Llama({str(path)!r}, verbose=True, n_threads=2, {args})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-2000:]
    return {k: sum(float(x) for x in rx.findall(log)) * _MiB for k, rx in _SIZES.items()}


@pytest.mark.parametrize(
    "n_ctx,n_ubatch,flash_attn,kv,swa_full",
    [
        (4096, 512, False, "f16", True),
        (16384, 256, True, "q8_0", True),
        (8192, 128, False, "f16", False),
    ],
)
def test_memory_model_within_5_percent_plus_64_mib(
    gemma_path: Path, n_ctx, n_ubatch, flash_attn, kv, swa_full
) -> None:
    kw = dict(n_ctx=n_ctx, n_batch=512, n_ubatch=n_ubatch, flash_attn=flash_attn, swa_full=swa_full)
    if kv == "q8_0":
        kw.update(type_k=8, type_v=8)  # GGML_TYPE_Q8_0
    real = _llama_sizes(gemma_path, **kw)
    a = anatomy.read(gemma_path)
    hw = Hardware("cpu", CPUInfo(cores=2, ram_bytes=16 << 30, mem_bandwidth_Bps=20e9))
    pl = Placement(
        0,
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=n_ubatch,
        flash_attn=flash_attn,
        kv_type=kv,
        swa_full=swa_full,
    )
    weights, kv_bytes, compute, _ = memory_by_device(a, hw, pl)[CPU]
    predicted = {"model": weights, "kv": kv_bytes, "compute": compute}
    real_compute = real["compute"] + real["output"]
    for key, want in (("model", real["model"]), ("kv", real["kv"]), ("compute", real_compute)):
        assert want > 0, f"llama.cpp log had no {key} size"
        assert abs(predicted[key] - want) <= 0.05 * want + 64 * _MiB, (
            key,
            predicted[key] / _MiB,
            want / _MiB,
        )
    # Tighter than the target where the model is exact: KV cells and mapped weights.
    assert abs(predicted["kv"] - real["kv"]) <= 0.01 * real["kv"] + _MiB
    assert abs(predicted["model"] - real["model"]) <= _MiB
