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


@pytest.mark.parametrize(
    ("bad", "problem", "shown"),
    [
        ("gemma3:270m\n", "control character (U+000A)", "gemma3:270m\\n"),
        ("ns/m:t\r", "control character (U+000D)", "ns/m:t\\r"),
        ("a\x00b", "control character (U+0000)", "a\\x00b"),
        ("a\x1b[31m", "control character (U+001B)", "a\\x1b[31m"),
        ("m\x9b", "control character (U+009B)", "m\\x9b"),
        ("\ngemma3", "control character (U+000A)", "\\ngemma3"),
        (" gemma3", "begins or ends with whitespace", " gemma3"),
        ("gemma3:270m ", "begins or ends with whitespace", "gemma3:270m "),
        ("gemma3\u00a0", "begins or ends with whitespace", "gemma3\\xa0"),
    ],
)
def test_control_characters_and_outer_whitespace_are_refused_not_stripped(
    bad: str, problem: str, shown: str
) -> None:
    with pytest.raises(InvalidModelName) as info:
        parse_name(bad)
    assert problem in str(info.value)
    # The name is shown with its control characters escaped, on one line.
    assert f'"{shown}"' in str(info.value) and str(info.value).isprintable()


@pytest.mark.parametrize("name", ["a", "ns/m:t", "h.example:8080/ns/m.v2:Q4_K_M", "hf.co/U/R:T"])
def test_valid_names_map_inside_the_store(name: str, tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = store.manifest_path(parse_name(name)).resolve()
    assert path.is_relative_to((tmp_path / "manifests").resolve())
    assert len(path.relative_to((tmp_path / "manifests").resolve()).parts) == 4
