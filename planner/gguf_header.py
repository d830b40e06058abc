"""A fast, bounded reader of GGUF headers: metadata and tensor table, never the weights.

``gguf.GGUFReader`` maps the whole file and materialises every array (the tokenizer alone takes
seconds); planning only needs the header, so this reader walks it through a small window and
skips large arrays without building them. A model file is untrusted input: every count and length
is checked against the file size and against fixed caps before anything is allocated, the tensor
table is checked as llama.cpp's loader checks it, and the hyperparameters are checked against what
llama.cpp asserts on (``gguf_limits``), so a hostile header costs a ``GGUFError``, not a crash.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from offload.planner.errors import GGUFError
from offload.planner.gguf_limits import check_metadata

__all__ = [
    "GGUFHeader",
    "RawTensor",
    "read_header",
    "MAX_KV",
    "MAX_TENSORS",
    "MAX_KEY_BYTES",
    "MAX_STRING_BYTES",
    "MAX_ARRAY_ITEMS",
    "MAX_HELD_BYTES",
]

_MAGIC = b"GGUF"
_SCALARS = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
               6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
               12: "float64"}  # fmt: skip
_STRING, _ARRAY, _U32 = 8, 9, 4
_U64 = struct.Struct("<Q")
_WINDOW_BYTES = 1 << 20
# Arrays longer than this are skipped (their length is kept) unless named in ``keep_arrays``:
# tokenizer vocabularies are 100k+ strings that a planner never needs.
_MAX_KEPT_ARRAY = 4096
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL
_INT64_MAX = (1 << 63) - 1

#: Caps on what a header may make us read or hold. Real models sit far below each: a few dozen
#: keys, a few thousand tensors, chat templates of tens of KB, vocabularies of a few 100k tokens.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_KEY_BYTES = 1024
MAX_STRING_BYTES = 1 << 20
MAX_ARRAY_ITEMS = 1 << 24
#: Strings and short arrays kept in memory, all keys together.
MAX_HELD_BYTES = 16 << 20


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
    #: GGUF value type of each key (8 = string, 9 = array, ...), for checks that care.
    value_types: dict[str, int] = field(default_factory=dict)


class _Reader:
    """Sequential reads over a file through a bounded window, each checked against the file end."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.buf = b""
        self.buf_start = 0  # file offset of buf[0]
        self.at = 0  # read position inside buf
        self.held = 0

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(self.path, problem)

    def tell(self) -> int:
        return self.buf_start + self.at

    def _need(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise self.fail(
                f"header runs past the end of the file at byte {self.tell()} (truncated?)"
            )
        if len(self.buf) - self.at >= n:
            return
        pos = self.tell()
        self.f.seek(pos)
        data = self.f.read(max(n, _WINDOW_BYTES))
        if len(data) < n:
            raise self.fail("unexpected end of file (truncated?)")
        self.buf, self.buf_start, self.at = data, pos, 0

    def read(self, n: int) -> bytes:
        self._need(n)
        out = self.buf[self.at : self.at + n]
        self.at += n
        return out

    def skip(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise self.fail(f"a value claims {n} bytes, more than the file holds")
        if len(self.buf) - self.at >= n:
            self.at += n
        else:
            self.buf, self.buf_start, self.at = b"", self.tell() + n, 0

    def scalar(self, st: struct.Struct) -> Any:
        self._need(st.size)
        v = st.unpack_from(self.buf, self.at)[0]
        self.at += st.size
        return v

    def u32(self) -> int:
        return self.scalar(_SCALARS[_U32])

    def u64(self) -> int:
        return self.scalar(_U64)

    def length(self, what: str, cap: int) -> int:
        """A string's byte length, refused when over ``cap`` or past the end of the file."""
        n = self.u64()
        if n > cap:
            raise self.fail(f"{what} claims {n} bytes, more than the {cap} allowed")
        if self.tell() + n > self.size:
            raise self.fail(f"{what} claims {n} bytes, more than the file holds")
        return n

    def string(self, what: str, cap: int = MAX_STRING_BYTES, hold: bool = True) -> str:
        n = self.length(what, cap)
        if hold:
            self.hold(n, what)
        return self.read(n).decode("utf-8", errors="replace")

    def hold(self, n: int, what: str) -> None:
        self.held += n
        if self.held > MAX_HELD_BYTES:
            raise self.fail(
                f"its metadata holds more than {MAX_HELD_BYTES >> 20} MiB (at {what}); "
                "no real model needs that much"
            )

    def value(
        self, vtype: int, key: str, keep_arrays: frozenset[str], lengths: dict[str, int]
    ) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(f"metadata {key!r}")
        if vtype != _ARRAY:
            raise self.fail(f"metadata {key!r} has unknown value type {vtype}")
        etype = self.u32()
        n = self.u64()
        lengths[key] = n
        if etype not in _SCALARS and etype != _STRING:
            raise self.fail(f"metadata {key!r} has an array of unknown type {etype}")
        if n > MAX_ARRAY_ITEMS:
            raise self.fail(
                f"metadata {key!r} claims {n} items, more than the {MAX_ARRAY_ITEMS} allowed"
            )
        item = _SCALARS[etype].size if etype in _SCALARS else 0
        if self.tell() + n * (item or 8) > self.size:
            raise self.fail(f"metadata {key!r} claims {n} items, more than the file holds")
        keep = n <= _MAX_KEPT_ARRAY or key in keep_arrays
        if item:
            if not keep:
                self.skip(n * item)
                return None
            self.hold(n * 8, f"metadata {key!r}")
            st = _SCALARS[etype]
            data = self.read(n * item)
            return [v[0] for v in st.iter_unpack(data)]
        if not keep:
            what = f"an item of metadata {key!r}"
            for _ in range(n):
                self.skip(self.length(what, MAX_STRING_BYTES))
            return None
        self.hold(n * 8, f"metadata {key!r}")
        return [self.string(f"an item of metadata {key!r}") for _ in range(n)]


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ValueError(f"has unknown ggml type {ggml_type}") from None
    if any(d > _INT64_MAX for d in shape):
        raise ValueError(f"has a dimension over 2^63 ({shape})")
    n = 1
    for d in shape:
        n *= d
    if n > _INT64_MAX:
        raise ValueError(f"has {n} elements, more than llama.cpp can index ({shape})")
    if shape and shape[0] % block:
        raise ValueError(f"rows of {shape[0]} elements are not whole blocks of {block}")
    return n // block * type_bytes


def _alignment(r: _Reader, metadata: dict[str, Any], types: dict[str, int]) -> int:
    if "general.alignment" not in metadata:
        return 32
    value, vtype = metadata["general.alignment"], types["general.alignment"]
    if vtype != _U32:
        raise r.fail(
            f"general.alignment is a {_TYPE_NAMES.get(vtype, vtype)} ({str(value)[:40]!r}), "
            "expected a uint32 power of two"
        )
    if value <= 0 or value & (value - 1):
        raise r.fail(f"general.alignment is {value}, expected a power of two")
    return value


def read_header(
    path: str | os.PathLike[str], keep_arrays: frozenset[str] = frozenset()
) -> GGUFHeader:
    """Read and check a GGUF file's metadata and tensor table; ``GGUFError`` on anything unusable."""
    p = Path(path)
    try:
        # Non-blocking, then checked on the open file: a FIFO or device never blocks us, even one
        # swapped in after a caller looked at the path.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise GGUFError(p, f"cannot open it ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise GGUFError(p, "it is not a regular file")
    size = st.st_size
    with f:
        r = _Reader(f, p, size)
        if size < 24:
            raise r.fail(f"only {size} bytes long")
        if r.read(4) != _MAGIC:
            raise r.fail("wrong magic (expected 'GGUF'); is this a GGUF model?")
        version = r.u32()
        if version not in (2, 3):
            raise r.fail(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.u64(), r.u64()
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise r.fail(
                f"header claims {n_tensors} tensors and {n_kv} keys, more than the "
                f"{MAX_TENSORS} and {MAX_KV} allowed"
            )
        # Each tensor entry needs at least 8+4+8+4+8 bytes, each key/value at least 8+4.
        if n_tensors * 32 + n_kv * 12 > size:
            raise r.fail(
                f"header claims {n_tensors} tensors and {n_kv} keys, more than the file holds"
            )
        metadata: dict[str, Any] = {}
        types: dict[str, int] = {}
        lengths: dict[str, int] = {}
        for i in range(n_kv):
            key = r.string(f"key {i}", MAX_KEY_BYTES)
            if not key:
                raise r.fail(f"key {i} is empty")
            if key in metadata:
                raise r.fail(f"key {key!r} appears twice")
            vtype = r.u32()
            types[key] = vtype
            metadata[key] = r.value(vtype, key, keep_arrays, lengths)
        alignment = _alignment(r, metadata, types)
        entries = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}", MAX_KEY_BYTES)
            if len(name.encode()) > _MAX_NAME_BYTES:
                raise r.fail(f"tensor name {name[:80]!r} is longer than {_MAX_NAME_BYTES} bytes")
            if name in names:
                raise r.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = r.u32()
            if n_dims > _MAX_DIMS:
                raise r.fail(f"tensor {name!r} claims {n_dims} dimensions")
            shape = tuple(r.u64() for _ in range(n_dims))
            ggml_type = r.u32()
            offset = r.u64()
            try:
                nbytes = _tensor_nbytes(ggml_type, shape)
            except ValueError as e:
                raise r.fail(f"tensor {name!r} {e}") from None
            entries.append((name, shape, ggml_type, offset, nbytes))
        pos = r.tell()
        data_offset = pos + (-pos % alignment)
        tensors = []
        expected = 0
        for name, shape, ggml_type, offset, nbytes in entries:
            # llama.cpp wants the data laid out in table order, each tensor padded to the alignment.
            if offset != expected:
                raise r.fail(f"tensor {name!r} has data offset {offset}, expected {expected}")
            if data_offset + offset + nbytes > size:
                raise r.fail(
                    f"tensor {name!r} ends at byte {data_offset + offset + nbytes}, past the end of "
                    f"the file ({size} bytes): the file is truncated"
                )
            expected = offset + nbytes + (-nbytes % alignment)
            tensors.append(RawTensor(name, shape, ggml_type, offset, nbytes))
    header = GGUFHeader(
        str(p), version, metadata, lengths, tuple(tensors), data_offset, size, types
    )
    check_metadata(header.path, metadata, lengths, [t.name for t in tensors])
    return header
