"""Model names: Ollama's defaults, hf.co names, and nothing that can escape the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from offload.models.errors import InvalidModelName
from offload.models.names import parse_name
from offload.models.store import Store


def test_defaults_fill_host_namespace_and_tag() -> None:
    n = parse_name("Gemma3")
    assert (n.host, n.namespace, n.model, n.tag) == (
        "registry.ollama.ai",
        "library",
        "gemma3",
        "latest",
    )
    assert parse_name("me/model:v1").display == "me/model:v1"
    assert parse_name("127.0.0.1:5000/a/b").host == "127.0.0.1:5000"


def test_hugging_face_names_keep_their_case_and_quant_tag() -> None:
    n = parse_name("hf.co/unsloth/Qwen3-0.6B-GGUF:Q4_K_M")
    assert (n.host, n.namespace, n.model, n.tag) == (
        "hf.co",
        "unsloth",
        "Qwen3-0.6B-GGUF",
        "Q4_K_M",
    )
    assert parse_name("huggingface.co/bartowski/Llama-3.2-1B-Instruct-GGUF").host == "hf.co"
    with pytest.raises(InvalidModelName, match="hf.co/user/repo"):
        parse_name("hf.co/justarepo")


@pytest.mark.parametrize(
    "bad",
    ["../x", "a/../../b", "/etc/passwd", "x:../../y", "a/b/c/d", "..", "a/..", "x y", "a\\b",
     "host/ns/..", ".hidden", "a:b:c/d", "", "   ", "m:", "ns/.", "evil/../../../tmp:latest"],
)  # fmt: skip
def test_names_that_could_escape_the_store_are_refused(bad: str) -> None:
    with pytest.raises(InvalidModelName) as info:
        parse_name(bad)
    assert "invalid model name" in str(info.value)


@pytest.mark.parametrize("name", ["a", "ns/m:t", "h.example:8080/ns/m.v2:Q4_K_M", "hf.co/U/R:T"])
def test_valid_names_map_inside_the_store(name: str, tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = store.manifest_path(parse_name(name)).resolve()
    assert path.is_relative_to((tmp_path / "manifests").resolve())
    assert len(path.relative_to((tmp_path / "manifests").resolve()).parts) == 4
