"""Bad input gives a typed error naming the file and the problem, without big allocations."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from offload.planner import GGUFError, anatomy
from tests import synth


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def test_non_gguf_file_names_file_and_magic(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is not a model at all")
    with pytest.raises(GGUFError, match="notes.txt.*magic"):
        anatomy.read(p)


def test_truncated_model_is_reported_as_truncated(tmp_path: Path) -> None:
    p = synth.write_model(tmp_path / "m.gguf", synth.tiny_llama())
    size = p.stat().st_size
    with p.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(GGUFError, match="truncated"):
        anatomy.read(p)


def test_absurd_counts_are_refused_before_allocating(tmp_path: Path) -> None:
    p = tmp_path / "absurd.gguf"
    p.write_bytes(_header(1 << 60, 1 << 60) + bytes(64))
    with pytest.raises(GGUFError, match="absurd.gguf.*more than the 65536 and 65536 allowed"):
        anatomy.read(p)


def test_counts_beyond_the_file_are_refused_before_allocating(tmp_path: Path) -> None:
    p = tmp_path / "short.gguf"
    p.write_bytes(_header(60000, 60000) + bytes(64))
    with pytest.raises(GGUFError, match="short.gguf.*more than the file holds"):
        anatomy.read(p)


def test_absurd_string_length_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "longkey.gguf"
    p.write_bytes(_header(0, 1) + struct.pack("<Q", 1 << 50) + bytes(64))
    with pytest.raises(GGUFError, match="claims"):
        anatomy.read(p)


def test_absurd_array_length_is_refused(tmp_path: Path) -> None:
    key = b"tokenizer.ggml.tokens"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, 1 << 40)
    p = tmp_path / "arr.gguf"
    p.write_bytes(_header(0, 1) + body + bytes(64))
    with pytest.raises(GGUFError, match="claims"):
        anatomy.read(p)


def test_missing_file_is_a_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="cannot open"):
        anatomy.read(tmp_path / "nope.gguf")
