"""The real embedded model with one thing changed: what llama.cpp dies on is refused from the header.

Mutated files keep the model's real header and leave its tensor data as a sparse hole (the reader
never looks at it), so each variant costs a header's worth of disk.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from offload.planner import GGUFError, anatomy
from offload.planner.gguf_header import MAX_STRING_BYTES, read_header
from offload.planner.gguf_limits import LLAMA_MAX_EXPERTS, LLAMA_MAX_LAYERS, ROPE_SCALING_TYPES
from tests.gguf_mutate import (
    T_ARRAY,
    T_F32,
    T_I32,
    T_STRING,
    T_U32,
    T_U64,
    GGUFLayout,
    Tensor,
    read_layout,
    write_layout,
)

A = "gemma3"
Mutation = Callable[[GGUFLayout], object]


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> GGUFLayout:
    return read_layout(gemma_path)


def trimmed(layout: GGUFLayout, n_tokens: int = 1000) -> GGUFLayout:
    """The model with its vocabulary cut to ``n_tokens``: the same header, fast to write and read."""
    out = layout.copy()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = out.kv[key]
        etype, _ = struct.unpack("<IQ", v.raw[:12])
        pos = 12
        for _ in range(n_tokens):
            if etype == T_STRING:
                pos += 8 + struct.unpack("<Q", v.raw[pos : pos + 8])[0]
            else:
                pos += 4
        out.set_raw(key, T_ARRAY, struct.pack("<IQ", etype, n_tokens) + v.raw[12:pos])
    return out


def tensor(layout: GGUFLayout, i: int, **changes: object) -> GGUFLayout:
    t = layout.tensors[i]
    layout.tensors[i] = Tensor(**{**t.__dict__, **changes})  # type: ignore[arg-type]
    return layout


# (what, mutation, words the error must contain)
FATAL: list[tuple[str, Mutation, str]] = [
    ("no layers", lambda m: m.set(f"{A}.block_count", T_U32, 0), "gemma3.block_count is 0"),
    ("513 layers", lambda m: m.set(f"{A}.block_count", T_U32, 513), "gemma3.block_count is 513"),
    (
        "2^32-1 layers",
        lambda m: m.set(f"{A}.block_count", T_U32, 2**32 - 1),
        "block_count is 4294967295",
    ),
    (
        "layers as text",
        lambda m: m.set(f"{A}.block_count", T_STRING, "18"),
        "block_count is '18', expected an integer",
    ),
    (
        "layers as float",
        lambda m: m.set(f"{A}.block_count", T_F32, 18.0),
        "block_count is 18, expected an integer",
    ),
    (
        "NaN epsilon",
        lambda m: m.set(f"{A}.attention.layer_norm_rms_epsilon", T_F32, math.nan),
        "layer_norm_rms_epsilon is nan",
    ),
    (
        "inf epsilon",
        lambda m: m.set(f"{A}.attention.layer_norm_rms_epsilon", T_F32, math.inf),
        "layer_norm_rms_epsilon is inf",
    ),
    (
        "negative epsilon",
        lambda m: m.set(f"{A}.attention.layer_norm_rms_epsilon", T_F32, -1e-6),
        "layer_norm_rms_epsilon is -1e-06",
    ),
    (
        "zero epsilon",
        lambda m: m.set(f"{A}.attention.layer_norm_rms_epsilon", T_F32, 0.0),
        "layer_norm_rms_epsilon is 0,",
    ),
    (
        "NaN layer-norm epsilon",
        lambda m: m.set(f"{A}.attention.layer_norm_epsilon", T_F32, math.nan),
        "layer_norm_epsilon is nan",
    ),
    (
        "no heads",
        lambda m: m.set(f"{A}.attention.head_count", T_U32, 0),
        "head_count is 0 in a model with attention",
    ),
    (
        "a million heads",
        lambda m: m.set(f"{A}.attention.head_count", T_U32, 1 << 20),
        "head_count is 1048576",
    ),
    (
        "short per-layer heads",
        lambda m: m.set(f"{A}.attention.head_count_kv", T_ARRAY, (T_U32, [1] * 5)),
        "has 5 entries for 18 layers",
    ),
    ("no embedding", lambda m: m.set(f"{A}.embedding_length", T_U32, 0), "embedding_length is 0"),
    ("no context", lambda m: m.set(f"{A}.context_length", T_U32, 0), "context_length is 0"),
    (
        "4G context",
        lambda m: m.set(f"{A}.context_length", T_U32, 2**32 - 1),
        "context_length is 4294967295",
    ),
    (
        "experts none used",
        lambda m: m.set(f"{A}.expert_count", T_U32, 8),
        "expert_used_count is 0 but the model has 8 experts",
    ),
    (
        "used but no experts",
        lambda m: m.set(f"{A}.expert_used_count", T_U32, 2),
        "more than the 0 experts",
    ),
    (
        "too many experts",
        lambda m: m.set(f"{A}.expert_count", T_U32, LLAMA_MAX_EXPERTS + 1).set(
            f"{A}.expert_used_count", T_U32, 2
        ),
        "expert_count is 1025",
    ),
    (
        "uneven expert groups",
        lambda m: (
            m.set(f"{A}.expert_count", T_U32, 8)
            .set(f"{A}.expert_used_count", T_U32, 2)
            .set(f"{A}.expert_group_count", T_U32, 3)
        ),
        "does not divide 8 experts",
    ),
    (
        "rope over no dims",
        lambda m: m.set(f"{A}.rope.dimension_count", T_U32, 0),
        "rope.dimension_count is 0",
    ),
    (
        "odd rope dims",
        lambda m: m.set(f"{A}.rope.dimension_count", T_U32, 255),
        "rope.dimension_count is 255, expected an even",
    ),
    (
        "rope wider than a head",
        lambda m: m.set(f"{A}.rope.dimension_count", T_U32, 512),
        "more than the head size 256",
    ),
    (
        "unknown rope scaling",
        lambda m: m.set(f"{A}.rope.scaling.type", T_STRING, "weird"),
        "rope.scaling.type is 'weird'",
    ),
    (
        "NaN rope base",
        lambda m: m.set(f"{A}.rope.freq_base", T_F32, math.nan),
        "rope.freq_base is nan",
    ),
    (
        "alignment as text",
        lambda m: m.set("general.alignment", T_STRING, "32"),
        "general.alignment is a string ('32')",
    ),
    (
        "alignment as u64",
        lambda m: m.set("general.alignment", T_U64, 32),
        "general.alignment is a uint64",
    ),
    ("alignment of 3", lambda m: m.set("general.alignment", T_U32, 3), "general.alignment is 3"),
    ("alignment of 0", lambda m: m.set("general.alignment", T_U32, 0), "general.alignment is 0"),
    (
        "long architecture",
        lambda m: m.set("general.architecture", T_STRING, "g" * 1000),
        "general.architecture is 'ggg",
    ),
    (
        "10 MB architecture",
        lambda m: m.set("general.architecture", T_STRING, "g" * 10_000_000),
        "claims 10000000 bytes, more than the 1048576 allowed",
    ),
    (
        "architecture as number",
        lambda m: m.set("general.architecture", T_U32, 7),
        "general.architecture is 7",
    ),
    (
        "chat template as number",
        lambda m: m.set("tokenizer.chat_template", T_I32, 5),
        "tokenizer.chat_template is 5",
    ),
    (
        "tensor of a layer beyond the count",
        lambda m: m.set(f"{A}.block_count", T_U32, 17),
        "belongs to layer 17 of a 17-layer model",
    ),
    ("long tensor name", lambda m: tensor(m, 3, name=b"t" * 64), "is longer than 63 bytes"),
    ("same tensor twice", lambda m: tensor(m, 3, name=m.tensors[2].name), "appears twice"),
    ("unknown tensor type", lambda m: tensor(m, 3, ggml_type=99), "unknown ggml type 99"),
    (
        "dims overflowing int64",
        lambda m: tensor(m, 3, dims=(1 << 32, 1 << 32)),
        "elements, more than llama.cpp can index",
    ),
    (
        "rows not whole blocks",
        lambda m: tensor(m, 0, ggml_type=12, dims=(641,)),
        "not whole blocks of 256",
    ),
    (
        "data out of order",
        lambda m: tensor(m, 5, offset=m.tensors[5].offset + 32),
        "has data offset",
    ),
    (
        "data past the end",
        lambda m: tensor(m, len(m.tensors) - 1, dims=(640, 1 << 30)),
        "past the end of the file",
    ),
    (
        "more keys than written",
        lambda m: setattr(m, "n_kv_override", len(m.kv) + 1),
        "not a usable GGUF file",
    ),
]


@pytest.mark.parametrize(("what", "mutate", "words"), FATAL, ids=[f[0] for f in FATAL])
def test_what_llama_cpp_dies_on_is_refused_naming_the_key(
    gemma: GGUFLayout, tmp_path: Path, what: str, mutate: Mutation, words: str
) -> None:
    m = trimmed(gemma)
    mutate(m)
    p = write_layout(m, tmp_path / "m.gguf")
    t0 = time.monotonic()
    with pytest.raises(GGUFError) as err:
        anatomy.read(p)
    assert time.monotonic() - t0 < 2
    assert words in str(err.value)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(p))


def test_the_untouched_model_is_accepted(gemma: GGUFLayout, tmp_path: Path) -> None:
    a = anatomy.read(write_layout(gemma.copy(), tmp_path / "same.gguf"))
    assert (a.arch, a.n_layers, a.n_vocab) == ("gemma3", 18, 262144)


@pytest.mark.parametrize(
    ("key", "vtype", "value"),
    [(f"{A}.block_count", T_U32, 0), (f"{A}.attention.layer_norm_rms_epsilon", T_F32, math.nan)],
    ids=["no layers", "NaN epsilon"],
)
def test_refused_values_really_kill_llama_cpp(
    gemma: GGUFLayout, tmp_path: Path, key: str, vtype: int, value: object
) -> None:
    """The reason for the checks: loading such a file aborts the whole process (GGML_ASSERT)."""
    p = write_layout(gemma.copy().set(key, vtype, value), tmp_path / "fatal.gguf", copy_data=True)
    code = (
        "import sys\nfrom llama_cpp import Llama\n"
        f"m = Llama({str(p)!r}, n_ctx=64, n_threads=1, verbose=False)\n"
        "m.eval(m.tokenize(b'hello'))\n"
    )
    # No gdb backtrace on abort: it can take minutes on a busy machine.
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300, env=env)
    assert r.returncode < 0, f"llama.cpp survived {key}={value}: exit {r.returncode}"
    with pytest.raises(GGUFError, match=key.replace(".", r"\.")):
        anatomy.read(p)


def test_strings_and_arrays_over_the_caps_are_refused_before_reading_them(
    gemma: GGUFLayout, tmp_path: Path
) -> None:
    cases = {
        "string": lambda m: m.set_raw(
            "general.name", T_STRING, struct.pack("<Q", MAX_STRING_BYTES + 1) + b"x" * 64
        ),
        "array": lambda m: m.set_raw(
            "general.tags", T_ARRAY, struct.pack("<IQ", T_U32, (1 << 24) + 1)
        ),
        "key": lambda m: m.kv.update({"k" * 2000: m.kv["general.name"]}),
    }
    for what, mutate in cases.items():
        m = trimmed(gemma)
        mutate(m)
        with pytest.raises(GGUFError, match="more than the .* allowed"):
            read_header(write_layout(m, tmp_path / f"{what}.gguf"))


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    done = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            anatomy.read(fifo)
        except GGUFError as e:
            errors.append(e)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading a FIFO blocked"
    assert "not a regular file" in str(errors[0])


# -- generated variants ---------------------------------------------------------------------------

KEYS = [f"{A}.{k}" for k in (
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.key_length",
    "attention.value_length", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon",
    "attention.sliding_window", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "expert_count", "expert_used_count", "expert_group_count",
    "expert_group_used_count", "ssm.state_size", "vocab_size",
)] + ["general.alignment", "general.architecture", "general.name", "tokenizer.chat_template",
      "tokenizer.ggml.bos_token_id", "some.unknown.key"]  # fmt: skip

INTS = st.one_of(
    st.sampled_from(
        [0, 1, 2, 3, 17, 18, 19, 255, 256, 511, 512, 513, 1024, 1025, 2**31 - 1, 2**31, 2**32 - 1]
    ),
    st.integers(0, 2**32 - 1),
)
FLOATS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1e-6, 1e-6, 1.0, 1e30]),
    st.floats(width=32),
)
VALUES = st.one_of(
    st.tuples(st.sampled_from([T_U32, T_I32, T_U64]), INTS),
    st.tuples(st.just(T_F32), FLOATS),
    st.tuples(
        st.just(T_STRING),
        st.one_of(st.text(max_size=80), st.sampled_from(["none", "yarn", "linear", "gemma3", ""])),
    ),
    st.tuples(
        st.just(T_ARRAY),
        st.tuples(st.just(T_U32), st.lists(INTS.map(lambda v: v % 2**32), max_size=40)),
    ),
    st.tuples(
        st.just(T_ARRAY), st.tuples(st.just(T_STRING), st.lists(st.text(max_size=8), max_size=20))
    ),
)


def _accepted_is_loadable(md: dict) -> None:
    """What llama.cpp asserts on must be absent from any header the reader accepts.

    llama.cpp reads hyperparameters under the architecture the header names, so a header whose
    architecture was changed is checked under the new name (keys left under the old one are inert).
    """
    arch = md.get("general.architecture")
    assert isinstance(arch, str)

    def get(k: str, default: object = None) -> object:
        return md.get(f"{arch}.{k}", default)

    n = get("block_count")
    assert n is None or (isinstance(n, int) and 1 <= n <= LLAMA_MAX_LAYERS)
    for k in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        if get(k) is not None:
            assert math.isfinite(get(k)) and get(k) > 0  # type: ignore[arg-type]
    n_exp, used = get("expert_count", 0), get("expert_used_count", 0)
    assert 0 <= used <= n_exp <= LLAMA_MAX_EXPERTS and (n_exp == 0) == (used == 0)  # type: ignore[operator]
    rot = get("rope.dimension_count")
    assert rot is None or (rot > 0 and rot % 2 == 0)  # type: ignore[operator]
    assert get("rope.scaling.type") in (None, *ROPE_SCALING_TYPES)
    align = md.get("general.alignment", 32)
    assert align > 0 and align & (align - 1) == 0


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(
    changes=[
        ("general.architecture", (T_STRING, "none")),
        (f"{A}.block_count", (T_ARRAY, (T_U32, []))),
    ]
)
@example(
    changes=[("general.architecture", (T_STRING, "llama")), (f"{A}.expert_count", (T_STRING, "8"))]
)
@example(changes=[(f"{A}.rope.scaling.type", (T_F32, math.nan))])
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_generated_metadata_mutations_are_refused_or_safe(
    gemma: GGUFLayout, tmp_path_factory: pytest.TempPathFactory, changes: list
) -> None:
    m = trimmed(gemma, 300)
    for key, (vtype, value) in changes:
        m.set(key, vtype, value)
    p = write_layout(m, tmp_path_factory.mktemp("gen") / "m.gguf")
    try:
        h = read_header(p)
        a = anatomy.from_header(h)
    except GGUFError as e:
        assert "\n" not in str(e)
        return
    _accepted_is_loadable(h.metadata)
    assert 1 <= a.n_layers <= LLAMA_MAX_LAYERS
    from offload.models.show import model_info

    json.dumps(model_info(h), allow_nan=False)
