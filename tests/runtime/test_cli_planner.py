"""`offload plan` and `offload hardware` through click, on the real Gemma and synthetic models."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from offload.runtime.cli.plan import register
from offload.runtime.config import parse_bytes
from tests import synth


def _cli() -> click.Group:
    g = click.Group()
    register(g)
    return g


def test_plan_json_for_a_gguf_path_on_a_profile(tmp_path: Path) -> None:
    model = synth.write_model(tmp_path / "mistral.gguf", synth.mistral_7b())
    r = CliRunner().invoke(
        _cli(),
        [
            "plan",
            str(model),
            "--hardware",
            "rtx3060",
            "--gpu-memory",
            "4GiB",
            "--ctx",
            "8192",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["n_ctx"] == 8192 and d["devices"][0]["name"] == "CPU"
    gpu = d["devices"][1]
    assert gpu["budget_bytes"] == 4 << 30 and gpu["total_bytes"] <= gpu["budget_bytes"]
    assert d["predicted"]["decode_tps"] > 0 and d["reasons"]


def test_plan_human_output_shows_devices_speeds_and_reasons(tmp_path: Path) -> None:
    model = synth.write_model(tmp_path / "moe.gguf", synth.qwen3_30b_a3b())
    r = CliRunner().invoke(_cli(), ["plan", str(model), "--hardware", "rtx3060"])
    assert r.exit_code == 0, r.output
    assert (
        "Memory per device" in r.output and "tokens/s decode" in r.output and "experts" in r.output
    )


def test_plan_of_a_non_gguf_file_is_a_one_line_error(tmp_path: Path) -> None:
    f = tmp_path / "x.gguf"
    f.write_text("nope")
    r = CliRunner().invoke(_cli(), ["plan", str(f), "--hardware", "rtx3060"])
    assert r.exit_code != 0 and "x.gguf" in r.output and "Traceback" not in r.output


def test_hardware_json_uses_the_data_dir_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    r = CliRunner().invoke(_cli(), ["hardware", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["cpu"]["mem_bandwidth_Bps"] > 0
    assert (tmp_path / "hardware.json").exists()


def test_hardware_shows_a_profile() -> None:
    r = CliRunner().invoke(_cli(), ["hardware", "--profile", "rtx4060-laptop"])
    assert r.exit_code == 0 and "RTX 4060" in r.output


def test_sizes_parse_like_ollama() -> None:
    assert (
        parse_bytes("8GiB") == 8 << 30
        and parse_bytes("8G") == 8 << 30
        and parse_bytes("8g") == 8 << 30
    )
    assert parse_bytes("7.5GB") == 7_500_000_000 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("1000") == 1000


def _gpu_budget(tmp_path: Path, args: list[str], env: dict[str, str]) -> int:
    model = tmp_path / "mistral.gguf"
    if not model.exists():
        synth.write_model(model, synth.mistral_7b())
    r = CliRunner().invoke(
        _cli(), ["plan", str(model), "--hardware", "rtx3060", "--json", *args], env=env
    )
    assert r.exit_code == 0, r.output
    return json.loads(r.output)["devices"][1]["budget_bytes"]


@pytest.mark.parametrize("size,expected", [("8G", 8 << 30), ("8GiB", 8 << 30), ("8GB", 8 * 10**9)])
def test_gpu_memory_reads_the_same_from_the_flag_and_the_environment(
    tmp_path: Path, size: str, expected: int
) -> None:
    from_flag = _gpu_budget(tmp_path, ["--gpu-memory", size], {"OFFLOAD_GPU_MEMORY": ""})
    from_env = _gpu_budget(tmp_path, [], {"OFFLOAD_GPU_MEMORY": size})
    assert from_flag == from_env == expected


def test_a_gpu_budget_larger_than_the_card_is_a_one_line_error_naming_both(tmp_path: Path) -> None:
    model = synth.write_model(tmp_path / "mistral.gguf", synth.mistral_7b())
    r = CliRunner().invoke(
        _cli(), ["plan", str(model), "--hardware", "rtx3060", "--gpu-memory", "16GiB"]
    )
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "16.00 GiB" in r.output and "12.00 GiB" in r.output


def test_a_gpu_budget_below_the_smallest_gpu_plan_is_a_one_line_error_naming_both(
    tmp_path: Path,
) -> None:
    model = synth.write_model(tmp_path / "mistral.gguf", synth.mistral_7b())
    r = CliRunner().invoke(
        _cli(), ["plan", str(model), "--hardware", "rtx3060", "--gpu-memory", "300MiB"]
    )
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "300 MiB" in r.output and "smallest plan that uses the GPU" in r.output


@pytest.mark.parametrize("bad", ["0,256", "1024", "1024,-1", "x,y", "99999999,1"])
def test_an_absurd_workload_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    model = synth.write_model(tmp_path / "m.gguf", synth.tiny_llama())
    r = CliRunner().invoke(_cli(), ["plan", str(model), "--hardware", "rtx3060", "--workload", bad])
    assert r.exit_code == 2 and "--workload" in r.output and "Traceback" not in r.output


def test_plan_shows_the_workload_it_planned_for(tmp_path: Path) -> None:
    model = synth.write_model(tmp_path / "moe.gguf", synth.qwen3_30b_a3b())
    r = CliRunner().invoke(
        _cli(), ["plan", str(model), "--hardware", "rtx3060", "--workload", "4000,50"]
    )
    assert r.exit_code == 0, r.output
    assert "4000 prompt + 50 answer tokens" in r.output and "a request" in r.output
    d = json.loads(
        CliRunner().invoke(_cli(), ["plan", str(model), "--hardware", "rtx3060", "--json"]).output
    )
    assert d["workload"] == {
        "prompt_tokens": 1024,
        "answer_tokens": 256,
        "source": "default",
        "requests": 0,
    }
    assert d["optimize"] == "workload" and d["predicted"]["request_s"] > 0


def test_balanced_is_still_accepted_as_the_workload_mode(tmp_path: Path) -> None:
    model = synth.write_model(tmp_path / "m.gguf", synth.mistral_7b())
    outs = [
        json.loads(
            CliRunner()
            .invoke(
                _cli(), ["plan", str(model), "--hardware", "rtx3060", "--optimize", o, "--json"]
            )
            .output
        )
        for o in ("balanced", "workload")
    ]
    assert outs[0] == outs[1] and outs[0]["optimize"] == "workload"


def test_plan_resolves_a_model_name_through_the_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    monkeypatch.delenv("OFFLOAD_MODELS", raising=False)
    r = CliRunner().invoke(
        _cli(), ["plan", "gemma3:270m", "--hardware", "cpu-only-laptop", "--json"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["n_gpu_layers"] == 0 and d["devices"][0]["weights_bytes"] > 200 << 20


def test_an_unknown_model_name_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    r = CliRunner().invoke(_cli(), ["plan", "no-such-model", "--hardware", "rtx3060"])
    assert r.exit_code != 0 and "no-such-model" in r.output and "Traceback" not in r.output
