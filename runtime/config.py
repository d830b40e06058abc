"""Configuration: every ``OFFLOAD_*`` variable and the data directory, read at call time.

The names mirror Ollama's (``OLLAMA_HOST`` -> ``OFFLOAD_HOST`` ...), so what users know carries
over. Nothing here is read at import, so tests and embedders can change the environment freely.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from offload.planner.errors import OffloadError

__all__ = [
    "ConfigError",
    "Host",
    "data_dir",
    "models_dir",
    "ollama_models_dir",
    "host",
    "keep_alive_s",
    "gpu_memory_bytes",
    "gpu_memory_budgets",
    "kv_cache_type",
    "num_parallel",
    "hardware_file",
    "check",
    "KV_CACHE_TYPES",
    "MAX_NUM_PARALLEL",
    "parse_bytes",
    "parse_duration_s",
    "max_loaded_models",
    "max_queue",
    "origins",
    "hosts",
    "log_dir",
    "load_timeout_s",
    "allowed_paths",
    "max_uploads",
    "upload_timeout_s",
    "max_upload_bytes",
    "header_timeout_s",
    "body_timeout_s",
    "write_timeout_s",
    "max_connections",
]

DEFAULT_PORT = 11435


class ConfigError(OffloadError):
    """An ``OFFLOAD_*`` variable or option has a value we cannot use."""

    http_status = 400


@dataclass(frozen=True)
class Host:
    """Where the server listens and clients connect."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL for clients (an all-interfaces bind is reached on loopback)."""
        h = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in h and not h.startswith("["):
            h = f"[{h}]"
        return f"{self.scheme}://{h}:{self.port}"


def data_dir() -> Path:
    """``OFFLOAD_HOME`` or the platform's user data dir; created on demand."""
    d = Path(
        os.environ.get("OFFLOAD_HOME") or platformdirs.user_data_dir("offload", appauthor=False)
    )
    _make_dir(d, "OFFLOAD_HOME")
    return d


def _make_dir(d: Path, setting: str) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is a file" if isinstance(e, FileExistsError) else e.strerror or str(e)
        raise ConfigError(
            f"cannot use {d} as the data directory ({why}); set {setting} to a folder you can write"
        ) from None


def models_dir() -> Path:
    """Where our model store lives: ``OFFLOAD_MODELS`` or ``<data dir>/models``."""
    env = os.environ.get("OFFLOAD_MODELS")
    return Path(env).expanduser() if env else data_dir() / "models"


def ollama_models_dir() -> Path | None:
    """An existing Ollama store to read from (``OLLAMA_MODELS`` or ``~/.ollama/models``), if any."""
    env = os.environ.get("OLLAMA_MODELS")
    p = Path(env).expanduser() if env else Path.home() / ".ollama" / "models"
    return p if (p / "manifests").is_dir() else None


def log_dir() -> Path:
    """``<data dir>/logs``."""
    d = data_dir() / "logs"
    _make_dir(d, "OFFLOAD_HOME")
    return d


# [v6 address] or a name/IPv4 address without URL syntax in it, then an optional :port (ASCII
# digits only: int() would take "٣"). A path, user part, query or space is not an address.
_HOST_RE = re.compile(
    r"(?:\[(?P<v6>[0-9A-Za-z:.%_-]*)\]|(?P<name>[^\s\x00-\x1f\x7f:/\\\[\]@?#%]*))"
    r"(?::(?P<port>[0-9]*))?"
)


def host() -> Host:
    """``OFFLOAD_HOST``: ``[http[s]://]host[:port]``, default ``127.0.0.1:11435``."""
    text = os.environ.get("OFFLOAD_HOST", "").strip()
    if not text:
        return Host("http", "127.0.0.1", DEFAULT_PORT)
    scheme, raw = "http", text
    if "://" in raw:
        scheme, raw = raw.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ConfigError(
                f"OFFLOAD_HOST={text!r}: the scheme must be http:// or https://, not {scheme}://"
            )
    m = _HOST_RE.fullmatch(raw.rstrip("/"))
    if m is None:
        raise ConfigError(
            f"OFFLOAD_HOST={text!r} is not host[:port]; write e.g. 127.0.0.1:{DEFAULT_PORT}, "
            f"0.0.0.0:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}"
        )
    h = m.group("v6") if m.group("v6") is not None else m.group("name")
    port = int(m.group("port") or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(f"OFFLOAD_HOST port {port} is out of range (1 to 65535)")
    return Host(scheme, h or "127.0.0.1", port)


# As Ollama reads sizes: a unit letter alone is binary (8G = 8 GiB), "B" after it makes it
# decimal (8GB = 8 * 10**9), "iB" binary again.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_bytes(text: str) -> int:
    """Bytes from ``8GiB``, ``8G`` (also GiB), ``7.5GB`` (10**9 bytes), ``512MiB`` or a plain count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{text!r} is not a size (try 8GiB, 8G, 7.5GB or 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_duration_s(value: str | int | float | None, default_s: float) -> float:
    """Ollama's keep_alive: ``5m``, ``1h30m``, ``300`` (seconds), ``0``, negative = forever (inf)."""
    if value is None or value == "":
        return default_s
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # An int past float's range (10**400) is forever too, not an OverflowError.
        v = float(value) if isinstance(value, float) or abs(value) < 10**300 else float("inf")
    else:
        try:
            v = float(str(value).strip())
        except ValueError:
            v = None
    if v is not None:
        if v != v:  # NaN: neither a duration nor forever
            raise ConfigError(f"{value!r} is not a duration (try 5m, 30s, 1h or -1 for forever)")
        return float("inf") if v < 0 else v
    s = str(value).strip()
    if s.startswith("-"):
        return float("inf")
    parts = re.findall(r"([0-9]*\.?[0-9]+)(ms|s|m|h)", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise ConfigError(f"{value!r} is not a duration (try 5m, 30s, 1h or -1 for forever)")
    mult = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(a) * mult[b] for a, b in parts)


def keep_alive_s() -> float:
    """``OFFLOAD_KEEP_ALIVE`` (default 5 minutes)."""
    try:
        return parse_duration_s(os.environ.get("OFFLOAD_KEEP_ALIVE"), 300.0)
    except ConfigError as e:
        raise ConfigError(f"OFFLOAD_KEEP_ALIVE: {e}") from None


def gpu_memory_budgets(value: str | None = None) -> tuple[int, ...]:
    """``OFFLOAD_GPU_MEMORY`` (or ``value``): one budget for every GPU (``8GiB``) or one per GPU
    (``8GiB,6GiB``), as nvidia-smi counts them; () when unset."""
    raw = os.environ.get("OFFLOAD_GPU_MEMORY", "") if value is None else value
    parts = [x for x in raw.split(",") if x.strip()]
    return tuple(parse_bytes(x) for x in parts)


def gpu_memory_bytes() -> int | None:
    """``OFFLOAD_GPU_MEMORY`` as one per-GPU budget (the smallest, when one per GPU is given)."""
    budgets = gpu_memory_budgets()
    return min(budgets) if budgets else None


KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")


def kv_cache_type() -> str | None:
    """``OFFLOAD_KV_CACHE_TYPE`` (Ollama's): f16, q8_0 or q4_0; None when unset (the planner keeps
    f16 unless the context does not fit)."""
    v = os.environ.get("OFFLOAD_KV_CACHE_TYPE", "").strip().lower()
    if not v:
        return None
    if v not in KV_CACHE_TYPES:
        raise ConfigError(
            f"OFFLOAD_KV_CACHE_TYPE={v!r} is not a KV cache type; use one of {', '.join(KV_CACHE_TYPES)}"
        )
    return v


MAX_NUM_PARALLEL = 64


def num_parallel() -> int | None:
    """``OFFLOAD_NUM_PARALLEL`` (Ollama's): sequences a model runs side by side, 1 to 64; None
    when unset (the planner chooses)."""
    v = os.environ.get("OFFLOAD_NUM_PARALLEL", "").strip()
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_NUM_PARALLEL:
        raise ConfigError(
            f"OFFLOAD_NUM_PARALLEL={v!r} is not a number of parallel sequences from 1 to "
            f"{MAX_NUM_PARALLEL}; unset it to let the planner choose"
        )
    return n


def hardware_file() -> Path:
    """Where this machine's probed hardware profile is cached: ``<data dir>/hardware.json``."""
    return data_dir() / "hardware.json"


def _int_env(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"{name}={v!r} is not a whole number") from None


def max_loaded_models() -> int:
    """``OFFLOAD_MAX_LOADED_MODELS`` (default 3, as Ollama per GPU)."""
    return _int_env("OFFLOAD_MAX_LOADED_MODELS", 3)


def max_queue() -> int:
    """``OFFLOAD_MAX_QUEUE`` (default 512)."""
    return _int_env("OFFLOAD_MAX_QUEUE", 512)


def origins() -> list[str]:
    """Browser origins allowed besides localhost: ``OFFLOAD_ORIGINS`` (comma separated)."""
    return [o.strip() for o in os.environ.get("OFFLOAD_ORIGINS", "").split(",") if o.strip()]


def load_timeout_s() -> float:
    """``OFFLOAD_LOAD_TIMEOUT`` (Ollama's ``OLLAMA_LOAD_TIMEOUT``): how long a runner may go without
    a sign of progress, loading or serving, before it is stopped as hung (default 5 minutes)."""
    return _timeout_env("OFFLOAD_LOAD_TIMEOUT", 300.0)


def spare_runner() -> bool:
    """``OFFLOAD_SPARE_RUNNER``: whether the server keeps one runner process started ahead of the
    next load (default on; ``0`` turns it off)."""
    value = os.environ.get("OFFLOAD_SPARE_RUNNER", "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"OFFLOAD_SPARE_RUNNER must be 1 or 0, not {value!r}")


def check() -> None:
    """Read every ``OFFLOAD_*`` variable once, so that a bad value fails at startup, not on the
    first request; ``ConfigError`` names the variable."""
    host()
    keep_alive_s()
    try:
        gpu_memory_budgets()
    except ConfigError as e:
        raise ConfigError(f"OFFLOAD_GPU_MEMORY: {e}") from None
    kv_cache_type()
    num_parallel()
    load_timeout_s()
    spare_runner()
    max_uploads()
    upload_timeout_s()
    max_upload_bytes()
    header_timeout_s()
    body_timeout_s()
    write_timeout_s()
    max_connections()
    for name, read in (
        ("OFFLOAD_MAX_LOADED_MODELS", max_loaded_models),
        ("OFFLOAD_MAX_QUEUE", max_queue),
    ):
        if read() < 1:
            raise ConfigError(f"{name} must be at least 1")


def allowed_paths() -> list[Path]:
    """``OFFLOAD_ALLOWED_PATHS``: folders whose files /api/create may import (``os.pathsep``-separated).

    Requests over HTTP may name no other files: the CLI reads the user's files itself.
    """
    raw = os.environ.get("OFFLOAD_ALLOWED_PATHS", "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def max_uploads() -> int:
    """``OFFLOAD_MAX_UPLOADS``: blob uploads at once (default 4); more are answered 503."""
    n = _int_env("OFFLOAD_MAX_UPLOADS", 4)
    if n < 1:
        raise ConfigError(f"OFFLOAD_MAX_UPLOADS={n} must be at least 1")
    return n


def upload_timeout_s() -> float:
    """``OFFLOAD_UPLOAD_TIMEOUT``: how long an upload may send nothing (default 60s)."""
    return _timeout_env("OFFLOAD_UPLOAD_TIMEOUT", 60.0)


def max_upload_bytes() -> int:
    """``OFFLOAD_MAX_UPLOAD_SIZE``: the largest blob an upload may send (default 4TiB)."""
    v = os.environ.get("OFFLOAD_MAX_UPLOAD_SIZE")
    try:
        return parse_bytes(v) if v else 4 << 40
    except ConfigError as e:
        raise ConfigError(f"OFFLOAD_MAX_UPLOAD_SIZE: {e}") from None


def hosts() -> list[str]:
    """Host names the server answers besides loopback and its own: ``OFFLOAD_HOSTS`` (comma
    separated; ``*.example.com`` matches subdomains, ``*`` any name)."""
    return [h.strip() for h in os.environ.get("OFFLOAD_HOSTS", "").split(",") if h.strip()]


# The longest timeout taken: a year is "never" in practice, and the system's own timers (a
# socket's, a thread's wait) overflow somewhere past 292 years.
MAX_TIMEOUT_S = 365 * 86400.0


def _timeout_env(name: str, default_s: float) -> float:
    try:
        t = parse_duration_s(os.environ.get(name), default_s)
    except ConfigError:
        raise ConfigError(
            f"{name}={os.environ.get(name)!r} is not a duration; write e.g. {default_s:g}s, 5m or 1h"
        ) from None
    if not 0 < t <= MAX_TIMEOUT_S:
        raise ConfigError(
            f"{name} must be a positive duration of at most a year, such as {default_s:g}s"
        )
    return t


def header_timeout_s() -> float:
    """``OFFLOAD_HEADER_TIMEOUT``: how long a connection has to send a complete request head, from
    when it opens or its last answer ends (default 10s; then it is closed, with a 408 when it had
    sent part of one)."""
    return _timeout_env("OFFLOAD_HEADER_TIMEOUT", 10.0)


def body_timeout_s() -> float:
    """``OFFLOAD_BODY_TIMEOUT``: how long a request body may send nothing (default 60s; then a 408
    and the connection is closed)."""
    return _timeout_env("OFFLOAD_BODY_TIMEOUT", 60.0)


def write_timeout_s() -> float:
    """``OFFLOAD_WRITE_TIMEOUT``: how long a client may leave an answer unread once the server's
    buffers for it are full (default 60s; then the connection is dropped and its generation
    cancelled, freeing the model for others)."""
    return _timeout_env("OFFLOAD_WRITE_TIMEOUT", 60.0)


def max_connections() -> int | None:
    """``OFFLOAD_MAX_CONNECTIONS``: client connections held open at once; None when unset (the
    server derives it from its open-file limit)."""
    v = os.environ.get("OFFLOAD_MAX_CONNECTIONS", "").strip()
    if not v:
        return None
    n = _int_env("OFFLOAD_MAX_CONNECTIONS", 0)
    if n < 1:
        raise ConfigError(f"OFFLOAD_MAX_CONNECTIONS={v!r} must be at least 1")
    return n
