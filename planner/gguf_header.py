"""A fast, bounded reader of GGUF headers: metadata and tensor table, never the weights.

``gguf.GGUFReader`` maps the whole file and materialises every array (the tokenizer alone takes
seconds); planning only needs the header, so this reader walks it with ``struct`` and skips large
arrays without building them. Every count and length is checked against the file size first, so a
corrupt header cannot make us allocate what it claims.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from offload.planner.errors import GGUFError

__all__ = ["GGUFHeader", "RawTensor", "read_header"]

_MAGIC = b"GGUF"
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are skipped (their length is kept) unless named in ``keep_arrays``:
# tokenizer vocabularies are 100k+ strings that a planner never needs.
_MAX_KEPT_ARRAY = 4096
_MAX_STRING_BYTES = 64 << 20
_MAX_DIMS = 4


@dataclass(frozen=True)
class RawTensor:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the header of a GGUF file says."""

    path: str
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: tuple[RawTensor, ...]
    data_offset: int
    file_bytes: int


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(self.path, problem)

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise self.fail(f"header runs past the end of the file at byte {self.f.tell()} (truncated?)")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail("unexpected end of file (truncated?)")
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def u64(self) -> int:
        return self.scalar("<Q")

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING_BYTES or self.f.tell() + n > self.size:
            raise self.fail(f"a string claims {n} bytes, more than the file holds")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        if self.f.tell() + n > self.size:
            raise self.fail(f"a string claims {n} bytes, more than the file holds")
        self.f.seek(n, os.SEEK_CUR)

    def value(self, vtype: int, key: str, keep_arrays: frozenset[str], lengths: dict[str, int]) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("<I")
            n = self.u64()
            lengths[key] = n
            item = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else None
            if etype not in _SCALARS and etype != _STRING:
                raise self.fail(f"metadata {key!r} has an array of unknown type {etype}")
            min_bytes = n * (item if item else 8)
            if self.f.tell() + min_bytes > self.size:
                raise self.fail(f"metadata {key!r} claims {n} items, more than the file holds")
            if n > _MAX_KEPT_ARRAY and key not in keep_arrays:
                if item:
                    self.f.seek(n * item, os.SEEK_CUR)
                else:
                    for _ in range(n):
                        self.skip_string()
                return None
            if item:
                fmt = "<" + _SCALARS[etype].lstrip("<") * n if etype != 7 else "?" * n
                return list(struct.unpack(fmt, self.read(n * item)))
            return [self.string() for _ in range(n)]
        raise self.fail(f"metadata {key!r} has unknown value type {vtype}")


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    return n // block * type_bytes


def read_header(path: str | os.PathLike[str], keep_arrays: frozenset[str] = frozenset()) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor table; raise ``GGUFError`` on anything malformed."""
    p = Path(path)
    try:
        size = p.stat().st_size
        f = p.open("rb")
    except OSError as e:
        raise GGUFError(p, f"cannot open it ({e.strerror})") from None
    with f:
        r = _Reader(f, p, size)
        if size < 24:
            raise r.fail(f"only {size} bytes long")
        if r.read(4) != _MAGIC:
            raise r.fail("wrong magic (expected 'GGUF'); is this a GGUF model?")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise r.fail(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.u64(), r.u64()
        # Each tensor entry needs at least 8+4+8+4+8 bytes, each key/value at least 8+4.
        if n_tensors * 32 + n_kv * 12 > size:
            raise r.fail(f"header claims {n_tensors} tensors and {n_kv} keys, more than the file holds")
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.scalar("<I")
            metadata[key] = r.value(vtype, key, keep_arrays, lengths)
        entries = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > _MAX_DIMS:
                raise r.fail(f"tensor {name!r} claims {n_dims} dimensions")
            shape = tuple(r.u64() for _ in range(n_dims))
            ggml_type = r.scalar("<I")
            offset = r.u64()
            try:
                nbytes = _tensor_nbytes(ggml_type, shape)
            except ValueError as e:
                raise r.fail(f"tensor {name!r}: {e}") from None
            entries.append((name, shape, ggml_type, offset, nbytes))
        alignment = int(metadata.get("general.alignment", 32) or 32)
        pos = f.tell()
        data_offset = pos + (-pos % alignment)
        tensors = []
        for name, shape, ggml_type, offset, nbytes in entries:
            if data_offset + offset + nbytes > size:
                raise r.fail(
                    f"tensor {name!r} ends at byte {data_offset + offset + nbytes}, past the end of "
                    f"the file ({size} bytes): the file is truncated"
                )
            tensors.append(RawTensor(name, shape, ggml_type, offset, nbytes))
    return GGUFHeader(str(p), version, metadata, lengths, tuple(tensors), data_offset, size)
