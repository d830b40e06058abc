"""The spare runner: a runner process started ahead of the next load, as the server keeps one. A
load takes it (skipping Python's and llama.cpp's start), a new one is started behind it, and none
outlives the server or serves a load started under other settings."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from offload.planner import anatomy, hardware, plan
from offload.planner.types import Plan, PlanRequest
from offload.runtime.runner.generation import Piece, Sampling
from offload.runtime.serving import process
from offload.runtime.serving.process import RunnerProcess


@pytest.fixture(scope="module")
def gemma_plan(gemma_gguf: Path) -> Plan:
    return plan(anatomy.read(gemma_gguf), hardware.probe(measure=False), PlanRequest(n_ctx=512))


@pytest.fixture
def spares(offload_home: Path) -> Iterator[process._Spares]:
    process.keep_spare_runner()
    yield process._spares
    process.close_spare_runner()


def _ready(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until the spare has loaded its libraries and sits waiting for its load message."""
    deadline = time.monotonic() + timeout_s
    proc = psutil.Process(pid)
    while time.monotonic() < deadline:
        libs = {os.path.basename(m.path) for m in proc.memory_maps()}
        if any(name.startswith("libllama") for name in libs) and proc.status() in (
            psutil.STATUS_SLEEPING,
            psutil.STATUS_IDLE,
        ):
            return
        time.sleep(0.05)
    raise AssertionError("the spare runner did not get ready")


def test_a_load_takes_the_spare_and_a_new_one_is_started_behind_it(
    spares: process._Spares, gemma_gguf: Path, gemma_plan: Plan
) -> None:
    first = spares.pid()
    assert first is not None
    _ready(first)
    runner = RunnerProcess.start("spare-test", gemma_gguf, gemma_plan)
    try:
        assert runner.pid == first
        # Its libraries were loaded before the load was asked for: the wait for its first answer
        # is a message's round trip (a cold start loads Python and llama.cpp first).
        assert runner.phases["process_s"] < 0.5, runner.phases
        text = "".join(
            ev.text
            for ev in runner.generate(Sampling(temperature=0, num_predict=8), text="The sky is")
            if isinstance(ev, Piece)
        )
        assert text.strip()
        second = spares.pid()
        assert second is not None and second != first and psutil.pid_exists(second)
    finally:
        runner.close()


def test_a_spare_started_under_other_settings_is_not_used(
    spares: process._Spares,
    gemma_gguf: Path,
    gemma_plan: Plan,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stale = spares.pid()
    assert stale is not None
    monkeypatch.setenv("GGML_SCHED_MAX_COPIES", "1")  # set after the spare started
    runner = RunnerProcess.start("spare-test", gemma_gguf, gemma_plan)
    try:
        assert runner.pid != stale
        assert not psutil.pid_exists(stale) or psutil.Process(stale).status() == "zombie"
        env = psutil.Process(runner.pid).environ()
        assert env.get("GGML_SCHED_MAX_COPIES") == "1"
    finally:
        runner.close()


def test_the_spare_ends_with_the_server(spares: process._Spares) -> None:
    pid = spares.pid()
    assert pid is not None
    process.close_spare_runner()
    assert spares.pid() is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    # And no new one is started behind a load once it is closed.
    spares.refill()
    assert spares.pid() is None
