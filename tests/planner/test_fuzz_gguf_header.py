"""Half a minute of fuzzing the GGUF header reader with mutations of the real embedded model's
header (OFFLOAD_FUZZ_SECONDS for longer).

Mutations aim at the header's structure (counts, lengths, value types, dimensions, offsets get
boundary values) as well as at random bytes, slices and truncations. Whatever the bytes, reading
the header, building the anatomy, and what ``show`` and ``create`` derive from it must end in a
``GGUFError`` or a result, within a second or two and without holding much memory.
"""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import time
from pathlib import Path

import pytest

from offload.models.create import gguf_config
from offload.models.show import model_info
from offload.planner import GGUFError, anatomy
from offload.planner.gguf_header import read_header
from tests.gguf_mutate import T_ARRAY, T_STRING, GGUFLayout, header_bytes, read_layout
from tests.planner.test_hostile_gguf import trimmed

FUZZ_S = max(30.0, float(os.environ.get("OFFLOAD_FUZZ_SECONDS", "30")))
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 63, 64, 255, 256, 511, 512, 513, 1023, 1024,
               0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
               2**64 - 1]  # fmt: skip


def field_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type, dimension and offset field of a header."""
    out: list[tuple[int, int]] = [(8, 8), (16, 8), (4, 4)]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string() -> None:
        nonlocal pos
        out.append((pos, 8))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        string()
        out.append((pos, 4))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if vtype == T_STRING:
            string()
        elif vtype == T_ARRAY:
            etype, n = struct.unpack_from("<IQ", data, pos)
            out += [(pos, 4), (pos + 4, 8)]
            pos += 12
            for _ in range(n):
                if etype == T_STRING:
                    string()
                else:
                    out.append((pos, fixed[etype]))
                    pos += fixed[etype]
        else:
            out.append((pos, fixed[vtype]))
            pos += fixed[vtype]
    for _ in range(n_tensors):
        string()
        n_dims = struct.unpack_from("<I", data, pos)[0]
        out.append((pos, 4))
        pos += 4
        out += [(pos + 8 * i, 8) for i in range(n_dims)]
        pos += 8 * n_dims
        out += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return out


def mutate(rng: random.Random, data: bytes, fields: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
        op = rng.random()
        if op < 0.45 and fields:
            off, width = rng.choice(fields)
            value = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(width * 8)
            if off + width <= len(b):
                b[off : off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif op < 0.65 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.75 and b:
            i = rng.randrange(len(b))
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif op < 0.85 and len(b) > 2:
            i, j = sorted(rng.sample(range(len(b)), 2))
            del b[i : min(j, i + 64)]
        elif op < 0.95 and len(b) > 2:
            i, j = sorted(rng.sample(range(len(b)), 2))
            b[i:i] = b[i : min(j, i + 64)]
        else:
            del b[rng.randrange(len(b)) :]
    return bytes(b)


def check_one(path: Path) -> str:
    """Read a file every way the server does; 'ok', 'refused', or raise what escaped."""
    t0 = time.monotonic()
    try:
        h = read_header(path)
        anatomy.from_header(h)
        json.dumps(model_info(h), allow_nan=False)
        gguf_config(path, h)
        outcome = "ok"
    except GGUFError as e:
        assert "\n" not in str(e)
        outcome = "refused"
    assert time.monotonic() - t0 < 3, f"{path} took {time.monotonic() - t0:.1f}s"
    return outcome


def test_fuzz_the_header_reader_for_half_a_minute(gemma_path: Path, tmp_path: Path) -> None:
    base: GGUFLayout = trimmed(read_layout(gemma_path), 200)
    head = header_bytes(base)
    fields = field_offsets(head)
    total = len(head) + (-len(head) % 32) + base.data_bytes
    rng = random.Random(int(os.environ.get("OFFLOAD_FUZZ_SEED", "13")))
    path = tmp_path / "fuzz.gguf"
    counts = {"ok": 0, "refused": 0}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    deadline = time.monotonic() + FUZZ_S
    i = 0
    while time.monotonic() < deadline:
        data = mutate(rng, head, fields)
        with path.open("wb") as f:
            f.write(data)
            f.truncate(max(len(data), total + rng.choice([0, 0, 0, -1, -4096, 4096])))
        try:
            counts[check_one(path)] += 1
        except Exception as e:
            keep = tmp_path / f"crash-{i}.gguf"
            path.rename(keep)
            raise AssertionError(
                f"iteration {i}: {type(e).__name__}: {e} (input kept at {keep})"
            ) from e
        i += 1
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB"
    assert counts["refused"] > 100 and counts["ok"] > 10, counts
    print(f"fuzzed {i} headers in {FUZZ_S:.0f}s: {counts}")


@pytest.mark.parametrize("cut", [0, 3, 23, 24, 100, 5000])
def test_headers_cut_anywhere_are_refused(gemma_path: Path, tmp_path: Path, cut: int) -> None:
    data = gemma_path.read_bytes()[:6_600_000]
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) - cut] if cut else data[:cut])
    assert check_one(p) == "refused"
