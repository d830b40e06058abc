"""The runner's messages: one JSON object a line, whichever way a message was written."""

from __future__ import annotations

import json

from offload.runtime.runner.protocol import decode, encode


def test_piece_messages_are_written_as_the_json_encoder_writes_them() -> None:
    messages = [
        {"ev": "piece", "id": 7, "text": 'quote " backslash \\ newline \n tab \t nul \x00'},
        {"ev": "piece", "id": 8, "text": "é \u2028 \U0001f600"},
        {"ev": "piece", "id": 9, "text": "x", "logprobs": [{"token": "x", "logprob": -0.5}]},
        {"ev": "done", "id": 9, "stats": {"eval_count": 3}},
    ]
    want = b"".join(
        json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"
        for m in messages
    )
    assert encode(messages) == want
    assert [decode(line) for line in want.splitlines()] == messages
