"""Bad option values and token ids are refused at the edge with a one-line 400; none reaches llama.cpp.

Before, ``num_thread: 100000`` aborted the process, ``num_batch: -1000`` crashed it, token ids
past the vocabulary aborted it, and NaN or mistyped values either answered 500 or went through.
Each test attacks the real server and then checks that it still answers and gave back its
threads and memory.
"""

from __future__ import annotations

import json
import math
import os

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.models.parameters import InvalidParameter
from offload.planner import anatomy
from offload.runtime.serving.options import merge_options
from tests.option_spec import PLAN_KEYS, SPEC, converted, is_valid
from tests.runtime.conftest import MODEL, Running
from tests.runtime.steady import assert_one_line_error, stays_steady

_SLOW = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def warm(server: Running) -> None:
    """The model loaded for generation and for embeddings, so that the memory measured around an
    attack is the server's steady state, not a first load."""
    r = httpx.post(
        f"{server.url}/api/generate",
        timeout=180,
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
    )
    assert r.status_code == 200, r.text
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "hi"}, timeout=180)
    assert r.status_code == 200, r.text


def _generate(server: Running, content: str) -> httpx.Response:
    # Raw JSON text, so that NaN and Infinity reach the server as clients send them.
    return httpx.post(
        f"{server.url}/api/generate",
        content=content,
        timeout=120,
        headers={"Content-Type": "application/json"},
    )


def _body(options: str, extra: str = "") -> str:
    return f'{{"model": "{MODEL}", "prompt": "hi", "stream": false{extra}, "options": {options}}}'


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ('{"num_thread": 100000}', "options.num_thread"),  # aborted the process (bad_alloc)
        ('{"num_batch": -1000}', "options.num_batch"),  # segfaulted it
        ('{"repeat_last_n": 1e9}', "options.repeat_last_n"),  # 3.9 GB that stayed after unload
        ('{"stop": 5}', "options.stop"),  # 500
        ('{"num_ctx": -5}', "options.num_ctx"),  # 500
        ('{"temperature": NaN}', "options.temperature"),  # accepted
        ('{"top_p": Infinity}', "options.top_p"),
        ('{"mirostat": 7}', "options.mirostat"),
        ('{"seed": 1e300}', "options.seed"),
        ('{"num_predict": -3}', "options.num_predict"),
        ('{"top_k": {"nested": [1, 2]}}', "options.top_k"),
        ('{"use_mmap": "sometimes"}', "options.use_mmap"),
        (
            '{"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}',
            "options.stop",
        ),
    ],
)
def test_option_values_that_broke_the_server_are_refused_naming_the_option(
    server: Running, options: str, field: str
) -> None:
    with stays_steady(server.url):
        r = _generate(server, _body(options))
        assert_one_line_error(r, 400, field)


def test_token_ids_outside_the_vocabulary_are_refused_on_generate_and_embeddings(
    server: Running,
) -> None:
    n_vocab = anatomy.read(server.store.resolve(MODEL).model_path).n_vocab
    with stays_steady(server.url):
        r = _generate(
            server,
            f'{{"model": "{MODEL}", "prompt": "hi", "stream": false, "context": [99999999]}}',
        )
        assert_one_line_error(r, 400, "context", str(n_vocab - 1))
        for ids in ([99999999], [5, -1], [n_vocab], [[1, 2], [3, n_vocab + 7]]):
            r = httpx.post(
                f"{server.url}/v1/embeddings", json={"model": MODEL, "input": ids}, timeout=120
            )
            assert_one_line_error(r, 400, "input", str(n_vocab - 1))
        r = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": MODEL, "input": [1000, 2000]}, timeout=120
        )
        assert r.status_code == 200 and len(r.json()["data"]) == 1
        too_long = "[" + ",".join(["1"] * ((1 << 20) + 1)) + "]"
        r = _generate(
            server,
            f'{{"model": "{MODEL}", "prompt": "hi", "stream": false, "context": {too_long}}}',
        )
        assert_one_line_error(r, 413, "context")


def test_openai_fields_outside_their_documented_ranges_are_400s(server: Running) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad = [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -4}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"frequency_penalty": 9}, "frequency_penalty"),
        ({"presence_penalty": -9}, "presence_penalty"),
        ({"seed": 2**70}, "seed"),
        ({"top_logprobs": 99, "logprobs": True}, "top_logprobs"),
        ({"stop": [str(i) for i in range(40)]}, "stop"),
    ]
    with stays_steady(server.url):
        for fields, name in bad:
            r = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, **fields}, timeout=60)
            assert_one_line_error(r, 400, name)
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=60,
            headers={"Content-Type": "application/json"},
            content=f'{{"model": "{MODEL}", "messages": [], "temperature": NaN}}',
        )
        assert_one_line_error(r, 400, "temperature")
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": "a", "logprobs": 50},
            timeout=60,
        )
        assert_one_line_error(r, 400, "logprobs")
        r = httpx.post(
            f"{server.url}/v1/embeddings",
            json={"model": MODEL, "input": "a", "dimensions": 0},
            timeout=60,
        )
        assert_one_line_error(r, 400, "dimensions")
        # Through the official client too: its error is a BadRequestError, not a dropped connection.
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model=MODEL, messages=chat["messages"], temperature=7)


def test_num_thread_is_bounded_by_this_machines_cpus(server: Running) -> None:
    most = 4 * (os.cpu_count() or 1)
    with stays_steady(server.url):
        r = _generate(server, _body(f'{{"num_thread": {most + 1}}}'))
        assert_one_line_error(r, 400, "options.num_thread", f"0 to {most}")


def test_num_ctx_above_the_training_context_is_lowered_to_it_as_ollama_does(
    server: Running,
) -> None:
    n_ctx_train = anatomy.read(server.store.resolve(MODEL).model_path).n_ctx_train
    r = httpx.post(
        f"{server.url}/api/generate",
        timeout=180,
        json={
            "model": MODEL,
            "prompt": "hi",
            "stream": False,
            "keep_alive": "30s",
            "options": {"num_ctx": n_ctx_train * 64, "num_predict": 1},
        },
    )
    assert r.status_code == 200, r.text
    ps = httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"]
    assert any(m["name"] == MODEL and m["context_length"] == n_ctx_train for m in ps)
    r = httpx.post(
        f"{server.url}/api/generate",
        timeout=180,
        json={
            "model": MODEL,
            "prompt": "hi",
            "stream": False,
            "keep_alive": 0,
            "options": {"num_ctx": n_ctx_train * 64, "repeat_last_n": n_ctx_train + 1},
        },
    )
    assert_one_line_error(r, 400, "options.repeat_last_n", str(n_ctx_train))
    server.scheduler.unload(MODEL)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0},
        {"temperature": 3.4e38, "top_k": 2**31 - 1, "top_p": 0, "min_p": 1, "typical_p": 0},
        {"temperature": 1e-45, "repeat_penalty": 0, "repeat_last_n": -1},
        {"repeat_penalty": 3.4e38, "presence_penalty": -3.4e38, "frequency_penalty": 3.4e38},
        {"mirostat": 1, "mirostat_tau": 0, "mirostat_eta": 0},
        {"mirostat": 2, "mirostat_tau": 3.4e38, "mirostat_eta": 3.4e38},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"stop": ["x" * 256] * 16},
    ],
)
def test_extreme_values_that_are_accepted_generate_without_harm(
    server: Running, options: dict
) -> None:
    with stays_steady(server.url):
        r = httpx.post(
            f"{server.url}/api/generate",
            timeout=180,
            json={
                "model": MODEL,
                "prompt": "the the the the",
                "stream": False,
                "options": {**options, "num_predict": 6},
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["done"] is True and r.json()["eval_count"] <= 6


# -- properties ----------------------------------------------------------------------------


@st.composite
def _options(draw: st.DrawFn, keys: list[str]) -> tuple[dict, set[str]]:
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True))
    out, bad = {}, set()
    for k in chosen:
        out[k], ok = is_valid(draw, k)
        if not ok:
            bad.add(k)
    return out, bad


@settings(max_examples=600, deadline=None, derandomize=True)
@given(_options(sorted(SPEC)))
def test_every_option_value_is_converted_when_in_range_and_refused_naming_it_when_not(
    case: tuple[dict, set[str]],
) -> None:
    options, bad = case
    try:
        merged = merge_options({}, options)
    except InvalidParameter as e:
        assert bad, f"refused valid options {options}: {e}"
        assert any(str(e).startswith(f"options.{k} ") for k in bad), str(e)
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    assert not bad, f"accepted {bad} of {options}"
    for k, v in options.items():
        if k in merged:
            got, want = merged[k], converted(k, v)
            assert got == want or (isinstance(got, float) and math.isclose(got, float(want))), (
                k,
                v,
                got,
            )
            assert not isinstance(got, float) or math.isfinite(got)


_SAMPLING_OVER_HTTP = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "seed",
    "stop",
]


@st.composite
def _http_options(draw: st.DrawFn) -> tuple[dict, set[str]]:
    options, bad = draw(_options(_SAMPLING_OVER_HTTP))
    # Options that reload the model or lengthen the answer are sent only with values that must be
    # refused: the property is about what the edge lets through, not about reloading.
    for k in draw(st.lists(st.sampled_from(sorted(PLAN_KEYS | {"num_predict"})), max_size=1)):
        options[k] = draw(SPEC[k][1])
        bad.add(k)
    if draw(st.booleans()):
        options["repeat_last_n"] = draw(
            st.integers(-1, 4096) | st.integers(min_value=(1 << 24) + 1)
        )
        if options["repeat_last_n"] > 4096:
            bad.add("repeat_last_n")
    options.setdefault("num_predict", 1)
    return options, bad


@_SLOW
@given(case=_http_options())
def test_the_server_answers_every_option_mix_with_200_or_a_400_naming_a_bad_option(
    server: Running, case: tuple[dict, set[str]]
) -> None:
    options, bad = case
    with stays_steady(server.url):
        # json.dumps writes NaN and Infinity, as some clients do; httpx's json= refuses them.
        body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False, "options": options})
        r = httpx.post(
            f"{server.url}/api/generate",
            timeout=180,
            content=body,
            headers={"Content-Type": "application/json"},
        )
        if bad:
            msg = assert_one_line_error(r, 400)
            assert any(msg.startswith(f"options.{k} ") for k in bad), (msg, bad)
        else:
            assert r.status_code == 200, (options, r.text)
            assert r.json()["done"] is True


@_SLOW
@given(ids=st.lists(st.integers(-(2**40), 2**40) | st.integers(0, 262143), min_size=1, max_size=6))
def test_embedding_token_ids_are_embedded_exactly_when_all_are_in_the_vocabulary(
    server: Running, ids: list[int]
) -> None:
    n_vocab = anatomy.read(server.store.resolve(MODEL).model_path).n_vocab
    with stays_steady(server.url):
        r = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": MODEL, "input": ids}, timeout=120
        )
        if all(0 <= t < n_vocab for t in ids):
            # Ids of special tokens alone read back as no text at all: that is the only refusal.
            if r.status_code != 200:
                assert_one_line_error(r, 400, "input must not be empty")
            else:
                assert len(r.json()["data"][0]["embedding"]) > 0
        else:
            assert_one_line_error(r, 400, "input")
