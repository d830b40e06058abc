"""Runner processes die for real (signals, a forced crash, a hang) and the server carries on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from offload.runtime.runner import FAULT_ENV
from tests.runtime.conftest import MODEL, OTHER, Running, make_store, start_server

LONG = {"num_predict": 400, "temperature": 0}


def _pid(server: Running, name: str = MODEL) -> int:
    models = httpx.get(f"{server.url}/api/ps", timeout=30).json()["models"]
    return next(m["pid"] for m in models if m["name"] == name)


def _load(server: Running, name: str = MODEL) -> int:
    r = httpx.post(
        f"{server.url}/api/generate",
        json={"model": name, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return _pid(server, name)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=["SIGKILL", "SIGSEGV"])
def test_a_runner_killed_mid_stream_ends_the_stream_with_an_error_and_the_model_reloads(
    server: Running, sig: signal.Signals
) -> None:
    pid = _load(server)
    lines = []
    with httpx.stream(
        "POST",
        f"{server.url}/api/generate",
        timeout=120,
        json={"model": MODEL, "prompt": "Tell me a very long story", "options": LONG},
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == 3:
                os.kill(pid, sig)
    assert "error" in lines[-1], lines[-1]
    message = lines[-1]["error"]
    assert message.startswith(f"the runner for {MODEL} stopped ({sig.name}) while generating")
    assert "\n" not in message and "Traceback" not in message.split("last log lines")[0]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # The server answers, and the next request for the model starts a new runner.
    assert httpx.get(f"{server.url}/api/version", timeout=10).status_code == 200
    new_pid = _load(server)
    assert new_pid != pid


def test_a_non_streamed_request_whose_runner_dies_gets_a_500_with_the_reason(
    server: Running,
) -> None:
    pid = _load(server)
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    r = httpx.post(
        f"{server.url}/api/generate",
        timeout=120,
        json={
            "model": MODEL,
            "prompt": "Tell me a very long story",
            "stream": False,
            "options": LONG,
        },
    )
    assert r.status_code == 500
    assert r.json()["error"].startswith(
        f"the runner for {MODEL} stopped (SIGKILL) while generating"
    )
    assert _load(server) != pid


def test_other_models_keep_serving_while_one_runner_dies(server: Running) -> None:
    other_pid = _load(server, OTHER)
    pid = _load(server)
    os.kill(pid, signal.SIGKILL)
    r = httpx.post(
        f"{server.url}/api/generate",
        timeout=120,
        json={"model": OTHER, "prompt": "Hello", "stream": False, "options": {"num_predict": 3}},
    )
    assert r.status_code == 200 and r.json()["eval_count"] == 3
    assert _pid(server, OTHER) == other_pid


def test_twenty_clients_over_two_models_while_a_runner_is_killed_all_end(server: Running) -> None:
    _load(server)
    _load(server, OTHER)

    def one(i: int) -> str:
        model = MODEL if i % 2 else OTHER
        try:
            # A queued request gets its headers at once and its first bytes when its turn comes.
            with httpx.stream(
                "POST",
                f"{server.url}/api/chat",
                timeout=httpx.Timeout(300, connect=10),
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": f"Story {i}"}],
                    "options": {"num_predict": 24, "temperature": 0},
                },
            ) as r:
                if r.status_code != 200:
                    r.read()
                    return f"status {r.status_code}: {r.json()['error']}"
                last = {}
                for line in r.iter_lines():
                    last = json.loads(line)
                return "error" if "error" in last else ("ok" if last.get("done") else "cut")
        except httpx.TimeoutException:
            return "hung"

    killer = threading.Timer(2.0, lambda: os.kill(_pid(server), signal.SIGKILL))
    killer.start()
    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(one, range(20)))
    killer.join()
    assert "hung" not in outcomes and "cut" not in outcomes, outcomes
    assert outcomes.count("ok") >= 10, outcomes  # the other model's ten at least
    assert all(o in ("ok", "error") or o.startswith("status 5") for o in outcomes), outcomes
    assert httpx.get(f"{server.url}/api/version", timeout=10).status_code == 200


@pytest.fixture()
def isolated(
    tmp_path: Path, offload_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Running]:
    """A server over its own data dir: what it remembers about this machine starts empty."""
    home = tmp_path / "home"
    home.mkdir()
    if (offload_home / "hardware.json").exists():
        shutil.copy(offload_home / "hardware.json", home / "hardware.json")
    monkeypatch.setenv("OFFLOAD_HOME", str(home))
    store = make_store(home)
    running, srv, thread = start_server(store)
    yield running
    srv.should_exit = True
    thread.join(timeout=10)
    running.scheduler.close()


def test_a_load_that_crashes_in_its_first_evaluation_heals_with_extra_buffer_types_off(
    isolated: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runner crashes (SIGSEGV) in its first evaluation while CPU extra buffer types are on,
    # as llama.cpp's AMX kernels do on some VMs.
    monkeypatch.setenv(FAULT_ENV, "crash-first-eval-with-extra-bufts")
    r = httpx.post(
        f"{isolated.url}/api/generate",
        timeout=120,
        json={
            "model": MODEL,
            "prompt": "Paris is the capital of",
            "stream": False,
            "options": {"num_predict": 4, "temperature": 0},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["response"]
    ps = httpx.get(f"{isolated.url}/api/ps", timeout=10).json()["models"][0]
    assert any("CPU extra buffer types" in s and "SIGSEGV" in s for s in ps["safety"]), ps["safety"]
    # The setting reached llama.cpp: this load made no repacked CPU buffer (a normal one does).
    runner = isolated.scheduler.loaded()[0]
    assert runner.proc.extra_bufts is False
    assert "CPU_REPACK" not in runner.proc.buffers and runner.proc.buffers
    log_text = runner.proc.log.path.read_text()
    remembered = json.loads((Path(os.environ["OFFLOAD_HOME"]) / "runner-safety.json").read_text())
    assert any("extra_bufts" in m for m in remembered.values())
    # `offload plan` says so too.
    from click.testing import CliRunner

    from offload.runtime.cli import cli

    out = CliRunner().invoke(cli, ["plan", MODEL, "--json"])
    assert out.exit_code == 0, out.output
    assert any("CPU extra buffer types" in r for r in json.loads(out.output)["reasons"])
    # The next load starts safe: no crash this time.
    isolated.scheduler.unload(MODEL)
    crashes_before = log_text.count("Segmentation fault")
    r = httpx.post(
        f"{isolated.url}/api/generate",
        timeout=120,
        json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
    )
    assert r.status_code == 200
    assert runner.proc.log.path.read_text().count("Segmentation fault") == crashes_before


def test_without_the_fault_this_cpu_uses_extra_buffer_types(isolated: Running) -> None:
    r = httpx.post(
        f"{isolated.url}/api/generate",
        timeout=120,
        json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
    )
    assert r.status_code == 200
    assert isolated.scheduler.loaded()[0].proc.extra_bufts is True
    assert "CPU_REPACK" in isolated.scheduler.loaded()[0].proc.buffers
    assert httpx.get(f"{isolated.url}/api/ps", timeout=10).json()["models"][0]["safety"] == []


def test_a_load_that_always_crashes_is_a_clear_error_after_the_safer_settings(
    isolated: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "crash-first-eval")
    r = httpx.post(
        f"{isolated.url}/api/generate",
        timeout=300,
        json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
    )
    assert r.status_code == 500
    err = r.json()["error"]
    assert (
        err.startswith(f"the runner for {MODEL} stopped (SIGSEGV) while loading")
        and "after turning off" in err
    )
    assert httpx.get(f"{isolated.url}/api/version", timeout=10).status_code == 200


def test_a_hung_runner_is_stopped_after_the_timeout(
    isolated: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang-after-tokens=3")
    _load(isolated)  # the runner hangs at its third token from now on
    monkeypatch.setenv("OFFLOAD_LOAD_TIMEOUT", "3s")
    t0 = time.monotonic()
    r = httpx.post(
        f"{isolated.url}/api/generate",
        timeout=120,
        json={"model": MODEL, "prompt": "Tell me a story", "stream": False, "options": LONG},
    )
    assert r.status_code == 500
    assert "stopped answering for 3 s and was stopped while generating" in r.json()["error"]
    assert time.monotonic() - t0 < 60
    assert httpx.get(f"{isolated.url}/api/version", timeout=10).status_code == 200


def test_a_runner_that_cannot_start_names_its_log(
    isolated: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    (broken / "llama_cpp").mkdir(parents=True)
    (broken / "llama_cpp" / "__init__.py").write_text(
        "raise ImportError('libllama.so: cannot open shared object file: No such file or directory')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(broken))
    r = httpx.post(
        f"{isolated.url}/api/generate",
        timeout=120,
        json={"model": MODEL, "prompt": "Hi", "stream": False},
    )
    assert r.status_code == 500
    err = r.json()["error"]
    assert err.startswith(f"the runner for {MODEL} could not start (exit code 1)")
    assert "libllama.so" in err and "runner-gemma3-270m.log" in err


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/PID/maps")
def test_a_real_server_process_never_maps_llama_cpp_but_its_runner_does(offload_home: Path) -> None:
    from tests.serve_process import ServeProcess

    server = ServeProcess(offload_home)
    with server:
        assert server.proc is not None
        url = server.url
        r = httpx.post(
            f"{url}/api/generate",
            json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        runner_pid = httpx.get(f"{url}/api/ps", timeout=10).json()["models"][0]["pid"]
        server_maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        runner_maps = Path(f"/proc/{runner_pid}/maps").read_text()
        assert "libllama" in runner_maps and "libggml" in runner_maps
        assert "libllama" not in server_maps and "libggml" not in server_maps
        assert psutil.Process(runner_pid).ppid() == server.proc.pid
    # Stopping the server stops its runners.
    deadline = time.monotonic() + 15
    while (
        psutil.pid_exists(runner_pid)
        and psutil.Process(runner_pid).status() != psutil.STATUS_ZOMBIE
    ):
        assert time.monotonic() < deadline, "the runner outlived its server"
        time.sleep(0.1)


def test_unload_ends_the_runner_process(server: Running) -> None:
    pid = _load(server)
    r = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=30)
    assert r.json()["done_reason"] == "unload"
    deadline = time.monotonic() + 15
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_runner_log_is_capped_and_rotated_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.runtime.serving import process

    monkeypatch.setattr(process, "LOG_CAP_BYTES", 4096)
    log = process._Log(tmp_path / "runner-x.log")
    for i in range(400):
        log.write(f"line {i} {'x' * 40}\n".encode())
    log.close()
    assert (tmp_path / "runner-x.log").stat().st_size <= 4096 + 64
    assert (tmp_path / "runner-x.log.1").stat().st_size <= 4096 + 64
    assert not (tmp_path / "runner-x.log.2").exists()
    assert "line 399" in log.last(1)
