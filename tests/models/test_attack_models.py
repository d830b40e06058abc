"""Hostile model files, paths and full disks against a real ``offload serve`` and the real CLI.

The store holds the embedded gemma3:270m; ``allowed/`` is the server's OFFLOAD_ALLOWED_PATHS.
Mutated models keep the real header and leave their data as a sparse hole.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.models import embedded
from offload.models.layout import MEDIA_MODEL
from offload.models.names import parse_name
from offload.models.store import Store
from tests.gguf_mutate import T_F32, T_STRING, T_U32, read_layout, write_layout
from tests.planner.test_hostile_gguf import trimmed
from tests.serve_process import ServeProcess

A = "gemma3"
BAD = {
    "no layers": ((f"{A}.block_count", T_U32, 0), "gemma3.block_count is 0"),
    "NaN epsilon": (
        (f"{A}.attention.layer_norm_rms_epsilon", T_F32, math.nan),
        "layer_norm_rms_epsilon is nan",
    ),
    "unknown rope scaling": (
        (f"{A}.rope.scaling.type", T_STRING, "weird"),
        "rope.scaling.type is 'weird'",
    ),
    "alignment as text": (("general.alignment", T_STRING, "32"), "general.alignment is a string"),
    "10 MB architecture": (
        ("general.architecture", T_STRING, "g" * 10_000_000),
        "more than the 1048576 allowed",
    ),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, gemma_gguf: Path) -> Path:
    home = tmp_path_factory.mktemp("attack-home")
    store = Store(home / "models")
    embedded.import_default(store)
    allowed = home / "allowed"
    allowed.mkdir()
    os.link(store.find_blob(store.resolve("gemma3:270m").model_digest), allowed / "gemma.gguf")
    base = trimmed(read_layout(gemma_gguf), 300)
    for what, ((key, vtype, value), _) in BAD.items():
        write_layout(base.copy().set(key, vtype, value), allowed / f"{what}.gguf")
    os.mkfifo(allowed / "pipe.gguf")
    return home


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[ServeProcess]:
    with ServeProcess(home, {"OFFLOAD_ALLOWED_PATHS": str(home / "allowed")}) as s:
        httpx.post(f"{s.url}/api/show", json={"model": "gemma3:270m"}, timeout=60)  # warm-up
        httpx.post(f"{s.url}/api/create", json={"model": "w", "from": "/nope"}, timeout=60)
        yield s


def blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "models" / "blobs").iterdir()}


def one_line(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    return body["error"]


def offload_cli(home: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OFFLOAD_HOME": str(home), "OLLAMA_MODELS": str(home / "no-ollama")}
    env.pop("OFFLOAD_MODELS", None)
    return subprocess.run(
        [sys.executable, "-m", "offload.runtime.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )  # type: ignore[call-overload]


def cli_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and len([x for x in lines if x.startswith("Error")]) == 1
    return lines[-1]


# -- class 2: model files that would kill the process ------------------------------------------------


@pytest.mark.parametrize("what", list(BAD))
def test_create_over_http_refuses_what_llama_cpp_dies_on_and_writes_nothing(
    server: ServeProcess, home: Path, what: str
) -> None:
    before = blobs(home)
    with server.unharmed():
        for stream in (False, True):
            r = httpx.post(
                f"{server.url}/api/create",
                timeout=60,
                json={
                    "model": "bad",
                    "from": str(home / "allowed" / f"{what}.gguf"),
                    "stream": stream,
                },
            )
            assert r.status_code == 400
            assert BAD[what][1] in one_line(r)
    assert blobs(home) == before, "a refused create left a blob"
    assert not Store(home / "models").exists("bad")


def test_a_planted_bad_model_is_refused_everywhere_and_hides_no_other(
    server: ServeProcess, home: Path, gemma_gguf: Path, tmp_path: Path
) -> None:
    store = Store(home / "models")
    nan = trimmed(read_layout(gemma_gguf), 300).set(
        f"{A}.attention.layer_norm_rms_epsilon", T_F32, math.nan
    )
    nan.tensors, nan.data_bytes = [], 0  # the header alone: all a check reads
    bad = write_layout(nan, tmp_path / "nan.gguf")
    layer = {
        "mediaType": MEDIA_MODEL,
        "digest": store.add_blob_file(bad),
        "size": bad.stat().st_size,
    }
    store.write_manifest(
        parse_name("planted"), store.new_manifest([layer], {"model_family": "x" * 300})
    )
    # A manifest written by something else, declaring a 10 MB config: unusable, so not listed.
    huge_cfg = store.manifest_path(parse_name("hugecfg"))
    huge_cfg.parent.mkdir(parents=True, exist_ok=True)
    raw = json.loads(store.manifest_path(parse_name("planted")).read_bytes())
    raw["config"]["size"] = 10_000_000
    huge_cfg.write_text(json.dumps(raw))
    gen = {"model": "gemma3:270m", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    assert httpx.post(f"{server.url}/api/generate", json=gen, timeout=120).status_code == 200
    with server.unharmed():
        r = httpx.get(f"{server.url}/api/tags", timeout=10)
        names = [m["name"] for m in r.json()["models"]]
        assert r.status_code == 200 and len(r.content) < 20_000
        assert (
            "gemma3:270m" in names and "planted:latest" in names and "hugecfg:latest" not in names
        )
        for route, body in (
            ("show", {"model": "planted"}),
            ("generate", {"model": "planted", "prompt": "hi", "stream": False}),
        ):
            r = httpx.post(f"{server.url}/api/{route}", json=body, timeout=60)
            assert r.status_code == 400 and "layer_norm_rms_epsilon is nan" in one_line(r), route
        r = httpx.post(f"{server.url}/api/show", json={"model": "hugecfg"}, timeout=60)
        assert r.status_code >= 400 and "hugecfg" in one_line(r)
        # The other models carry on.
        r = httpx.post(f"{server.url}/api/generate", json=gen, timeout=120)
        assert r.status_code == 200 and r.json()["done"]
    httpx.post(
        f"{server.url}/api/generate", json={"model": "gemma3:270m", "keep_alive": 0}, timeout=60
    )
    for args in (("show", "planted"), ("plan", "planted"), ("plan", str(bad))):
        assert "layer_norm_rms_epsilon is nan" in cli_error(offload_cli(home, *args))
    listed = offload_cli(home, "list")
    assert listed.returncode == 0 and "gemma3:270m" in listed.stdout and "planted" in listed.stdout
    store.delete("planted")
    huge_cfg.unlink()


# -- class 5: a file-existence oracle ------------------------------------------------------------


def outside_paths(home: Path, gemma_gguf: Path) -> list[str]:
    allowed = home / "allowed"
    fifo = home / "outside-pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    for name, target in (("to-passwd", "/etc/passwd"), ("to-gemma", str(gemma_gguf))):
        if not (allowed / name).is_symlink():
            (allowed / name).symlink_to(target)
    return ["/etc/passwd", "/etc/shadow", "/etc/no-such-file", "/etc", "/dev/zero", str(fifo),
            str(gemma_gguf), str(allowed / ".." / "models" / "manifests"), str(allowed / "to-passwd"),
            str(allowed / "to-gemma"), "~/.bashrc", "~nosuchuser/x", "./README.md", "./nope.gguf",
            "../../../../etc/hostname", "/proc/self/environ", "x.gguf"]  # fmt: skip


def answers(server: ServeProcess, path: str) -> tuple[tuple[int, str], ...]:
    """The answer to each way a request can name a file, with the path itself blanked out."""
    out = []
    for body in (
        {"from": path},
        {"modelfile": f"FROM {path}"},
        {"modelfile": f"FROM gemma3:270m\nADAPTER {path}"},
    ):
        r = httpx.post(
            f"{server.url}/api/create", json={"model": "probe", "stream": False, **body}, timeout=30
        )
        out.append((r.status_code, one_line(r).replace(f" {path}: ", " <path>: ", 1)))
    return tuple(out)


def test_every_path_outside_the_allowed_folders_gets_the_same_answer(
    server: ServeProcess, home: Path, gemma_gguf: Path
) -> None:
    with server.unharmed():
        seen = {p: answers(server, p) for p in outside_paths(home, gemma_gguf)}
    assert len(set(seen.values())) == 1, seen
    for status, message in seen["/etc/passwd"]:
        assert status == 400 and "not a model name, nor a file this server may read" in message
    # Inside the allowed folder, answers may tell the files apart: the user chose to share them.
    r = httpx.post(
        f"{server.url}/api/create", json={"model": "p", "from": str(home / "allowed" / "nope.gguf")}
    )
    assert r.status_code == 400 and "no such file" in one_line(r)


def test_bare_words_are_model_names_whatever_files_exist(server: ServeProcess) -> None:
    def answer(word: str) -> tuple[int, str]:
        r = httpx.post(
            f"{server.url}/api/create", json={"model": "p", "from": word, "stream": False}
        )
        return r.status_code, one_line(r).replace(word, "<w>").replace(word.lower(), "<w>")

    assert Path("pyproject.toml").exists()  # the server runs in this folder
    assert answer("pyproject.toml") == answer("pyproject.tomx")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.tuples(
        st.sampled_from(["/", "/etc/", "/tmp/", "/usr/lib/", "~/", "../", "./", "/proc/self/"]),
        st.lists(
            st.sampled_from(
                ["..", ".", "passwd", "etc", "x.gguf", "bin", "null", "root", "*", "é"]
            ),
            min_size=0,
            max_size=4,
        ),
    ).map(lambda t: t[0] + "/".join(t[1]))
)
def test_generated_outside_paths_get_the_same_answer(
    server: ServeProcess, home: Path, path: str
) -> None:
    real = Path(os.path.realpath(Path(path).expanduser()))
    if real.is_relative_to(home / "allowed") or real.is_relative_to(home / "models" / "blobs"):
        return
    assert answers(server, path) == answers(server, "/etc/passwd")


def test_allowed_files_can_be_created_from_over_http(server: ServeProcess, home: Path) -> None:
    r = httpx.post(
        f"{server.url}/api/create",
        timeout=120,
        json={"model": "shared", "from": str(home / "allowed" / "gemma.gguf"), "stream": False},
    )
    assert r.status_code == 200, r.text
    assert (
        httpx.post(f"{server.url}/api/show", json={"model": "shared"}, timeout=30).status_code
        == 200
    )
    httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "shared"}, timeout=30)


def test_the_cli_still_creates_from_the_users_own_files(
    home: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    (tmp_path / "Modelfile").write_text(f"FROM {tiny_gguf}\nPARAMETER temperature 0.1\n")
    r = offload_cli(home, "create", "mine", "-f", str(tmp_path / "Modelfile"))
    assert r.returncode == 0, r.stderr
    assert "mine:latest" in offload_cli(home, "list").stdout
    offload_cli(home, "rm", "mine")


# -- class 9: pipes, full disks, killed writers ---------------------------------------------------


def test_from_a_fifo_is_refused_at_once_not_waited_on(
    server: ServeProcess, home: Path, tmp_path: Path
) -> None:
    fifo = home / "allowed" / "pipe.gguf"
    with server.unharmed():
        t0 = time.monotonic()
        r = httpx.post(
            f"{server.url}/api/create", json={"model": "p", "from": str(fifo)}, timeout=30
        )
        assert r.status_code == 400 and "is not a regular file" in one_line(r)
        assert time.monotonic() - t0 < 5
    (tmp_path / "Modelfile").write_text(f"FROM {fifo}\n")
    t0 = time.monotonic()
    assert "is not a regular file" in cli_error(
        offload_cli(home, "create", "p", "-f", str(tmp_path / "Modelfile"))
    )
    assert time.monotonic() - t0 < 30


def _limit_files(limit: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_is_a_one_line_507_over_http_and_in_the_cli(
    home: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())  # 1.9 MB, over the 1 MB limit
    data = os.urandom(3_000_000)
    digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()
    before = blobs(home)
    with ServeProcess(
        home, {"OFFLOAD_ALLOWED_PATHS": str(allowed)}, limit_file_bytes=1_000_000
    ) as server:

        def attack() -> None:
            r = httpx.post(f"{server.url}/api/blobs/{digest}", content=data, timeout=60)
            assert r.status_code == 507 and "disk full while writing" in one_line(r)
            for stream in (False, True):
                r = httpx.post(
                    f"{server.url}/api/create",
                    timeout=60,
                    json={"model": "full", "from": str(allowed / "tiny.gguf"), "stream": stream},
                )
                if stream:
                    assert "disk full while writing" in json.loads(r.text.splitlines()[-1])["error"]
                else:
                    assert r.status_code == 507 and "disk full while writing" in one_line(r)

        attack()  # the first time warms up the paths it takes; the second must cost nothing
        with server.unharmed():
            attack()
    assert blobs(home) == before, "a full disk left files in the store"
    (tmp_path / "Modelfile").write_text(f"FROM {allowed / 'tiny.gguf'}\n")
    r = offload_cli(
        home,
        "create",
        "full",
        "-f",
        str(tmp_path / "Modelfile"),
        preexec_fn=lambda: _limit_files(1_000_000),
    )
    assert "disk full while writing" in cli_error(r)
    assert blobs(home) == before


def test_a_killed_create_leaves_nothing_once_the_server_starts(
    gemma_gguf: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    big = write_layout(read_layout(gemma_gguf), tmp_path / "big.gguf")
    with big.open("r+b") as f:
        f.truncate(1 << 30)  # 1 GB: hashing and copying it takes a while
    (tmp_path / "Modelfile").write_text(f"FROM {big}\n")
    env = {**os.environ, "OFFLOAD_HOME": str(home), "OLLAMA_MODELS": str(home / "no-ollama")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload.runtime.cli",
            "create",
            "big",
            "-f",
            str(tmp_path / "Modelfile"),
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    blobs_dir = home / "models" / "blobs"
    deadline = time.monotonic() + 120
    while not [p for p in blobs_dir.glob(".tmp-*") if p.stat().st_size > 1 << 20]:
        assert time.monotonic() < deadline and proc.poll() is None, "create never started copying"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    (left,) = blobs_dir.glob(".tmp-*")
    long_ago = time.time() - 600  # the writer is gone, and the file has not changed for minutes
    os.utime(left, (long_ago, long_ago))
    with ServeProcess(home) as server:
        assert server.answers()
        assert not left.exists(), "the server start left a dead writer's file"
