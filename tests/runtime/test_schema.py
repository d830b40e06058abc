"""Schemathesis against the server's own OpenAPI schema: no 5xx, responses match the schema.

Generated requests name models that do not exist (so generation endpoints answer 400/404 fast)
and probe every field's type; the cheap GET endpoints run against the real store. max_examples
is small to keep the suite quick. (Run from plain Hypothesis: schemathesis's pytest plugin does
not load under this pytest.)
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from offload.models.store import Store
from offload.runtime.server.app import create_app
from tests.runtime.conftest import MODEL, THINK_MODEL, TOOLS_MODEL, Running


def test_api_answers_without_server_errors_and_matches_its_schema(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Schemathesis's in-process client names its host "testserver": let the app answer to it.
    monkeypatch.setenv("OFFLOAD_HOSTS", "testserver")
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(store))
    failures: dict[str, str] = {}
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/v1/chat/completions",
        "/api/ps",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
    } <= {op.path for op in operations}
    for op in operations:
        if op.path in ("/api/pull", "/api/push"):
            # They talk to a registry: with no network they answer 502 by design. tests/models
            # drives them against a real registry on 127.0.0.1.
            continue

        @given(case=op.as_strategy())
        @settings(
            max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

        try:
            check()
        except Exception as e:  # noqa: BLE001 - gather every operation's failure, then report
            failures[f"{op.method.upper()} {op.path}"] = str(e)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def _validator(spec: dict, name: str):  # noqa: ANN202 - jsonschema_rs has no public validator type
    import jsonschema_rs

    return jsonschema_rs.validator_for(
        {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    )


def test_real_answers_match_the_published_response_schemas(server: Running) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    opts = {"num_predict": 3, "temperature": 0}
    gen = _validator(spec, "GenerateResponse")
    with httpx.stream(
        "POST",
        f"{server.url}/api/generate",
        json={"model": MODEL, "prompt": "hi", "options": opts},
        timeout=60,
    ) as r:
        chunks = [json.loads(x) for x in r.iter_lines() if x]
    for c in chunks:
        gen.validate(c)
    chat = _validator(spec, "ChatResponse")
    chat.validate(
        httpx.post(
            f"{server.url}/api/chat",
            timeout=60,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
                "options": opts,
            },
        ).json()
    )
    _validator(spec, "EmbedResponse").validate(
        httpx.post(
            f"{server.url}/api/embed", json={"model": MODEL, "input": "hi"}, timeout=60
        ).json()
    )
    _validator(spec, "ProcessResponse").validate(httpx.get(f"{server.url}/api/ps").json())
    _validator(spec, "ListResponse").validate(httpx.get(f"{server.url}/api/tags").json())
    bad = {**chunks[-1], "done": "yes"}
    assert not gen.is_valid(bad)  # the schema has teeth


def test_agent_routes_fuzzed_against_real_models_never_fail_and_match_the_schema(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The generated bodies name real models (so translation, capability checks and generation
    # all run) with a token limit kept tiny so that each case stays fast.
    monkeypatch.setenv("OFFLOAD_HOSTS", "testserver")  # the in-process client's host name
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(store))
    models = [MODEL, TOOLS_MODEL, THINK_MODEL]
    failures: dict[str, str] = {}
    for path in ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens"):
        op = schema[path]["POST"]

        @given(case=op.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],  # a failure is reported as found, unshrunk
        )
        def check(case: schemathesis.Case) -> None:
            if isinstance(case.body, dict):
                case.body["model"] = models[len(json.dumps(case.body)) % len(models)]
                key = "max_output_tokens" if case.path == "/v1/responses" else "max_tokens"
                if not isinstance(case.body.get(key), int) or case.body[key] > 2:
                    case.body[key] = 2
            case.call_and_validate(
                checks=[not_a_server_error, response_schema_conformance], timeout=120
            )

        try:
            check()
        except Exception as e:  # noqa: BLE001 - gather every route's failure, then report
            failures[path] = str(e)[:3000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_agent_answers_and_errors_match_the_published_schemas(server: Running) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    hi = [{"role": "user", "content": "hi"}]
    _validator(spec, "ResponseObject").validate(
        httpx.post(f"{server.url}/v1/responses", timeout=60,
                   json={"model": MODEL, "input": "hi", "max_output_tokens": 3}).json()
    )  # fmt: skip
    _validator(spec, "MessageObject").validate(
        httpx.post(f"{server.url}/v1/messages", timeout=60,
                   json={"model": MODEL, "max_tokens": 3, "messages": hi}).json()
    )  # fmt: skip
    _validator(spec, "TokenCount").validate(
        httpx.post(f"{server.url}/v1/messages/count_tokens", timeout=60,
                   json={"model": MODEL, "messages": hi}).json()
    )  # fmt: skip
    anthropic_error = _validator(spec, "AnthropicError")
    for body in (
        {"model": MODEL, "max_tokens": 0, "messages": hi},
        {"model": "nope:1", "max_tokens": 1, "messages": hi},
    ):
        anthropic_error.validate(
            httpx.post(f"{server.url}/v1/messages", json=body, timeout=60).json()
        )
    _validator(spec, "OpenAIError").validate(
        httpx.post(
            f"{server.url}/v1/responses",
            json={"model": MODEL, "input": [{"type": "x"}]},
            timeout=60,
        ).json()
    )
    assert not anthropic_error.is_valid({"error": "flat"})  # the schema has teeth
