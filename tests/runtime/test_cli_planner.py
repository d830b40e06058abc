"""`offload plan` and `offload hardware` through click, on the real Gemma and synthetic models."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner

from offload.runtime.cli_planner import parse_size, register
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
    assert parse_size("8GiB") == 8 << 30 and parse_size("8G") == 8 << 30
    assert parse_size("7.5GB") == 7_500_000_000 and parse_size("512MiB") == 512 << 20


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
