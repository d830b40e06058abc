"""The ``offload`` command in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port


@pytest.fixture(scope="module")
def cli_env(offload_home: Path) -> Iterator[dict[str, str]]:
    """Environment for CLI runs: the session's store, a port of its own; the server is stopped after."""
    env = {**os.environ, "OFFLOAD_HOST": f"127.0.0.1:{free_port()}", "PYTHONUNBUFFERED": "1"}
    yield env
    try:
        pid_info = httpx.get(f"http://{env['OFFLOAD_HOST']}/", timeout=1)
    except httpx.HTTPError:
        return
    if pid_info.status_code == 200:
        # The background server started by `offload run`: find it by its port and stop it.
        out = subprocess.run(
            ["pgrep", "-f", "offload.runtime.cli serve"], capture_output=True, text=True
        )
        for pid in out.stdout.split():
            try:
                env_of = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if env["OFFLOAD_HOST"].encode() in env_of:
                os.kill(int(pid), signal.SIGTERM)


def offload(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offload.runtime.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_one_shot_starts_a_server_and_answers(
    cli_env: dict[str, str], offload_home: Path
) -> None:
    r = offload(cli_env, "run", "gemma3:270m", "Say hello.", "--verbose", stdin="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "no answer printed"
    for stat in (
        "total duration:",
        "load duration:",
        "prompt eval count:",
        "prompt eval rate:",
        "eval count:",
        "eval rate:",
    ):
        assert stat in r.stderr
    # The server it started keeps running, logging under the data dir.
    assert httpx.get(f"http://{cli_env['OFFLOAD_HOST']}/", timeout=5).status_code == 200
    assert (offload_home / "logs" / "server.log").is_file()


def test_run_reads_a_piped_prompt(cli_env: dict[str, str]) -> None:
    r = offload(cli_env, "run", "gemma3:270m", stdin="Paris is the capital of which country?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_run_unknown_model_says_how_to_get_it(cli_env: dict[str, str]) -> None:
    r = offload(cli_env, "run", "nosuchmodel", "hi", stdin="")
    assert r.returncode == 1
    assert (
        r.stderr.strip() == 'Error: model "nosuchmodel" not found, try "offload pull nosuchmodel"'
    )
    assert "Traceback" not in r.stderr


def test_list_shows_the_embedded_model(cli_env: dict[str, str]) -> None:
    r = offload(cli_env, "list")
    assert r.returncode == 0, r.stderr
    assert "gemma3:270m" in r.stdout and "NAME" in r.stdout


def test_interactive_session_sets_parameters_and_exits_on_bye(cli_env: dict[str, str]) -> None:
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a terminal
        os.execve(
            sys.executable,
            [sys.executable, "-m", "offload.runtime.cli", "run", "gemma3:270m"],
            cli_env,
        )
    out = b""

    def read_until(marker: bytes, timeout: float = 120) -> bytes:
        nonlocal out
        deadline = time.monotonic() + timeout
        while marker not in out:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} in {out[-500:]!r}")
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
        return out

    read_until(b">>> ")
    os.write(fd, b"/?\n")
    read_until(b"/bye")
    os.write(fd, b"/set parameter num_predict 3\n")
    # Wait for the prompt after the reply too: counting prompts below must start after it.
    read_until(b"Set parameter 'num_predict' to '3'\r\n>>> ")
    os.write(fd, b'"""Say\nhello"""\n')
    start = len(out)
    out_mark = out
    read_until(b">>> ", timeout=120)
    while out.count(b">>> ") < out_mark.count(b">>> ") + 1:
        out += os.read(fd, 4096)
    answer = out[start:].split(b">>> ")[0]
    assert answer.strip(), f"no answer to the multi-line prompt: {out[-800:]!r}"
    os.write(fd, b"/bye\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_ctrl_c_stops_the_answer_and_the_server_stays_healthy(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    # Greedy, with a long answer that only the length limit ends: the answer is still running
    # when Ctrl-C comes, whatever the sampler would have drawn.
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM gemma3:270m\nPARAMETER temperature 0\nPARAMETER num_predict 400\n")
    made = offload(cli_env, "create", "counter", "-f", str(modelfile))
    assert made.returncode == 0, made.stderr
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload.runtime.cli",
            "run",
            "counter",
            "Count from one to five hundred in words.",
        ],
        env=cli_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As from a terminal: a suite started in the background (`cmd &` in a script) inherits
        # SIGINT ignored, and Python then leaves it ignored in every child.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1), "no answer started"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (err, out[-300:], time.monotonic() - t0)
    assert time.monotonic() - t0 < 5
    assert b"Traceback" not in err
    # The server carries on and answers the next request.
    r = httpx.post(
        f"http://{cli_env['OFFLOAD_HOST']}/api/generate",
        timeout=60,
        json={
            "model": "gemma3:270m",
            "prompt": "Hi",
            "stream": False,
            "options": {"num_predict": 2},
        },
    )
    assert r.status_code == 200 and r.json()["done"] is True
    assert offload(cli_env, "rm", "counter").returncode == 0


@pytest.fixture()
def fresh_env(tmp_path: Path, offload_home: Path) -> Iterator[dict[str, str]]:
    """A CLI environment over a data dir of its own (nothing remembered yet), its server stopped after."""
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    if (offload_home / "hardware.json").exists():
        shutil.copy(offload_home / "hardware.json", home / "hardware.json")
    env = {
        **os.environ,
        "OFFLOAD_HOME": str(home),
        "OFFLOAD_HOST": f"127.0.0.1:{free_port()}",
        "PYTHONUNBUFFERED": "1",
    }
    yield env
    out = subprocess.run(
        ["pgrep", "-f", "offload.runtime.cli serve"], capture_output=True, text=True
    )
    for pid in out.stdout.split():
        try:
            if env["OFFLOAD_HOST"].encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(int(pid), signal.SIGTERM)
        except OSError:
            continue


def test_the_first_command_answers_on_a_cpu_whose_extra_kernels_crash(
    fresh_env: dict[str, str],
) -> None:
    # As on a VM whose CPU advertises AMX: llama.cpp's first evaluation faults with CPU extra
    # buffer types on. The runner dies, the load is retried with them off, and the answer comes.
    env = {**fresh_env, "OFFLOAD_TEST_RUNNER_FAULT": "crash-first-eval-with-extra-bufts"}
    r = offload(env, "run", "gemma3:270m", "Why is the sky blue?", stdin="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Traceback" not in r.stderr
    ps = offload(env, "ps")
    assert "CPU extra buffer types" in ps.stdout and "SIGSEGV" in ps.stdout


def test_a_runner_crash_mid_answer_is_one_line_and_exit_code_1(fresh_env: dict[str, str]) -> None:
    env = {**fresh_env, "OFFLOAD_TEST_RUNNER_FAULT": "crash-after-tokens=4"}
    r = offload(env, "run", "gemma3:270m", "Tell me a long story.", stdin="")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "Error: the runner for gemma3:270m stopped (SIGSEGV) while generating"
    )
    assert "Traceback" not in r.stderr


def test_serve_refuses_a_bad_parallel_setting_at_start(fresh_env: dict[str, str]) -> None:
    for bad in ("0", "-2", "1000", "many"):
        r = offload({**fresh_env, "OFFLOAD_NUM_PARALLEL": bad}, "serve", timeout=60)
        assert r.returncode == 1, (bad, r.stderr)
        assert (
            r.stderr.strip().startswith("Error: OFFLOAD_NUM_PARALLEL")
            and "Traceback" not in r.stderr
        )
