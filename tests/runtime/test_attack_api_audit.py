"""Hostile or sloppy clients against a real server: work nobody waits for stops, odd values in
fields the server keeps do not break later answers, and bad bodies get one-line errors."""

from __future__ import annotations

import gzip
import threading
import time

import httpx
import psutil
import pytest

from tests.runtime.conftest import MODEL, Running
from tests.runtime.steady import assert_one_line_error


@pytest.fixture(scope="module")
def http(server: Running) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _generate_once(url: str) -> float:
    """Seconds a one-token generation takes to answer (failing past 60 s)."""
    t0 = time.monotonic()
    r = httpx.post(
        f"{url}/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]
    return time.monotonic() - t0


@pytest.mark.parametrize("path", ["/api/embed", "/v1/embeddings"])
def test_an_embedding_whose_client_hangs_up_stops_and_frees_the_model(
    http: httpx.Client, path: str
) -> None:
    """The runner embedded a whole list in one go, whatever the client did: 2,048 long inputs
    held the model (and a CPU) for hours after the client had gone, and every generation on it
    waited for them."""
    assert http.post(path, json={"model": MODEL, "input": "warm up"}).status_code == 200
    inputs = ["hello world " * 200] * 2048
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{http.base_url}{path}", json={"model": MODEL, "input": inputs}, timeout=1.5)
    assert _generate_once(str(http.base_url)) < 20
    # A list the client waits for is still embedded whole.
    r = http.post(path, json={"model": MODEL, "input": ["one", "two", "three"]})
    assert r.status_code == 200
    body = r.json()
    assert len(body.get("embeddings") or body.get("data")) == 3


@pytest.mark.parametrize("keep_alive", [1e300, "99999999999999h", 10**20])
def test_a_keep_alive_too_long_for_a_date_is_forever_and_ps_still_answers(
    http: httpx.Client, keep_alive: object
) -> None:
    """/api/ps wrote the expiry as a date: a keep_alive of 1e300 seconds made every /api/ps a 500
    ("timestamp out of range") for as long as the model stayed loaded, which was forever."""
    body = {"model": MODEL, "prompt": "hi", "stream": False, "keep_alive": keep_alive}
    r = http.post("/api/generate", json={**body, "options": {"num_predict": 1}})
    assert r.status_code == 200, r.text[:300]
    r = http.get("/api/ps")
    assert r.status_code == 200, r.text[:300]
    (entry,) = [m for m in r.json()["models"] if m["name"] == MODEL]
    assert entry["expires_at"].startswith("2100-01-01")
    # Back to the default, so later tests see an ordinary expiry.
    r = http.post("/api/generate", json={"model": MODEL, "prompt": "", "keep_alive": "5m"})
    assert r.status_code == 200


def _runner_pid(server: Running) -> int:
    (runner,) = [r for r in server.scheduler.loaded() if r.name == MODEL]
    return int(runner.proc.pid)


class _PeakRSS:
    """The most resident memory a process reached while this watched it."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_prompt_far_longer_than_the_context_is_not_tokenized_whole(
    http: httpx.Client, server: Running
) -> None:
    """The runner tokenized the whole prompt before cutting it to the context: 100 MB of raw
    prompt (under the 256 MiB body cap) took its runner from 1 GB to 7 GB and held the model for
    a minute and a half, blocking every other request on it (60 MB: 4 GB)."""
    text = "hello world " * (60_000_000 // 12)
    options = {"num_predict": 1, "num_ctx": 512}  # a small context, for speed
    body = {"model": MODEL, "raw": True, "stream": False, "options": options}
    assert http.post("/api/generate", json={**body, "prompt": "hi"}).status_code == 200
    with _PeakRSS(_runner_pid(server)) as rss:
        t0 = time.monotonic()
        r = http.post("/api/generate", json={**body, "prompt": text}, timeout=120)
        took = time.monotonic() - t0
    assert r.status_code == 200, r.text[:300]
    assert rss.peak - rss.start < 1 << 30, f"the runner grew by {(rss.peak - rss.start) >> 20} MiB"
    assert took < 60
    assert r.json()["prompt_eval_count"] > 400  # the context filled with the end of it
    # Refused truncation is a 400 saying so, without tokenizing it all either.
    r = http.post("/api/generate", json={**body, "prompt": text, "truncate": False}, timeout=120)
    assert_one_line_error(r, 400, "the prompt is at least", "raise num_ctx or allow truncation")


def test_an_embedding_input_far_longer_than_the_context_is_cut_before_tokenizing(
    http: httpx.Client, server: Running
) -> None:
    text = "hello world " * (40_000_000 // 12)
    body = {"model": MODEL, "options": {"num_ctx": 512}}  # a small context, for speed
    # llama.cpp keeps the buffers its first long input takes.
    assert http.post("/api/embed", json={**body, "input": text[:8_000]}).status_code == 200
    with _PeakRSS(_runner_pid(server)) as rss:
        r = http.post("/api/embed", json={**body, "input": text}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert rss.peak - rss.start < 1 << 30, f"the runner grew by {(rss.peak - rss.start) >> 20} MiB"
    # The start of the input is kept, as before: the vector of a shorter start that is still
    # longer than the context.
    short = http.post("/api/embed", json={**body, "input": text[:8_000]}).json()
    assert r.json()["embeddings"] == short["embeddings"]
    r = http.post("/api/embed", json={**body, "input": text, "truncate": False})
    assert_one_line_error(r, 400, "the input is at least", "more than the context holds")


def test_a_long_embedding_input_leaves_the_runner_no_larger_than_a_prompt_would(
    http: httpx.Client, server: Running
) -> None:
    """Every token of an embedding chunk is an output, and llama.cpp keeps a vocabulary of logits
    for each: one 4,000-token input with num_batch 4096 grew the runner by 4.6 GB, for good."""
    options = {"num_batch": 4096, "num_ctx": 4096}
    r = http.post("/api/embed", json={"model": MODEL, "input": "hi", "options": options})
    assert r.status_code == 200, r.text[:300]
    with _PeakRSS(_runner_pid(server)) as rss:
        r = http.post(
            "/api/embed",
            json={"model": MODEL, "input": "hello world " * 2000, "options": options},
            timeout=300,
        )
    assert r.status_code == 200, r.text[:300]
    assert rss.peak - rss.start < 1 << 30, f"the runner grew by {(rss.peak - rss.start) >> 20} MiB"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "no-such-model"}, 404, ("not found",)),
        ({"model": "no-such-model", "prompt": ""}, 404, ("not found",)),
        ({"model": MODEL, "prompt": "", "options": {"num_ctx": 0}}, 400, ("options.num_ctx",)),
        ({"model": MODEL, "prompt": "", "keep_alive": "soon"}, 400, ("not a duration",)),
    ],
)
def test_legacy_embeddings_with_an_empty_prompt_still_check_the_request(
    http: httpx.Client, body: dict, status: int, words: tuple[str, ...]
) -> None:
    """An empty prompt answered {"embedding": []} with a 200 before anything was looked at,
    whatever the model, options or keep_alive."""
    assert_one_line_error(http.post("/api/embeddings", json=body), status, *words)


def test_legacy_embeddings_with_an_empty_prompt_load_the_model(http: httpx.Client) -> None:
    r = http.post("/api/embeddings", json={"model": MODEL, "prompt": ""})
    assert r.status_code == 200 and r.json() == {"embedding": []}
    r = http.post("/api/embeddings", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 200 and len(r.json()["embedding"]) > 100


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/generate", b'{"model":"m","prompt":"caf\xe9"}', ("not UTF-8", "0xe9 at offset 26")),
        ("/v1/chat/completions", b'{"model":"m","messages":"\xff"}', ("not UTF-8", "0xff")),
        ("/v1/messages", b'{"model": "m", \x80}', ("not UTF-8", "0x80")),
        ("/api/chat", b"[" * 100_000 + b"]" * 100_000, ("nested too deeply",)),
        ("/v1/responses", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, ("nested too deeply",)),
    ],
)
def test_a_body_that_cannot_be_parsed_says_why(
    http: httpx.Client, path: str, body: bytes, words: tuple[str, ...]
) -> None:
    """Bytes that are not UTF-8, and JSON nested past Python's recursion limit, were answered
    only "There was an error parsing the body"."""
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert message.startswith("invalid JSON: ") and "\n" not in message
    for word in words:
        assert word in message, (word, message)


_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"system": [{"type": "text", "text": 5}], "messages": _HI}, "system[0].text must be a string, got a number"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0].content[0].text must be a string, got null"),
        ({"messages": [*_HI, {"role": "assistant", "content": [{"type": "text", "text": ["x"]}]}]}, "messages[1].content[0].text must be a string, got an array"),
        ({"messages": [*_HI, {"role": "assistant", "content": [{"type": "thinking", "thinking": 1}]}]}, "messages[1].content[0].thinking must be a string"),
    ],
)  # fmt: skip
def test_a_text_block_whose_text_is_not_a_string_is_named_as_such(
    http: httpx.Client, body: dict, words: str
) -> None:
    """A text block with a number for its text was "unsupported block type 'text'; expected
    text" (or "unknown block type 'text'"), which contradicts itself."""
    r = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 1, **body})
    assert r.status_code == 400 and r.json()["type"] == "error", r.text[:300]
    message = r.json()["error"]["message"]
    assert words in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/messages", {"messages": _HI, "max_tokens": 2**40}, "max_tokens"),
        ("/v1/messages", {"messages": _HI, "max_tokens": 1, "top_k": 2**40}, "top_k"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 2**40}, "max_output_tokens"),
    ],
)
def test_a_token_count_past_what_llama_cpp_takes_names_the_field_sent(
    http: httpx.Client, path: str, body: dict, field: str
) -> None:
    """These passed the schema and failed as "options.num_predict must be ...": an option the
    client never sent."""
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    message = error["message"]
    assert message.startswith(f"{field}: ") and "2147483647" in message, message
    assert "options." not in message


@pytest.mark.parametrize(
    "content_type", ["text/html", "application/octet-stream", "multipart/form-data; boundary=x"]
)
def test_a_json_body_is_read_as_json_whatever_its_content_type(
    http: httpx.Client, content_type: str
) -> None:
    """Only a missing type, form-urlencoded and text/plain were read as JSON: other types reached
    the route unparsed, and a valid object was "Input should be a valid dictionary"."""
    body = (
        b'{"model": "gemma3:270m", "prompt": "hi", "stream": false, "options": {"num_predict": 1}}'
    )
    r = http.post("/api/generate", content=body, headers={"content-type": content_type})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["done"] is True


@pytest.mark.parametrize(
    ("path", "encoding"), [("/api/generate", "gzip"), ("/v1/chat/completions", "br")]
)
def test_a_compressed_body_is_a_415_that_says_so(
    http: httpx.Client, path: str, encoding: str
) -> None:
    """Compressed bytes reached the JSON parser as they were, and came back as text that is not
    UTF-8."""
    body = gzip.compress(b'{"model": "gemma3:270m", "prompt": "hi"}')
    r = http.post(path, content=body, headers={"content-encoding": encoding})
    assert_one_line_error(r, 415, f"Content-Encoding {encoding!r} is not supported", "uncompressed")
    # The connection and the server carry on.
    assert http.get("/api/version").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/generate", b"", "the request body is empty; send a JSON object"),
        ("/v1/messages", b"", "the request body is empty; send a JSON object"),
        ("/api/chat", b"null", "the request body must be a JSON object, got null"),
        ("/v1/chat/completions", b"[1, 2]", "the request body must be a JSON object, got an array"),
        ("/v1/responses", b'"hi"', "the request body must be a JSON object, got a string"),
    ],
)
def test_a_body_that_is_not_an_object_says_what_it_is(
    http: httpx.Client, path: str, body: bytes, words: str
) -> None:
    """An empty body was "Field required" (no field named), and a JSON array or null "Input
    should be a valid dictionary or object to extract fields from"."""
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert (error if isinstance(error, str) else error["message"]) == words
