"""What llama.cpp can use here, asked in a child process; plans that follow it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from offload.planner import hardware as hw_mod
from offload.planner.types import CPUInfo, GPUInfo, Hardware
from offload.runtime.cli.plan import register
from offload.runtime.serving import backends

GiB = 1 << 30


def test_probe_child_reports_this_build_and_its_devices() -> None:
    r = backends.probe(refresh=True)
    assert r.ok, r.error
    assert r.llama_cpp_version == importlib.metadata.version("llama_cpp_python")
    cpu = [d for d in r.devices if d["type"] == "CPU"]
    assert len(cpu) == 1 and cpu[0]["memory_total_bytes"] > 0 and cpu[0]["backend"] == "CPU"
    assert r.gpu_offload is bool(r.gpu_devices)
    # The same child runs as a module and prints one JSON object.
    out = subprocess.run(
        [sys.executable, "-m", "offload.runtime.runner.probe"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1])["devices"] == list(
        r.devices
    )


def test_probe_is_asked_once_per_install_and_again_after_a_reinstall() -> None:
    first = backends.probe(refresh=True)
    assert backends.probe() is first
    import llama_cpp  # only to find the library a reinstall would replace

    lib = next((Path(llama_cpp.__file__).parent / "lib").glob("libllama*"))
    st = lib.stat()
    try:
        os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        again = backends.probe()
        assert again is not first and again.devices == first.devices
    finally:
        os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns))


def _broken_llama_cpp(tmp_path: Path, body: str) -> dict[str, str]:
    pkg = tmp_path / "llama_cpp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body)
    return {"PYTHONPATH": str(tmp_path)}


def test_a_crashing_probe_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        for k, v in _broken_llama_cpp(
            tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
        ).items():
            m.setenv(k, v)
        r = backends.probe(refresh=True)
    backends.probe(refresh=True)  # leave the cache with the real answer
    assert not r.ok and "signal 11" in (r.error or "")
    hw = Hardware(
        "box",
        CPUInfo(cores=4, ram_bytes=16 * GiB, mem_bandwidth_Bps=30e9),
        gpus=(GPUInfo("NVIDIA GeForce RTX 3060", 12 * GiB, 360e9, 21e9),),
    )
    usable = backends.usable_hardware(hw, r)
    assert usable.hardware.gpus == hw.gpus and usable.warning is None
    assert any("could not ask llama.cpp" in n for n in usable.hardware.notes)


def test_a_hanging_probe_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        for k, v in _broken_llama_cpp(tmp_path, "import time\ntime.sleep(60)\n").items():
            m.setenv(k, v)
        r = backends.probe(refresh=True, timeout_s=2)
    backends.probe(refresh=True)
    assert not r.ok and "within 2 s" in (r.error or "")


def _with_gpus(n: int) -> Hardware:
    gpus = tuple(
        GPUInfo("NVIDIA GeForce RTX 3060", 12 * GiB, 360e9, 21e9, index=i, vram_free_bytes=11 * GiB)
        for i in range(n)
    )
    return Hardware("box", CPUInfo(cores=8, ram_bytes=32 * GiB, mem_bandwidth_Bps=38e9), gpus=gpus)


def test_gpus_stay_when_llama_cpp_can_use_them_and_are_cut_to_the_ones_it_sees() -> None:
    gpu = {
        "name": "CUDA0",
        "description": "NVIDIA GeForce RTX 3060",
        "type": "GPU",
        "memory_total_bytes": 12 * GiB,
        "memory_free_bytes": 11 * GiB,
    }
    report = backends.BackendReport(
        ok=True, llama_cpp_version="0.3.36", gpu_offload=True, devices=(gpu,)
    )
    assert backends.usable_hardware(_with_gpus(1), report).hardware == _with_gpus(1)
    cut = backends.usable_hardware(_with_gpus(2), report)
    assert (
        len(cut.hardware.gpus) == 1
        and cut.warning is None
        and "1 of the 2 GPUs" in cut.hardware.notes[-1]
    )
    cpu_build = backends.BackendReport(
        ok=True,
        llama_cpp_version="0.3.36",
        gpu_offload=False,
        devices=({"name": "CPU", "type": "CPU"},),
    )
    none = backends.usable_hardware(_with_gpus(2), cpu_build)
    assert (
        none.hardware.gpus == ()
        and none.warning
        and "2 GPUs (NVIDIA GeForce RTX 3060)" in none.warning
    )
    assert backends.gpu_install_command() in none.warning


@pytest.fixture
def gpu_in_nvml_cpu_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This machine's cached profile as NVML would write it with an RTX 3060 in it; llama.cpp is
    the real build installed here, which must be one without GPU support."""
    if backends.probe().gpu_offload:
        pytest.skip("llama.cpp here is built with GPU support")
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    hw = hw_mod.load_profile("rtx3060").to_dict()
    hw["fingerprint"] = hw_mod.fingerprint()
    (tmp_path / "hardware.json").write_text(json.dumps(hw))
    return tmp_path


def _cli() -> click.Group:
    g = click.Group()
    register(g)
    return g


def test_hardware_says_plainly_that_llama_cpp_cannot_use_the_gpu(
    gpu_in_nvml_cpu_build: Path,
) -> None:
    r = CliRunner().invoke(_cli(), ["hardware"])
    assert r.exit_code == 0, r.output
    assert "NVIDIA GeForce RTX 3060" in r.stderr and "built without GPU support" in r.stderr
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in r.stderr and "llama-cpp-python==" in r.stderr
    assert "No GPUs llama.cpp can use." in r.stdout
    data = json.loads(CliRunner().invoke(_cli(), ["hardware", "--json"]).stdout)
    assert data["gpus"] == [] and any("without GPU support" in n for n in data["notes"])


def test_plan_warns_and_plans_for_the_cpu_meanwhile(
    gpu_in_nvml_cpu_build: Path, tmp_path: Path
) -> None:
    from tests import synth

    model = synth.write_model(tmp_path / "mistral.gguf", synth.mistral_7b())
    r = CliRunner().invoke(_cli(), ["plan", str(model), "--json"])
    assert r.exit_code == 0, r.output
    assert "built without GPU support" in r.stderr
    p = json.loads(r.stdout)
    assert p["n_gpu_layers"] == 0 and [d["kind"] for d in p["devices"]] == ["CPU"]
    assert "built without GPU support" in p["reasons"][-1]
    # A profile is a machine we don't have: no llama.cpp check, no warning.
    r = CliRunner().invoke(_cli(), ["plan", str(model), "--json", "--hardware", "rtx3060"])
    assert r.exit_code == 0 and not r.stderr and json.loads(r.stdout)["n_gpu_layers"] > 0


def test_copy_probe_through_ggml_buffers_measures_the_cpu_device() -> None:
    """The ctypes signatures the copy probe uses on GPUs, exercised on the CPU device."""
    import llama_cpp

    from offload.runtime.runner import probe

    g = probe._Ggml(Path(llama_cpp.__file__).parent / "lib")
    cpu = next(
        g.ggml_backend_dev_get(i)
        for i in range(g.ggml_backend_dev_count())
        if g.ggml_backend_dev_type(g.ggml_backend_dev_get(i)) == 0
    )
    bw = probe._copy_bandwidths(g, cpu, n_bytes=32 << 20)
    assert bw["h2d_pageable_Bps"] > 1e8 and bw["device_copy_Bps"] > 1e8
