"""Tensor-core throughput of NVIDIA GPUs, for the prompt-processing side of the speed model.

Prompt processing is compute-bound, so the speed model needs a GPU's matmul throughput. NVML does
not report it, and inferring it from memory bandwidth is wrong across a family: an H200 has 1.4x
an H100's bandwidth on the same chip with the same tensor cores. Recorded llama-bench prompts on
H200s ran 15-48% slower than a bandwidth-derived figure predicted, and 2% off with the H100's
989 TFLOPS (bench/results, ``revalidate.py``).

Figures are dense FP16 tensor flops with FP16 accumulate, as NVIDIA's datasheets give them (the
shipped profiles use the same figure). Where a name is not known, CUDA cores x SM clock x the
figure per core and clock of the architecture gives it.
"""

from __future__ import annotations

import functools
import re

__all__ = ["tensor_flops", "llama_share"]

# (pattern on the lower-cased NVML name, dense FP16 tensor TFLOPS with FP16 accumulate). More
# specific names first: the first match wins. Laptop parts run at very different clocks from one
# machine to the next and go by the per-core figure instead.
_KNOWN_TFLOPS: tuple[tuple[str, float], ...] = (
    # Hopper
    (r"\bgh200\b", 989.0),
    (r"\bh200\b.*\bnvl\b", 836.0),
    (r"\bh200\b", 989.0),
    (r"\bh100\b.*\bnvl\b", 835.0),
    (r"\bh100\b.*\bpcie\b", 756.0),
    (r"\bh100\b", 989.0),
    (r"\bh800\b.*\bpcie\b", 756.0),
    (r"\bh800\b", 989.0),
    (r"\bh20\b", 148.0),  # a Hopper chip with its tensor cores cut down: not cores x clock
    # Ampere and Ada, data centre and workstation
    (r"\ba100\b", 312.0),
    (r"\ba30\b", 165.0),
    (r"\ba40\b", 150.0),
    (r"\ba10\b", 125.0),
    (r"\brtx a6000\b", 155.0),
    (r"\brtx a5000\b", 111.0),
    (r"\brtx a4000\b", 76.7),
    (r"\bl40s\b", 362.0),
    (r"\bl40\b", 181.0),
    (r"\bl4\b", 121.0),
    (r"\brtx 6000 ada\b", 364.0),
    # Turing and Volta
    (r"\bt4\b", 65.0),
    (r"\bv100\b", 125.0),
    (r"\btitan rtx\b", 130.5),
    # GeForce RTX 50, 40, 30, 20
    (r"\brtx 5090\b", 419.0),
    (r"\brtx 5080\b", 225.0),
    (r"\brtx 5070 ti\b", 176.0),
    (r"\brtx 5070\b", 123.0),
    (r"\brtx 5060 ti\b", 95.0),
    (r"\brtx 5060\b", 77.0),
    (r"\brtx 4090\b", 330.0),
    (r"\brtx 4080 super\b", 209.0),
    (r"\brtx 4080\b", 195.0),
    (r"\brtx 4070 ti super\b", 176.0),
    (r"\brtx 4070 ti\b", 160.0),
    (r"\brtx 4070 super\b", 142.0),
    (r"\brtx 4070\b", 117.0),
    (r"\brtx 4060 ti\b", 88.4),
    (r"\brtx 4060\b", 60.5),
    (r"\brtx 3090 ti\b", 160.0),
    (r"\brtx 3090\b", 142.0),
    (r"\brtx 3080 ti\b", 136.0),
    (r"\brtx 3080\b", 119.0),
    (r"\brtx 3070 ti\b", 87.0),
    (r"\brtx 3070\b", 81.3),
    (r"\brtx 3060 ti\b", 64.8),
    (r"\brtx 3060\b", 51.0),
    (r"\brtx 3050\b", 36.4),
    (r"\brtx 2080 ti\b", 107.6),
    (r"\brtx 2080 super\b", 89.2),
    (r"\brtx 2080\b", 80.5),
    (r"\brtx 2070 super\b", 72.5),
    (r"\brtx 2070\b", 59.7),
    (r"\brtx 2060 super\b", 57.4),
    (r"\brtx 2060\b", 51.6),
)

# Dense FP16 tensor flops (FP16 accumulate) per CUDA core and SM clock, by compute capability:
# RTX 2060 1920 cores x 1.68 GHz x 16 = 51.6 TF; A100 6912 x 1.41 x 32 = 312; RTX 3060
# 3584 x 1.78 x 8 = 51; RTX 4090 16384 x 2.52 x 8 = 330; H100 SXM 16896 x 1.98 (NVML's maximum)
# x 29.6 = 989.
_PER_CORE_CLOCK: dict[str, float] = {
    "7.0": 16.0,
    "7.2": 16.0,
    "7.5": 16.0,
    "8.0": 32.0,
    "8.6": 8.0,
    "8.7": 8.0,
    "8.9": 8.0,
    "9.0": 29.6,
    "12.0": 8.0,
}
# NVML's maximum SM clock of a GeForce card lies above its rated boost clock (RTX 4090: about
# 3.1 GHz against 2.52), where the card does not run under a sustained matmul load.
_GEFORCE_CLOCK_SHARE = 0.8

# What llama.cpp's quantized matmuls (int8 MMA, written for Ampere) reach of that figure, relative
# to Hopper, whose datasheet figure counts instructions those kernels do not use. The speed model's
# gpu_flops_eff is fitted on an H100 (~10k t/s for a 7B shape, 0.14 of its 989 TF); public
# llama-bench prompt runs on an RTX 2080 Ti, 3090 and 4090 reach 0.33-0.41 of theirs.
_NON_HOPPER_SHARE = 2.6
_HOPPER_LIKE = re.compile(r"\b(gh200|h200|h100|h800|h20|gb200|b200|b100)\b")


@functools.lru_cache(maxsize=64)  # the speed model asks for every prediction the search makes
def tensor_flops(
    name: str, compute_capability: str = "", cores: int = 0, sm_clock_mhz: float = 0.0
) -> float:
    """Dense FP16 tensor flops of this GPU (FP16 accumulate); 0.0 where nothing tells."""
    lowered = name.lower()
    if "laptop" not in lowered and "mobile" not in lowered:
        for pattern, tflops in _KNOWN_TFLOPS:
            if re.search(pattern, lowered):
                return tflops * 1e12
    per = _PER_CORE_CLOCK.get(compute_capability, 0.0)
    if not (per and cores > 0 and sm_clock_mhz > 0):
        return 0.0
    share = _GEFORCE_CLOCK_SHARE if "geforce" in lowered or "laptop" in lowered else 1.0
    return cores * sm_clock_mhz * 1e6 * share * per


def llama_share(name: str, compute_capability: str = "") -> float:
    """How much more of ``tensor_flops`` llama.cpp's prompt kernels reach on this GPU than on
    Hopper, the architecture the speed model's flops efficiency was fitted on."""
    major = compute_capability.split(".", 1)[0]
    if major in ("9", "10") or _HOPPER_LIKE.search(name.lower()):
        return 1.0
    return _NON_HOPPER_SHARE
