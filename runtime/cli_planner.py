"""`offload plan` and `offload hardware`: thin faces over offload.planner (parse, call, format)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import click

from offload.planner import Plan, PlanRequest, anatomy, evaluate, plan
from offload.planner import hardware as hw_mod
from offload.planner.errors import OffloadError
from offload.planner.types import Anatomy, Hardware, Placement

__all__ = [
    "register",
    "plan_cmd",
    "hardware_cmd",
    "parse_size",
    "hardware_cache_file",
    "resolve_model",
]

_GiB = float(1 << 30)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """Bytes from ``8GiB``, ``7.5GB``, ``8192MiB`` or a plain number (``G`` alone means GiB, as Ollama)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    unit = {"g": "gib", "m": "mib", "k": "kib", "t": "tib"}.get(unit, unit)
    if not m or unit not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 8GiB, 7.5GB or 8192MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def hardware_cache_file() -> Path:
    """Where this machine's probed profile is cached: ``<data dir>/hardware.json``."""
    try:
        from offload.runtime.config import data_dir

        return data_dir() / "hardware.json"
    except ImportError:  # config arrives with the runtime; until then the same rule by hand
        import platformdirs

        return (
            Path(
                os.environ.get("OFFLOAD_HOME")
                or platformdirs.user_data_dir("offload", appauthor=False)
            )
            / "hardware.json"
        )


def resolve_model(name_or_path: str) -> Path:
    """A GGUF path as given, else a model name resolved through the model store."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    try:
        from offload.models.store import Store
        from offload.runtime import config
    except ImportError:
        raise click.ClickException(
            f"{name_or_path}: no such file (and no model store to resolve names)"
        ) from None
    store = Store(config.models_dir(), [q for q in [config.ollama_models_dir()] if q])
    try:
        from offload.models import embedded

        embedded.ensure(store, name_or_path)  # the embedded default model is imported on first use
    except ImportError:
        pass
    return Path(store.resolve(name_or_path).model_path)


def _default_gpu_budget() -> int | None:
    """``OFFLOAD_GPU_MEMORY`` as the server reads it, so `offload plan` shows what `serve` will do."""
    try:
        from offload.runtime import config
    except ImportError:
        return None
    fn = getattr(config, "gpu_memory_bytes", None)
    return fn() if fn else None


def _hardware(name: str | None, refresh: bool = False) -> tuple[Hardware, str | None]:
    """A profile by name, else this machine as llama.cpp can use it, with a warning (also shown
    on stderr) when that is less than it has: GPUs that this llama.cpp build cannot offload to."""
    if name:
        return hw_mod.load_profile(name), None
    from offload.runtime import backends

    usable = backends.current(hardware_cache_file(), refresh=refresh)
    if usable.warning:
        click.secho(f"Warning: {usable.warning}", fg="yellow", err=True)
    return usable.hardware, usable.warning


def _gib(n: float) -> str:
    return f"{n / _GiB:.2f} GiB"


def _print_plan(p: Plan, a: Anatomy, hw: Hardware) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(
        f"[bold]{a.name or Path(a.path).name}[/] ({a.arch}, {a.n_layers} layers, {_gib(a.weights_bytes)}) "
        f"on [bold]{hw.name}[/]"
    )
    t = Table(title="Memory per device")
    for col in ("device", "weights", "KV cache", "compute", "overhead", "total", "budget"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for d in p.devices:
        over = d.total_bytes > d.budget_bytes
        t.add_row(
            d.name,
            _gib(d.weights_bytes),
            _gib(d.kv_bytes),
            _gib(d.compute_bytes),
            _gib(d.overhead_bytes),
            f"[red]{_gib(d.total_bytes)}[/]" if over else _gib(d.total_bytes),
            _gib(d.budget_bytes),
        )
    c.print(t)
    s = Table(title="Placement", show_header=False)
    s.add_column("knob")
    s.add_column("value")
    s.add_row("layers on GPU", f"{p.n_gpu_layers} of {a.n_layers + 1} (output layer counts as one)")
    for pat in p.cpu_tensor_patterns:
        s.add_row("kept on CPU", pat)
    if p.tensor_split:
        s.add_row("tensor split", ", ".join(f"{x:.2f}" for x in p.tensor_split))
    s.add_row("context", f"{p.n_ctx} tokens x {p.n_parallel} sequence(s)")
    s.add_row("batch / ubatch", f"{p.n_batch} / {p.n_ubatch}")
    s.add_row("threads", f"{p.threads} (batch {p.threads_batch})")
    s.add_row("KV cache", f"{p.kv_type}, flash attention {'on' if p.flash_attn else 'off'}")
    s.add_row("op offload", "on" if p.op_offload else "off")
    s.add_row("model file", "memory-mapped" if p.use_mmap else "read into memory (pinned where a GPU copies it)")
    c.print(s)
    pr = p.predicted
    c.print(
        f"Predicted: [bold]{pr.decode_tps:.1f}[/] tokens/s decode, [bold]{pr.prompt_tps:.0f}[/] tokens/s prompt, "
        f"{pr.ttft_s:.2f} s to first token"
    )
    for r in p.reasons:
        c.print(f"  - {r}")


def _chart(path: str, p: Plan, a: Anatomy, hw: Hardware, req: PlanRequest) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException(
            "--chart needs matplotlib: pip install 'offload[charts]'"
        ) from None
    ks = list(range(0, a.n_layers + 2))
    base = dict(
        n_ctx=p.n_ctx,
        n_parallel=p.n_parallel,
        n_batch=p.n_batch,
        n_ubatch=p.n_ubatch,
        threads=p.threads,
        threads_batch=p.threads_batch,
        kv_type=p.kv_type,
        flash_attn=p.flash_attn,
        tensor_split=p.tensor_split,
    )
    plans = [evaluate(a, hw, req, Placement(k, **base)) for k in ks]
    fits = [all(d.total_bytes <= d.budget_bytes for d in q.devices) for q in plans]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax2 = ax.twinx()
    ax.plot(ks, [q.predicted.decode_tps for q in plans], "b-", label="decode t/s (whole layers)")
    ax2.plot(ks, [q.predicted.prompt_tps for q in plans], "g--", label="prompt t/s (whole layers)")
    for k, ok in zip(ks, fits, strict=True):
        if not ok:
            ax.axvspan(k - 0.5, k + 0.5, color="red", alpha=0.06, lw=0)
    ax.plot([p.n_gpu_layers], [p.predicted.decode_tps], "r*", ms=14, label="chosen plan (decode)")
    ax2.plot([p.n_gpu_layers], [p.predicted.prompt_tps], "m*", ms=14, label="chosen plan (prompt)")
    ax.set_xlabel("layers on GPU (shaded: over budget)")
    ax.set_ylabel("decode tokens/s")
    ax2.set_ylabel("prompt tokens/s")
    ax.set_title(f"{a.name or Path(a.path).name} on {hw.name}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command("plan")
@click.argument("model")
@click.option(
    "--hardware",
    "hardware_name",
    help="A profile name (rtx3060, ...) or profile JSON; default: this machine.",
)
@click.option("--ctx", type=int, help="Context length per sequence (default: planned).")
@click.option(
    "--max-ctx",
    type=int,
    default=4096,
    show_default=True,
    help="Largest context to plan when --ctx is not given (up to the model's training context).",
)
@click.option("--parallel", type=int, default=1, show_default=True, help="Parallel sequences.")
@click.option(
    "--gpu-layers", type=int, help="Force this many layers on the GPU (output layer counts as one)."
)
@click.option("--gpu-memory", help="GPU memory budget per GPU, e.g. 8GiB.")
@click.option(
    "--optimize",
    type=click.Choice(["decode", "prompt", "balanced"]),
    default="balanced",
    show_default=True,
)
@click.option(
    "--prompt-tokens",
    type=int,
    default=2048,
    show_default=True,
    help="Prompt length for prompt speed and TTFT.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--chart",
    type=click.Path(dir_okay=False),
    help="Write a PNG of predicted speed against GPU layers.",
)
def plan_cmd(
    model: str,
    hardware_name: str | None,
    ctx: int | None,
    max_ctx: int,
    parallel: int,
    gpu_layers: int | None,
    gpu_memory: str | None,
    optimize: str,
    prompt_tokens: int,
    as_json: bool,
    chart: str | None,
) -> None:
    """Plan where every tensor of MODEL (a name or a GGUF path) goes, and predict its speed."""
    try:
        a = anatomy.read(resolve_model(model))
        hw, warning = _hardware(hardware_name)
        req = PlanRequest(
            n_ctx=ctx,
            max_ctx=max_ctx,
            n_parallel=parallel,
            num_gpu=gpu_layers,
            optimize=optimize,
            gpu_budget_bytes=parse_size(gpu_memory) if gpu_memory else _default_gpu_budget(),
            prompt_tokens=prompt_tokens,
        )
        p = plan_with_calibration(a, hw, req, measured=hardware_name is None)
        if warning:
            p = dataclasses.replace(p, reasons=(*p.reasons, warning))
        if chart:
            _chart(chart, p, a, hw, req)
    except OffloadError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        _print_plan(p, a, hw)


def plan_with_calibration(a: Anatomy, hw: Hardware, req: PlanRequest, measured: bool) -> Plan:
    """Plan with this machine's calibrated speed model when there are runs to learn from."""
    if not measured:
        return plan(a, hw, req)
    from offload.runtime import calibration

    speed, n_runs = calibration.speed_params_for(hw.fingerprint)
    p = plan(a, hw, req, speed)
    if speed is not None:
        note = f"speeds calibrated from {n_runs} runs on this machine"
        p = dataclasses.replace(p, reasons=(*p.reasons, note))
    return p


@click.command("hardware")
@click.option("--refresh", is_flag=True, help="Probe again instead of using the cached profile.")
@click.option(
    "--profile", "profile", help="Show a shipped profile (or profile JSON) instead of this machine."
)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def hardware_cmd(refresh: bool, profile: str | None, as_json: bool) -> None:
    """Show this machine's measured hardware profile (cached under the data dir)."""
    try:
        hw, warning = _hardware(profile, refresh=refresh)
    except OffloadError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(hw.to_dict(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(
        f"[bold]{hw.name}[/]  fingerprint {hw.fingerprint or '-'}  measured {hw.measured_at or '-'}"
    )
    cpu = hw.cpu
    c.print(
        f"CPU {cpu.name or '?'}: {cpu.cores} cores, RAM {_gib(cpu.ram_bytes)} "
        f"({_gib(cpu.ram_available_bytes)} available), memory bandwidth {cpu.mem_bandwidth_Bps / 1e9:.1f} GB/s"
    )
    if hw.gpus:
        t = Table(title="GPUs")
        for col in ("#", "name", "VRAM", "free", "bandwidth", "host->device", "PCIe", "compute"):
            t.add_column(col)
        for g in hw.gpus:
            t.add_row(
                str(g.index),
                g.name,
                _gib(g.vram_bytes),
                _gib(g.vram_free_bytes),
                f"{g.mem_bandwidth_Bps / 1e9:.0f} GB/s",
                f"{g.h2d_bandwidth_Bps / 1e9:.1f} GB/s",
                f"gen{g.pcie_gen} x{g.pcie_width}" if g.pcie_gen else "-",
                g.compute_capability or "-",
            )
        c.print(t)
    else:
        c.print("No GPUs llama.cpp can use." if warning else "No GPUs.")
    for n in hw.notes:
        if n != warning:  # already shown, on stderr
            c.print(f"  note: {n}")


def register(group: click.Group) -> None:
    """Add ``plan`` and ``hardware`` to the ``offload`` command group."""
    group.add_command(plan_cmd, "plan")
    group.add_command(hardware_cmd, "hardware")


def _main(argv: list[str] | None = None) -> Any:  # pragma: no cover - handy for `python -m`
    g = click.Group()
    register(g)
    return g(argv)


if __name__ == "__main__":  # pragma: no cover
    _main()
