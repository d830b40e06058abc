"""Fixtures of the model-library tests: stores, synthetic files, a registry (gemma_gguf is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from offload.models.store import Store
from tests.registry_server import RegistryServer
from tests.synth import write_lora, write_model


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def reg() -> Iterator[RegistryServer]:
    with RegistryServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("synth") / "tiny-f32.gguf")


@pytest.fixture(scope="session")
def lora_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora(tmp_path_factory.mktemp("synth") / "pirate-lora.gguf", scale=0.01)
