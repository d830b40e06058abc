"""`offload plan` and `offload hardware`: thin faces over offload.planner (parse, call, format)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from offload.models.parameters import MAX_CTX
from offload.planner import Plan, PlanRequest, Workload, anatomy, evaluate
from offload.planner.errors import OffloadError
from offload.planner.types import MAX_WORKLOAD_TOKENS, Anatomy, Hardware
from offload.runtime import config
from offload.runtime.serving import planning

__all__ = ["register", "plan_cmd", "hardware_cmd", "parse_workload", "parse_gpu_memory"]

_GiB = float(1 << 30)


def parse_gpu_memory(text: str) -> int | tuple[int, ...]:
    """``--gpu-memory``: one budget for every GPU (``8G``, ``8GiB``, ``7.5GB``) or one per GPU
    (``8GiB,6GiB``), read as ``OFFLOAD_GPU_MEMORY`` is."""
    try:
        budgets = config.gpu_memory_budgets(text)
    except config.ConfigError as e:
        raise click.BadParameter(str(e)) from None
    if not budgets:
        raise click.BadParameter(f"{text!r} is not a size (try 8GiB, 8G, 7.5GB or 512MiB)")
    return budgets[0] if len(budgets) == 1 else budgets


def parse_workload(text: str) -> Workload:
    """``--workload P,G``: P prompt tokens and G answer tokens a typical request has."""
    try:
        prompt, answer = (int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not PROMPT,ANSWER token counts like 1024,256"
        ) from None
    try:
        return Workload(prompt, answer, source="requested")
    except OffloadError as e:
        raise click.BadParameter(str(e)) from None


def _warn(warning: str | None) -> None:
    """GPUs this llama.cpp build cannot use: said plainly, with the command that fixes it."""
    if warning:
        click.secho(f"Warning: {warning}", fg="yellow", err=True)


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
    t = Table(title="Memory per device (GPU budgets as nvidia-smi counts them)")
    for col in ("device", "weights", "KV cache", "compute", "CUDA context", "total", "budget"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for d in p.devices:
        over = d.total_bytes > d.budget_bytes
        t.add_row(
            d.name if d.kind == "CPU" else f"GPU {d.index} {d.name}",
            _gib(d.weights_bytes),
            _gib(d.kv_bytes),
            _gib(d.compute_bytes),
            _gib(d.overhead_bytes) if d.kind == "GPU" else "-",
            f"[red]{_gib(d.total_bytes)}[/]" if over else _gib(d.total_bytes),
            _gib(d.budget_bytes),
        )
    c.print(t)
    s = Table(title="Placement", show_header=False)
    s.add_column("knob")
    s.add_column("value")
    s.add_row("layers on GPU", f"{p.n_gpu_layers} of {a.n_layers + 1} (output layer counts as one)")
    for pat, g in p.gpu_tensor_patterns:
        s.add_row(f"moved to GPU {g}", pat)
    for pat in p.cpu_tensor_patterns:
        s.add_row("kept on CPU", pat)
    if p.tensor_split:
        s.add_row(
            "tensor split",
            ", ".join(f"{x:g}" for x in p.tensor_split) + " (offloaded layers per GPU)",
        )
    s.add_row(
        "context",
        f"{p.n_ctx} tokens x {p.n_parallel} sequence(s), one KV cache of {p.n_ctx_total} cells",
    )
    s.add_row("batch / ubatch", f"{p.n_batch} / {p.n_ubatch}")
    s.add_row("threads", f"{p.threads} (batch {p.threads_batch})")
    s.add_row("KV cache", f"{p.kv_type}, flash attention {'on' if p.flash_attn else 'off'}")
    s.add_row("op offload", "on" if p.op_offload else "off")
    s.add_row(
        "model file",
        "memory-mapped" if p.use_mmap else "read into memory (pinned where a GPU copies it)",
    )
    w = p.workload
    s.add_row(
        "planned for",
        f"{p.optimize}: requests of {w.prompt_tokens} prompt + {w.answer_tokens} answer "
        f"tokens ({w.source})",
    )
    c.print(s)
    pr = p.predicted
    c.print(
        f"Predicted: [bold]{pr.decode_tps:.1f}[/] tokens/s decode, [bold]{pr.prompt_tps:.0f}[/] tokens/s prompt, "
        f"{pr.ttft_s:.2f} s to first token, [bold]{pr.request_s:.2f} s[/] a request"
        + (
            f"; [bold]{pr.aggregate_decode_tps:.1f}[/] tokens/s decoding {p.n_parallel} streams together"
            if p.n_parallel > 1
            else ""
        )
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
    plans = [
        evaluate(
            a,
            hw,
            req,
            replace(
                p.placement,
                n_gpu_layers=k,
                cpu_tensor_patterns=(),
                pinned_weights=False,
                use_mmap=None,
            ),
        )
        for k in ks
    ]
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
    help="A profile name (rtx3060, 2x-rtx3060, ...) or profile JSON; default: this machine.",
)
@click.option(
    "--ctx",
    type=click.IntRange(1, MAX_CTX),
    help="Context length per sequence (default: planned).",
)
@click.option(
    "--max-ctx",
    type=click.IntRange(1, MAX_CTX),
    default=4096,
    show_default=True,
    help="Largest context to plan when --ctx is not given (up to the model's training context).",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, config.MAX_NUM_PARALLEL),
    help="Sequences run side by side (default: OFFLOAD_NUM_PARALLEL, else the planner chooses).",
)
@click.option(
    "--gpu-layers",
    type=click.IntRange(0, None),
    help="Force this many layers on the GPU (output layer counts as one).",
)
@click.option(
    "--gpu-memory",
    callback=lambda _c, _p, v: parse_gpu_memory(v) if v else None,
    help="GPU memory budget per GPU as nvidia-smi counts it, CUDA context included: 8GiB, or "
    "one per GPU: 8GiB,6GiB (default: OFFLOAD_GPU_MEMORY).",
)
@click.option(
    "--optimize",
    type=click.Choice(["workload", "decode", "prompt", "balanced"]),
    default="workload",
    show_default=True,
    help="workload: the shortest typical request (balanced is its old name); decode or prompt: that speed.",
)
@click.option(
    "--workload",
    callback=lambda _c, _p, v: parse_workload(v) if v else None,
    help="PROMPT,ANSWER tokens of a typical request (default: this model's recorded medians, "
    "else 1024,256).",
)
@click.option(
    "--kv-type",
    type=click.Choice(list(config.KV_CACHE_TYPES)),
    help="KV cache type (default: OFFLOAD_KV_CACHE_TYPE, else f16 unless the context needs less).",
)
@click.option(
    "--prompt-tokens",
    type=click.IntRange(1, MAX_WORKLOAD_TOKENS),
    help="Prompt length the shown prompt speed and TTFT are predicted for (default: the workload's).",
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
    parallel: int | None,
    gpu_layers: int | None,
    gpu_memory: int | tuple[int, ...] | None,
    optimize: str,
    workload: Workload | None,
    kv_type: str | None,
    prompt_tokens: int | None,
    as_json: bool,
    chart: str | None,
) -> None:
    """Plan where every tensor of MODEL (a name or a GGUF path) goes, and predict its speed."""
    try:
        ref = planning.resolve(model)
        a = anatomy.read(ref.path)
        hw, warning = planning.hardware(hardware_name)
        _warn(warning)
        req = planning.request(
            n_ctx=ctx,
            max_ctx=max_ctx,
            n_parallel=parallel,
            num_gpu=gpu_layers,
            optimize=optimize,
            gpu_budget_bytes=gpu_memory,
            workload=workload,
            kv_type=kv_type,
            prompt_tokens=prompt_tokens,
        )
        p = planning.plan_model(a, hw, req, digest=ref.digest, calibrated=hardware_name is None)
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


@click.command("hardware")
@click.option("--refresh", is_flag=True, help="Probe again instead of using the cached profile.")
@click.option(
    "--profile", "profile", help="Show a shipped profile (or profile JSON) instead of this machine."
)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def hardware_cmd(refresh: bool, profile: str | None, as_json: bool) -> None:
    """Show this machine's measured hardware profile (cached under the data dir)."""
    try:
        hw, warning = planning.hardware(profile, refresh=refresh)
    except OffloadError as e:
        raise click.ClickException(str(e)) from None
    _warn(warning)
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
