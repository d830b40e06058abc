"""GPU tensor throughput for the prompt side of the speed model: by name, else by cores x clock."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from offload.planner.cost import SpeedParams, gpu_flops
from offload.planner.gpu_specs import llama_share, tensor_flops
from offload.planner.hardware import PROFILES_DIR, load_profile


def test_an_h200_has_the_tensor_flops_of_the_h100_it_shares_a_chip_with() -> None:
    assert tensor_flops("NVIDIA H200") == tensor_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert tensor_flops("NVIDIA H100 PCIe") == 756e12
    # Not the bandwidth's guess, which put an H200 at 1.4x an H100.
    hw = load_profile("h100-sxm")
    h200 = replace(hw.gpus[0], name="NVIDIA H200", mem_bandwidth_Bps=4.8e12, fp16_flops=0.0)
    h100 = replace(hw.gpus[0], fp16_flops=0.0)
    params = SpeedParams()
    assert gpu_flops(replace(hw, gpus=(h200,)), 0, params) == pytest.approx(
        gpu_flops(replace(hw, gpus=(h100,)), 0, params)
    )


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA GeForce RTX 4060 Ti", 88.4),  # not the 4060's figure
        ("NVIDIA GeForce RTX 4060", 60.5),
        ("NVIDIA GeForce RTX 3090 Ti", 160.0),
        ("NVIDIA GeForce RTX 3090", 142.0),
        ("NVIDIA RTX 6000 Ada Generation", 364.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", 65.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
    ],
)
def test_known_gpus_go_by_their_datasheet_figure(name: str, tflops: float) -> None:
    assert tensor_flops(name) == pytest.approx(tflops * 1e12)


def test_every_shipped_profile_agrees_with_the_table() -> None:
    for path in sorted(PROFILES_DIR.glob("*.json")):
        for g in json.loads(path.read_text()).get("gpus", []):
            if "laptop" not in g["name"].lower():
                assert tensor_flops(g["name"]) == pytest.approx(g["fp16_flops"], rel=0.01), path


def test_unknown_names_and_laptop_parts_go_by_cores_and_clock() -> None:
    assert tensor_flops("NVIDIA A10G") == 0.0  # nothing known, nothing probed
    # An Ada laptop part at NVML's maximum clock, which a GeForce does not hold under load.
    laptop = tensor_flops("NVIDIA GeForce RTX 4060 Laptop GPU", "8.9", 3072, 2370.0)
    assert laptop == pytest.approx(3072 * 2370e6 * 0.8 * 8)
    # A data-centre part the table lacks: its maximum clock, Hopper's figure per core and clock.
    assert tensor_flops("NVIDIA Hopper part", "9.0", 16896, 1980.0) == pytest.approx(
        989e12, rel=0.01
    )
    assert tensor_flops("Some Future GPU", "13.0", 20000, 2000.0) == 0.0


def test_the_share_llama_cpp_reaches_is_relative_to_hopper() -> None:
    assert llama_share("NVIDIA H200") == llama_share("NVIDIA H100 PCIe") == 1.0
    assert llama_share("NVIDIA B200", "10.0") == 1.0
    assert llama_share("NVIDIA GeForce RTX 3060", "8.6") > 2.0
    # An RTX 3060 profile: its 51 TF reach more than the same figure on Hopper would.
    hw = load_profile("rtx3060")
    assert gpu_flops(hw, 0, SpeedParams()) == pytest.approx(51e12 * llama_share(hw.gpus[0].name))
