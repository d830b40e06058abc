"""Rewrite a GGUF file's header: change, add or drop metadata and tensor entries, keep the data.

Hostile-model tests start from the real embedded model and change one thing. The header is parsed
here byte by byte (not with our reader, which is what is under test), values are re-encoded, and
the tensor data follows at the new aligned offset: copied (``copy_data=True``, for files llama.cpp
must be able to load) or left as a hole (a sparse file, for what only the header reader sees).
"""

from __future__ import annotations

import math
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = [
    "GGUFLayout",
    "Value",
    "read_layout",
    "write_layout",
    "encode_value",
    "T_U8", "T_I8", "T_U16", "T_I16", "T_U32", "T_I32", "T_F32", "T_BOOL", "T_STRING",
    "T_ARRAY", "T_U64", "T_I64", "T_F64",
]  # fmt: skip

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_U64, T_I64, T_F64 = 8, 9, 10, 11, 12
_FMT = {T_U8: "<B", T_I8: "<b", T_U16: "<H", T_I16: "<h", T_U32: "<I", T_I32: "<i", T_F32: "<f",
        T_BOOL: "<?", T_U64: "<Q", T_I64: "<q", T_F64: "<d"}  # fmt: skip


@dataclass(frozen=True)
class Value:
    """One metadata value as it sits in the file: its type and its encoded bytes."""

    vtype: int
    raw: bytes


@dataclass(frozen=True)
class Tensor:
    """One tensor-table entry."""

    name: bytes
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass
class GGUFLayout:
    """A GGUF file taken apart: metadata, tensor table, where the data starts and how long it is."""

    source: Path
    version: int
    kv: dict[str, Value] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)
    data_offset: int = 0
    data_bytes: int = 0
    # Counts written to the header; None writes the real counts.
    n_tensors_override: int | None = None
    n_kv_override: int | None = None

    def copy(self) -> GGUFLayout:
        """An independent copy to mutate."""
        return replace(self, kv=dict(self.kv), tensors=list(self.tensors))

    def set(self, key: str, vtype: int, value: Any) -> GGUFLayout:
        """Set ``key`` to ``value`` encoded as ``vtype`` (in place; returns self)."""
        self.kv[key] = Value(vtype, encode_value(vtype, value))
        return self

    def set_raw(self, key: str, vtype: int, raw: bytes) -> GGUFLayout:
        """Set ``key`` to already-encoded bytes (which may be malformed on purpose)."""
        self.kv[key] = Value(vtype, raw)
        return self


def _string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def encode_value(vtype: int, value: Any) -> bytes:
    """GGUF's encoding of ``value`` as ``vtype``; arrays are ``(element type, [items])``."""
    if vtype == T_STRING:
        return _string(value if isinstance(value, bytes) else str(value).encode())
    if vtype == T_ARRAY:
        etype, items = value
        out = struct.pack("<IQ", etype, len(items))
        return out + b"".join(encode_value(etype, item) for item in items)
    fmt = _FMT[vtype]
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, float(value))
    if fmt == "<?":
        return struct.pack("<B", int(bool(value)))
    # Integers wrap to the field's width, as a writer in another language would store them.
    bits = struct.calcsize(fmt) * 8
    v = int(value) % (1 << bits)
    if fmt[1].islower() and v >= 1 << (bits - 1):
        v -= 1 << bits
    return struct.pack(fmt, v)


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = bytes(self.data[self.pos : self.pos + n])
        if len(out) != n:
            raise ValueError("truncated")
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def value_end(self, vtype: int) -> None:
        if vtype in _FMT:
            self.pos += struct.calcsize(_FMT[vtype])
        elif vtype == T_STRING:
            n = self.unpack("<Q")
            self.pos += n
        elif vtype == T_ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _FMT:
                self.pos += n * struct.calcsize(_FMT[etype])
            else:
                for _ in range(n):
                    self.value_end(etype)
        else:
            raise ValueError(f"unknown type {vtype}")


def read_layout(path: Path) -> GGUFLayout:
    """Take a well-formed GGUF file apart."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(min(size, 64 << 20))
    c = _Cursor(memoryview(head))
    if c.take(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version = c.unpack("<I")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    layout = GGUFLayout(source=path, version=version)
    for _ in range(n_kv):
        key = c.take(c.unpack("<Q")).decode()
        vtype = c.unpack("<I")
        start = c.pos
        c.value_end(vtype)
        layout.kv[key] = Value(vtype, bytes(head[start : c.pos]))
    for _ in range(n_tensors):
        name = c.take(c.unpack("<Q"))
        n_dims = c.unpack("<I")
        dims = tuple(c.unpack("<Q") for _ in range(n_dims))
        layout.tensors.append(Tensor(name, dims, c.unpack("<I"), c.unpack("<Q")))
    align = _alignment(layout)
    layout.data_offset = c.pos + (-c.pos % align)
    layout.data_bytes = size - layout.data_offset
    return layout


def _alignment(layout: GGUFLayout) -> int:
    v = layout.kv.get("general.alignment")
    if v is None or v.vtype != T_U32:
        return 32
    a = struct.unpack("<I", v.raw)[0]
    return a if a > 0 and a & (a - 1) == 0 else 32


def header_bytes(layout: GGUFLayout) -> bytes:
    """The header a layout writes, up to (not including) the alignment padding."""
    n_t = len(layout.tensors) if layout.n_tensors_override is None else layout.n_tensors_override
    n_kv = len(layout.kv) if layout.n_kv_override is None else layout.n_kv_override
    out = [b"GGUF", struct.pack("<IQQ", layout.version, n_t, n_kv)]
    for key, v in layout.kv.items():
        out += [_string(key.encode()), struct.pack("<I", v.vtype), v.raw]
    for t in layout.tensors:
        out += [_string(t.name), struct.pack("<I", len(t.dims))]
        out += [struct.pack("<Q", d % (1 << 64)) for d in t.dims]
        out += [struct.pack("<IQ", t.ggml_type, t.offset % (1 << 64))]
    return b"".join(out)


def write_layout(layout: GGUFLayout, dest: Path, *, copy_data: bool = False) -> Path:
    """Write the header, then the source's tensor data (copied, or a sparse hole) after it."""
    head = header_bytes(layout)
    align = _alignment(layout)
    pad = -len(head) % align
    with dest.open("wb") as out:
        out.write(head + bytes(pad))
        if copy_data:
            with layout.source.open("rb") as src:
                src.seek(layout.data_offset)
                shutil.copyfileobj(src, out, 16 << 20)
        else:
            out.truncate(len(head) + pad + layout.data_bytes)
    return dest


def f32_specials() -> list[float]:
    """Float values a hostile file may hold where a positive one is expected."""
    return [math.nan, math.inf, -math.inf, 0.0, -1e-6, -0.0]
