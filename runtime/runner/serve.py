"""The runner process: load one model, then serve the server's requests until told to stop.

``python -m offload.runtime.runner --fd N`` speaks ``protocol`` over the inherited socket N. The
main thread runs the batch loop (it owns llama.cpp's context); a reader thread parses the
server's messages, answers tokenization itself and hands everything else to the loop. The runner
exits when the server asks, when the socket closes, or when its parent dies.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

__all__ = ["main"]

log = logging.getLogger("offload.runner")


class Channel:
    """Both directions of the socket: lines in, batches of messages out (one write each)."""

    def __init__(self, sock: socket.socket) -> None:
        from offload.runtime.runner import protocol

        self.sock = sock
        self.reader = sock.makefile("rb", buffering=1 << 16)
        self.lock = threading.Lock()
        self._encode, self._decode = protocol.encode, protocol.decode

    def send(self, messages: list[dict[str, Any]]) -> None:
        data = self._encode(messages)
        try:
            with self.lock:
                self.sock.sendall(data)
        except OSError:
            os._exit(0)  # the server is gone: nothing to serve

    def read(self) -> dict[str, Any] | None:
        line = self.reader.readline()
        if not line:
            return None
        return self._decode(line)


def _load(channel: Channel, msg: dict[str, Any], t_start: float) -> Any:
    from offload.planner.errors import OffloadError
    from offload.planner.types import Plan
    from offload.runtime.runner import buffers
    from offload.runtime.runner.loader import load_healing

    last = [0.0]

    def progress(fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or fraction >= 1.0:
            last[0] = now
            channel.send([{"ev": "progress", "fraction": round(fraction, 3)}])

    plan = Plan.from_dict(msg["plan"])
    extra_bufts = bool(msg.get("extra_bufts", True))
    try:
        engine, plan, gave_up = load_healing(
            _Model(msg["model"], msg.get("adapters") or []),
            plan,
            verify_decode=bool(msg.get("verify", True)),
            extra_bufts=extra_bufts,
            progress=progress,
        )
    except OffloadError as e:
        channel.send([{"ev": "load_failed", "kind": type(e).__name__, "message": str(e)}])
        return None
    engine.gave_up = list(gave_up)
    phases = {"other_s": time.monotonic() - t_start - sum(engine.phases.values())}
    channel.send(
        [
            {
                "ev": "loaded",
                "pid": os.getpid(),
                "plan": plan.to_dict(),
                "load_s": engine.load_s,
                "phases": {**engine.phases, **phases},
                "n_ctx": engine.n_ctx,
                "n_parallel": engine.n_slots,
                "n_vocab": engine.n_vocab,
                "measured_bytes": engine.measured_bytes,
                "memory": engine.memory_report(),
                "gave_up": list(gave_up),
                "extra_bufts": extra_bufts,
                "buffers": buffers.buffer_names(engine.load_log),
            }
        ]
    )
    return engine


class _Model:
    """The model path and adapters in the shape ``load_healing`` reads from a ``ModelInfo``."""

    def __init__(self, model_path: str, adapters: list[str]) -> None:
        self.model_path = model_path
        self.adapters = adapters


def _reader(channel: Channel, loop: Any, engine: Any) -> None:
    """Parse the server's messages; tokenization is answered here, the rest goes to the loop."""
    from offload.planner.errors import OffloadError
    from offload.runtime.errors import ContextTooLong
    from offload.runtime.runner.batch import Job
    from offload.runtime.runner.protocol import sampling_from_json

    while True:
        try:
            msg = channel.read()
        except ValueError as e:
            log.error("unreadable message from the server: %s", e)
            continue
        if msg is None:
            # The server is gone (its end of the socket closed): nobody is left to answer.
            os._exit(0)
        if msg.get("op") == "shutdown":
            loop.post("stop", None)
            return
        op, rid = msg.get("op"), msg.get("id")
        try:
            if op == "generate":
                tokens = list(msg.get("tokens") or [])
                truncate = bool(msg.get("truncate", True))
                if msg.get("text") is not None or not tokens:
                    # Only the end of a prompt longer than the context is kept: only that much
                    # of it is tokenized.
                    text, at_least = engine.clip_text(
                        str(msg.get("text") or ""), engine.n_ctx, True
                    )
                    if at_least and not truncate:
                        raise ContextTooLong(
                            f"the prompt is at least {at_least} tokens but the context holds "
                            f"{engine.n_ctx}; raise num_ctx or allow truncation"
                        )
                    tokens += engine.tokenize(text, add_bos=bool(msg.get("add_bos", True)))
                job = Job(
                    id=_request_id(rid),
                    prompt=[int(t) for t in tokens],
                    sampling=sampling_from_json(msg.get("sampling") or {}),
                    truncate=truncate,
                    want_tokens=bool(msg.get("want_tokens")),
                    ignore_eos=bool(msg.get("ignore_eos")),
                )
                loop.post("generate", job)
            elif op == "cancel":
                loop.post("cancel", _request_id(rid))
            elif op == "tokenize":
                value = engine.tokenize(
                    msg.get("text") or "", add_bos=bool(msg.get("add_bos", True))
                )
                channel.send([{"ev": "result", "id": rid, "value": value}])
            elif op == "detokenize":
                channel.send(
                    [
                        {
                            "ev": "result",
                            "id": rid,
                            "value": engine.detokenize(msg.get("tokens") or []),
                        }
                    ]
                )
            elif op in ("embed", "bench", "stats"):
                loop.post("call", _on_loop(channel, loop, engine, msg))
            else:
                channel.send(
                    [
                        {
                            "ev": "error",
                            "id": rid,
                            "kind": "BadRequest",
                            "message": f"unknown op {op!r}",
                        }
                    ]
                )
        except OffloadError as e:
            channel.send([{"ev": "error", "id": rid, "kind": type(e).__name__, "message": str(e)}])
        except (TypeError, ValueError, KeyError) as e:
            channel.send(
                [
                    {
                        "ev": "error",
                        "id": rid,
                        "kind": "BadRequest",
                        "message": f"bad {op} request: {e}",
                    }
                ]
            )


def _request_id(rid: object) -> int:
    """A request's id as the protocol has it: an integer."""
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise TypeError(f"request id {rid!r} is not an integer")
    return rid


def _on_loop(channel: Channel, loop: Any, engine: Any, msg: dict[str, Any]) -> Any:
    """Work that needs the context, run on the loop's thread between steps."""
    from offload.planner.errors import OffloadError
    from offload.runtime.errors import ContextTooLong

    def run() -> None:
        rid, op = msg.get("id"), msg["op"]
        try:
            if op == "embed":
                vectors, count = [], 0
                for item in msg.get("inputs") or []:
                    if isinstance(item, list):
                        tokens = item
                    else:
                        # An input is cut to the context from its end: only its start is tokenized.
                        text, at_least = engine.clip_text(str(item), engine.n_ctx + 1, False)
                        if at_least and not msg.get("truncate", True):
                            raise ContextTooLong(
                                f"the input is at least {at_least} tokens, more than the context holds "
                                f"({engine.n_ctx})"
                            )
                        tokens = engine.tokenize(text, add_bos=True)
                    vec, used = engine.embed(
                        [int(t) for t in tokens], truncate=bool(msg.get("truncate", True))
                    )
                    vectors.append(vec)
                    count += used
                value: Any = {"embeddings": vectors, "tokens": count}
            elif op == "bench":
                if loop.active or loop.waiting:
                    raise ValueError("the runner is busy")
                t = engine.run_batch(
                    int(msg["n_seq"]), [int(x) for x in msg["tokens"]], int(msg["gen_tokens"])
                )
                for slot in loop.slots:
                    slot.cached = []
                value = {
                    "n_seq": t.n_seq,
                    "prompt_tokens": t.prompt_tokens,
                    "prompt_s": t.prompt_s,
                    "ttft_s": t.ttft_s,
                    "tokens": t.tokens,
                    "decode_s": t.decode_s,
                    "step_s": list(t.step_s),
                }
            else:
                value = {"steps": [list(s) for s in loop.steps], "compactions": loop.compactions}
                loop.steps.clear()
            loop.out.append({"ev": "result", "id": rid, "value": value})
        except OffloadError as e:
            loop.out.append({"ev": "error", "id": rid, "kind": type(e).__name__, "message": str(e)})
        except (TypeError, ValueError, KeyError) as e:
            loop.out.append(
                {
                    "ev": "error",
                    "id": rid,
                    "kind": "BadRequest",
                    "message": f"bad {op} request: {e}",
                }
            )

    return run


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m offload.runtime.runner``."""
    parser = argparse.ArgumentParser(prog="offload-runner")
    parser.add_argument(
        "--fd", type=int, required=True, help="the inherited socket's file descriptor"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s runner[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    faulthandler.enable(sys.stderr)  # a crash leaves a Python traceback in the log
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    # llama.cpp's libraries before numpy's (the protocol imports the planner): see native.
    from offload.runtime.runner import native  # noqa: F401

    sock = socket.socket(fileno=args.fd)
    channel = Channel(sock)
    first = channel.read()
    if first is None:
        sys.exit(0)  # a spare the server no longer needs (or the server is gone)
    if first.get("op") != "load":
        log.error("expected a load message first, got %r", first)
        sys.exit(2)
    channel.send([{"ev": "started", "pid": os.getpid()}])

    engine = _load(channel, first, time.monotonic())
    if engine is None:
        sys.exit(0)
    from offload.runtime.runner.batch import BatchLoop

    loop = BatchLoop(engine, channel.send)
    threading.Thread(
        target=_reader, args=(channel, loop, engine), name="runner-reader", daemon=True
    ).start()
    try:
        loop.run()
    finally:
        engine.close()
    log.info("stopped")
