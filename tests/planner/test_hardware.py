"""Hardware probe, its cache keyed by fingerprint, and shipped profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload.planner import PlanRequest, plan
from offload.planner import hardware as hw_mod
from offload.planner.errors import HardwareProfileError
from offload.planner.types import Hardware


def test_probe_measures_cpu_bandwidth_and_notes_what_it_could_not(monkeypatch) -> None:
    hw = hw_mod.probe()
    assert hw.cpu.cores >= 1 and hw.cpu.ram_bytes > 0
    assert 1e9 < hw.cpu.mem_bandwidth_Bps < 2e12
    if not hw.gpus:
        assert any("GPU" in n for n in hw.notes)
    assert Hardware.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw


def test_current_caches_the_profile_and_reuses_it(tmp_path: Path) -> None:
    cache = tmp_path / "data" / "hardware.json"
    first = hw_mod.current(cache)
    assert cache.exists() and not list(cache.parent.glob("*.tmp"))
    second = hw_mod.current(cache)
    assert second.measured_at == first.measured_at and second.fingerprint == first.fingerprint
    assert second.cpu.mem_bandwidth_Bps == first.cpu.mem_bandwidth_Bps


def test_current_probes_again_when_the_fingerprint_differs(tmp_path: Path) -> None:
    cache = tmp_path / "hardware.json"
    stale = {**hw_mod.load_profile("rtx3060").to_dict(), "fingerprint": "some-other-machine"}
    cache.write_text(json.dumps(stale))
    hw = hw_mod.current(cache)
    assert hw.fingerprint == hw_mod.fingerprint()
    assert json.loads(cache.read_text())["fingerprint"] == hw.fingerprint


def test_refresh_probes_even_with_a_matching_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hardware.json"
    first = hw_mod.current(cache)
    data = json.loads(cache.read_text())
    data["cpu"]["mem_bandwidth_Bps"] = 1.0
    cache.write_text(json.dumps(data))
    assert hw_mod.current(cache).cpu.mem_bandwidth_Bps == 1.0
    assert hw_mod.current(cache, refresh=True).cpu.mem_bandwidth_Bps > 1e6
    assert first.fingerprint == hw_mod.fingerprint()


@pytest.mark.parametrize(
    "name", ["rtx4060-laptop", "rtx3060", "rtx3090", "rtx4090", "cpu-only-laptop", "h100-sxm"]
)
def test_shipped_profiles_load_and_plan(name: str, mistral) -> None:
    hw = hw_mod.load_profile(name)
    assert hw.cpu.ram_bytes >= 8 << 30 and hw.cpu.mem_bandwidth_Bps > 10e9
    for g in hw.gpus:
        assert g.vram_bytes >= 8 << 30 and g.mem_bandwidth_Bps > g.h2d_bandwidth_Bps > 1e9
    p = plan(mistral, hw, PlanRequest(n_ctx=4096))
    assert p.predicted.decode_tps > 0 and all(d.total_bytes <= d.budget_bytes for d in p.devices)


def test_profile_from_a_json_file_and_a_missing_one(tmp_path: Path) -> None:
    f = tmp_path / "mine.json"
    f.write_text(
        json.dumps(
            {
                "name": "mine",
                "cpu": {"cores": 4, "ram_bytes": 8 << 30, "mem_bandwidth_Bps": 30e9},
                "gpus": [
                    {
                        "name": "G",
                        "vram_bytes": 6 << 30,
                        "mem_bandwidth_Bps": 300e9,
                        "h2d_bandwidth_Bps": 12e9,
                    }
                ],
            }
        )
    )
    hw = hw_mod.load_profile(f)
    assert hw.name == "mine" and hw.gpus[0].vram_bytes == 6 << 30
    with pytest.raises(HardwareProfileError, match="rtx3060"):
        hw_mod.load_profile("no-such-machine")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(HardwareProfileError, match="bad.json"):
        hw_mod.load_profile(bad)


VULKAN_GPU = {
    "index": 1,
    "name": "Vulkan0",
    "description": "AMD Radeon RX 7900 XTX",
    "type": "GPU",
    "backend": "Vulkan",
    "memory_total_bytes": 24 << 30,
    "memory_free_bytes": 23 << 30,
}


@pytest.fixture
def no_nvml_gpu() -> None:
    if hw_mod._gpu_ids():
        pytest.skip("NVML sees a GPU here; the device-list path is for machines without NVML")


def test_gpus_come_from_llamas_device_list_where_nvml_finds_none(
    no_nvml_gpu: None, mistral
) -> None:
    cpu_dev = {
        "name": "CPU",
        "type": "CPU",
        "memory_total_bytes": 64 << 30,
        "memory_free_bytes": 60 << 30,
    }
    hw = hw_mod.probe(measure=False, backend_devices=[cpu_dev, VULKAN_GPU])
    (g,) = hw.gpus
    assert (g.name, g.index, g.vram_bytes, g.vram_free_bytes) == (
        "AMD Radeon RX 7900 XTX",
        0,
        24 << 30,
        23 << 30,
    )
    assert g.mem_bandwidth_Bps > 0 and g.h2d_bandwidth_Bps > 0
    assert any("no NVML" in n and "assumed" in n for n in hw.notes)
    assert Hardware.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw
    p = plan(mistral, hw, PlanRequest(n_ctx=4096))  # the whole 7B model fits its 23 GiB free
    assert p.n_gpu_layers == mistral.n_layers + 1 and all(
        d.total_bytes <= d.budget_bytes for d in p.devices
    )


def test_device_list_bandwidths_come_from_the_copy_probe_or_a_profile(no_nvml_gpu: None) -> None:
    measured = {
        **VULKAN_GPU,
        "h2d_pinned_Bps": 25e9,
        "h2d_pageable_Bps": 9e9,
        "device_copy_Bps": 1.6e12,
    }
    asked: list[int] = []

    def measure() -> list[dict]:
        asked.append(1)
        return [measured]

    hw = hw_mod.probe(backend_devices=[VULKAN_GPU], measure_backend=measure)
    (g,) = hw.gpus
    assert asked == [1] and g.h2d_bandwidth_Bps == 25e9 and g.h2d_pageable_Bps == 9e9
    assert g.mem_bandwidth_measured_Bps == 1.6e12 and g.mem_bandwidth_Bps == pytest.approx(
        1.6e12 / 0.85
    )
    assert any("measured through llama.cpp" in n for n in hw.notes)
    rtx = {**VULKAN_GPU, "description": "NVIDIA GeForce RTX 3060", "memory_total_bytes": 12 << 30}
    (p,) = hw_mod.probe(measure=False, backend_devices=[rtx]).gpus
    assert p.mem_bandwidth_Bps == hw_mod.load_profile("rtx3060").gpus[0].mem_bandwidth_Bps


def test_cache_is_probed_again_when_a_gpu_build_appears_and_free_memory_follows_it(
    tmp_path: Path, no_nvml_gpu: None
) -> None:
    cache = tmp_path / "hardware.json"
    assert hw_mod.current(cache).gpus == ()
    hw = hw_mod.current(cache, backend_devices=[VULKAN_GPU], measure_backend=lambda: [VULKAN_GPU])
    assert (
        len(hw.gpus) == 1
        and hw.fingerprint == hw_mod.fingerprint([VULKAN_GPU]) != hw_mod.fingerprint()
    )
    later = hw_mod.current(cache, backend_devices=[{**VULKAN_GPU, "memory_free_bytes": 5 << 30}])
    assert later.measured_at == hw.measured_at and later.gpus[0].vram_free_bytes == 5 << 30
