"""``offload bench MODEL``: measure the planner's placement (or a sweep of them) in a runner process.

Measured and predicted speeds side by side; every run is recorded in the calibration store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from offload.planner import (
    Hardware,
    Plan,
    SpeedParams,
    Workload,
    evaluate,
    fits,
    predict_aggregate,
)
from offload.planner.anatomy import read as read_anatomy
from offload.planner.errors import OffloadError
from offload.planner.search import split_probes
from offload.planner.types import Anatomy
from offload.runtime.serving import calibration, planning

__all__ = ["register", "bench"]

# Each stream of the batched measurement has its own prompt of this many tokens, as
# ``llama-batched-bench -npp 128`` runs them.
PARALLEL_PROMPT_TOKENS = 128


def _plans(
    ref: planning.ModelRef,
    anatomy: Anatomy,
    hw: Hardware,
    gpu_layers: str,
    prompt: int,
    gen: int,
    parallel: int,
    optimize: str,
) -> list[Plan]:
    base = {
        "n_ctx": prompt + gen + 16,
        "n_parallel": parallel,
        "optimize": optimize,
        "prompt_tokens": prompt,
        "workload": Workload(prompt, gen, source="requested"),
    }
    if gpu_layers == "auto":
        return [planning.plan_model(anatomy, hw, planning.request(**base), digest=ref.digest)]
    if gpu_layers == "sweep":
        top = anatomy.n_layers + 1 if hw.gpus else 0
        counts = sorted({0, top, *range(0, top + 1, max(1, top // 6))})
    else:
        try:
            counts = [int(gpu_layers)]
        except ValueError:
            raise click.BadParameter(
                "use 'auto', 'sweep' or a number", param_hint="--gpu-layers"
            ) from None
    plans = []
    for n in counts:
        try:
            plans.append(
                planning.plan_model(
                    anatomy, hw, planning.request(**base, num_gpu=n), digest=ref.digest
                )
            )
        except OffloadError as e:
            click.echo(f"skipping {n} GPU layers: {e}", err=True)
    if gpu_layers == "sweep" and plans:
        # FFN tensors behind GPU attention too, so that calibration can tell the cost of a
        # hand-over between CPU and GPU from CPU bandwidth (see split_probes).
        most = max(plans, key=lambda p: p.n_gpu_layers)
        req = planning.request(**base, num_gpu=most.n_gpu_layers)
        speed, _ = calibration.speed_params_for(hw.fingerprint)
        plans += [
            p
            for p in (
                evaluate(anatomy, hw, req, pl, speed)
                for pl in split_probes(anatomy, hw, req, most.placement)
            )
            if fits(p)
        ]
    return plans


def _lookup(predicted: dict[str, float]) -> Callable[[int], float | None]:
    """``predicted``'s value for a stream count, as ``measure_plan`` asks for it."""
    return lambda n: predicted.get(str(n))


def _predicted_parallel(
    anatomy: Anatomy,
    hw: Hardware,
    plan: Plan,
    streams: tuple[int, ...],
    prompt: int,
    gen: int,
    speed: SpeedParams | None,
) -> dict[str, float]:
    """The speed model's aggregate decode for each stream count, as ``measure_plan`` runs them (each
    stream its own prompt of ``prompt`` tokens, then ``gen`` tokens each). ``speed``: the model the
    plans were predicted with, so that runs recorded meanwhile do not change it between rows."""
    context = prompt + gen // 2
    return {
        str(n): round(
            predict_aggregate(anatomy, hw, plan.placement, n, speed, context_tokens=context), 3
        )
        for n in streams
    }


def bench(
    model: str,
    prompt: int = 512,
    gen: int = 128,
    gpu_layers: str = "auto",
    parallel: tuple[int, ...] = (1,),
    optimize: str = "workload",
) -> list[dict[str, Any]]:
    """Measure the plan(s) for ``model`` on this machine; one result dict per plan."""
    from offload.runtime.serving.benchmark import measure_plan

    ref = planning.resolve(model)
    anatomy = read_anatomy(ref.path)
    hw = planning.current_hardware()
    speed, _ = calibration.speed_params_for(hw.fingerprint)
    plans = _plans(ref, anatomy, hw, gpu_layers, prompt, gen, max(parallel), optimize)
    results = []
    for p in plans:
        predicted = _predicted_parallel(
            anatomy, hw, p, parallel, PARALLEL_PROMPT_TOKENS, gen, speed
        )
        results.append(
            measure_plan(
                ref.path,
                p,
                prompt_tokens=prompt,
                gen_tokens=gen,
                parallel=parallel,
                model_digest=ref.digest,
                parallel_prompt_tokens=PARALLEL_PROMPT_TOKENS,
                predict_aggregate=_lookup(predicted),
            )
        )
    return results


def _chart(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OffloadError("--chart needs matplotlib (pip install 'offload[charts]')") from None
    labels = [f"{r['plan']['n_gpu_layers']} GPU layers" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("decode_tps", "prompt_tps"), strict=True):
        xs = range(len(results))
        ax.bar([x - 0.2 for x in xs], [r["measured"][key] for r in results], 0.4, label="measured")
        ax.bar(
            [x + 0.2 for x in xs], [r["predicted"][key] for r in results], 0.4, label="predicted"
        )
        ax.set_xticks(list(xs), labels, rotation=30, ha="right")
        ax.set_ylabel(key.replace("_tps", " tokens/s"))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _parallel(value: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(x) for x in value.split(",") if x.strip()}))
    except ValueError:
        raise click.BadParameter("a comma-separated list of sequence counts, e.g. 1,4,8") from None
    if not out or min(out) < 1:
        raise click.BadParameter("sequence counts must be at least 1")
    return out


def register(group: click.Group) -> None:
    """Add ``offload bench`` to the CLI group."""

    @group.command("bench")
    @click.argument("model")
    @click.option(
        "--prompt", "prompt_tokens", default=512, show_default=True, help="Prompt tokens."
    )
    @click.option("--gen", "gen_tokens", default=128, show_default=True, help="Tokens to generate.")
    @click.option(
        "--gpu-layers",
        default="auto",
        show_default=True,
        help="'auto' (the planner's plan), 'sweep', or a number of whole layers.",
    )
    @click.option(
        "--parallel",
        default="1",
        show_default=True,
        help="Sequence counts for batched throughput, e.g. 1,4,8.",
    )
    @click.option(
        "--optimize",
        type=click.Choice(["workload", "decode", "prompt", "balanced"]),
        default="workload",
        help="The planner's mode for 'auto' (balanced is the old name of workload).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option(
        "--chart", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG chart."
    )
    def bench_cmd(
        model: str,
        prompt_tokens: int,
        gen_tokens: int,
        gpu_layers: str,
        parallel: str,
        optimize: str,
        as_json: bool,
        chart: Path | None,
    ) -> None:
        """Measure MODEL on this machine: prompt and decode speed, time to first token, batched
        throughput, each beside the planner's prediction. Calibrates the speed model."""
        results = bench(model, prompt_tokens, gen_tokens, gpu_layers, _parallel(parallel), optimize)
        if chart is not None and results:
            _chart(results, chart)
        if as_json:
            out: Any = results[0] if len(results) == 1 else {**results[0], "runs": results}
            click.echo(json.dumps(out, indent=2))
            return
        click.echo(f"{'PLACEMENT':<22}{'PROMPT t/s':>22}{'DECODE t/s':>22}{'TTFT s':>18}")
        click.echo(
            f"{'':<22}{'measured / predicted':>22}{'measured / predicted':>22}{'meas / pred':>18}"
        )
        for r in results:
            m, p, pl = r["measured"], r["predicted"], r["plan"]
            n_over = len(pl["cpu_tensor_patterns"])
            where = f"{pl['n_gpu_layers']} GPU layers" + (
                f", {n_over} override{'s' if n_over > 1 else ''}" if n_over else ""
            )
            click.echo(
                f"{where:<22}{m['prompt_tps']:>12.1f} / {p['prompt_tps']:<7.1f}"
                f"{m['decode_tps']:>12.1f} / {p['decode_tps']:<7.1f}"
                f"{m['ttft_s']:>9.2f} / {p['ttft_s']:<6.2f}"
            )
            batched = m.get("batched") or []
            if batched:
                click.echo(
                    f"  {'STREAMS':>8}{'AGGREGATE t/s':>24}{'PER STREAM t/s':>16}{'TTFT p50 / p95 s':>20}"
                    f"{'LONGEST STALL s':>17}"
                )
                for b in batched:
                    pred = b.get("predicted_aggregate_decode_tps")
                    agg = f"{b['aggregate_decode_tps']:.1f} / " + (f"{pred:.1f}" if pred else "-")
                    click.echo(
                        f"  {b['streams']:>8}{agg:>24}{b['per_stream_decode_tps']:>16.1f}"
                        f"{b['ttft_p50_s']:>11.2f} / {b['ttft_p95_s']:<6.2f}{b['max_gap_s']:>17.2f}"
                    )
        click.echo(f"recorded {len(results)} run(s) in the calibration store")
