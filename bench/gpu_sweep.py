#!/usr/bin/env python3
"""The GPU proof: the planner's placements against llama.cpp's --fit and a sweep, at emulated budgets.

For each budget (GiB of GPU memory for llama.cpp's buffers, as --fit's target) it measures, through
our executor, prompt and decode speed of: the planner's plan (default mode and --optimize decode),
llama.cpp's --fit placement (from llama-fit-params, applied by our executor; once also through
llama-bench), the best whole-layer split that fits (Ollama's way), then alternatives (layers near the
edge, expert tensors of k layers on the CPU, n_ubatch, threads). Every run carries the planner's
prediction for the same placement and the GPU memory llama.cpp reported. Results are written after
every run to ``OUT/<kind>-<budget>gib.json`` as ``{"summary": ..., "runs": [...]}``.

    python bench/gpu_sweep.py --model dense --budgets 3,4,6 --time-budget-s 240 --out $OUT
    python bench/gpu_sweep.py --model moe --cpu-smoke --out /tmp/smoke     # every code path on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _use_checkout() -> None:
    """Import ``offload`` from this checkout (a shim of symlinks), whatever else is installed."""
    shim = Path(tempfile.gettempdir()) / f"offload-shim-{os.getuid()}"
    pkg = shim / "offload"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("planner", "runtime", "models"):
        link = pkg / name
        if link.is_symlink() and link.resolve() != (HERE.parent / name).resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(HERE.parent / name)
    sys.path.insert(0, str(shim))
    # Before anything imports numpy: llama.cpp's libraries must load first (runtime/native.py).
    importlib.import_module("offload.runtime")


_use_checkout()

import gpu_tools  # noqa: E402
import synth_models  # noqa: E402

GiB = 1 << 30
DEFAULT_BUDGETS = {"dense": [3.0, 4.0, 6.0], "moe": [8.0, 12.0, 16.0, 24.0]}
# Tiny models on a pretend GPU: a CUDA context (budgets count it, as nvidia-smi does) and a little.
SMOKE_BUDGETS = {"dense": [0.506, 0.512], "moe": [0.512, 0.524]}
N_CTX = 4096
KEY_LABELS = ("planner", "planner_decode", "fit", "best_layers")


def log(msg: str) -> None:
    """Progress on stdout (a bench script, not library code)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Sweep:
    """One model, several budgets; runs measured through our executor, written as they finish."""

    def __init__(self, args: argparse.Namespace) -> None:
        from offload.planner import anatomy as anatomy_mod

        self.args = args
        self.kind = args.model
        self.smoke = args.cpu_smoke
        self.deadline = time.monotonic() + args.time_budget_s
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = Path(args.model_path or (self.out / f"synth-{self.kind}.gguf"))
        if not self.model.exists():
            log(f"writing {self.model}")
            synth_models.write_model(self.model, ("tiny-" if self.smoke else "") + self.kind)
        self.anatomy = anatomy_mod.read(self.model)
        self.gpu0 = gpu_tools.gpu_memory(0)
        self.hw = self._hardware()
        self.tools = Path(args.tools_dir)
        self.results: dict[float, dict[str, Any]] = {}
        self.last_run_s = 8.0
        self.notes: list[str] = []
        self.budgets: list[float] = []
        self._threads: int | None = None

    # -- planner ---------------------------------------------------------------------------------

    def _hardware(self) -> Any:
        from offload.planner import hardware as hw_mod

        hw = hw_mod.probe()
        if self.smoke and not hw.gpus:
            from offload.planner.types import GPUInfo

            # A pretend GPU so the planner places layers; runs then execute them on the CPU.
            fake = GPUInfo(name="smoke-GPU", vram_bytes=2 * GiB, mem_bandwidth_Bps=900e9,
                           h2d_bandwidth_Bps=25e9, index=0, vram_free_bytes=2 * GiB)
            hw = dataclasses.replace(hw, gpus=(fake,))
        return hw

    def request(self, budget_gib: float, optimize: str = "balanced") -> Any:
        from offload.planner.types import PlanRequest

        return PlanRequest(n_ctx=N_CTX, optimize=optimize, gpu_budget_bytes=int(budget_gib * GiB),
                           prompt_tokens=self.args.prompt)

    def plan(self, budget_gib: float, optimize: str) -> Any:
        from offload.planner import plan as make_plan

        return make_plan(self.anatomy, self.hw, self.request(budget_gib, optimize))

    def evaluate(self, budget_gib: float, **knobs: Any) -> Any:
        """The planner's Plan (memory and predicted speeds) for a placement given by knobs."""
        from offload.planner import evaluate  # type: ignore[attr-defined]
        from offload.planner.types import Placement  # type: ignore[attr-defined]

        names = {f.name for f in dataclasses.fields(Placement)}
        knobs = {"n_ctx": N_CTX, **knobs}
        return evaluate(self.anatomy, self.hw, self.request(budget_gib),
                        Placement(**{k: v for k, v in knobs.items() if k in names}))

    def fits(self, plan: Any) -> bool:
        return all(d.total_bytes <= d.budget_bytes for d in plan.devices if d.kind == "GPU")

    def expert_pattern(self, layers: list[int]) -> str:
        return r"^blk\.(" + "|".join(map(str, layers)) + r")\.ffn_(up|down|gate)_exps"

    # -- measuring ------------------------------------------------------------------------------

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def measure(self, budget_gib: float, label: str, plan: Any, group: str = "sweep",
                extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Load, measure and record one placement; None when out of time."""
        from offload.runtime.benchmark import measure_plan
        from offload.runtime.engine import Engine
        from offload.runtime.errors import LoadFailed, OutOfMemory

        if self.time_left() < self.last_run_s * 1.3:
            self.notes.append(f"out of time before {label} at {budget_gib} GiB")
            return None
        t0 = time.monotonic()
        gpu_pred = sum(d.total_bytes for d in plan.devices if d.kind == "GPU")
        run: dict[str, Any] = {
            "label": label, "group": group, "budget_gib": budget_gib,
            "placement": {k: getattr(plan, k) for k in ("n_gpu_layers", "n_ctx", "n_batch", "n_ubatch",
                                                        "threads", "threads_batch", "flash_attn", "kv_type",
                                                        "use_mmap")},
            "cpu_tensor_patterns": list(plan.cpu_tensor_patterns),
            "predicted": {"decode_tps": plan.predicted.decode_tps, "prompt_tps": plan.predicted.prompt_tps,
                          "ttft_s": plan.predicted.ttft_s},
            "predicted_gpu_bytes": gpu_pred, "predicted_fits": self.fits(plan), "oom": False,
            "over_budget": False, **(extra or {}),
        }
        exec_plan = plan
        if self.smoke:  # run the GPU part on the CPU, keeping the overrides (still applied and logged)
            exec_plan = dataclasses.replace(plan, n_gpu_layers=0,
                                            devices=tuple(d for d in plan.devices if d.kind == "CPU"))
        used0 = (gpu_tools.gpu_memory(0) or {}).get("used_bytes")
        engine = None
        try:
            engine = Engine.load(self.model, exec_plan)
            used1 = (gpu_tools.gpu_memory(0) or {}).get("used_bytes")
            m = measure_plan(self.model, exec_plan, prompt_tokens=self.args.prompt, gen_tokens=self.args.gen,
                             record=False, engine=engine)
            # Decode from the median step: one step the OS delayed (16 threads on 16 vCPUs) moved
            # single 128-token means by up to 10% between identical placements. The mean is kept.
            run["measured"] = {"prompt_tps": m["measured"]["prompt_tps"],
                               "decode_tps": m["measured"]["decode_tps_median"],
                               "decode_tps_mean": m["measured"]["decode_tps"], "ttft_s": m["measured"]["ttft_s"]}
            run["load_s"] = engine.load_s
            run["measured_bytes"] = engine.measured_bytes
            run["overridden_tensors"] = len(engine.overridden_tensors)
            # llama.cpp's own lines: which buffer types (CUDA_Host is pinned, CPU_Mapped the file) hold what.
            run["buffer_lines"] = [ln.strip() for ln in engine.load_log if "buffer size" in ln][:16]
            gpu_bytes = sum(sum(v.values()) for d, v in engine.measured_bytes.items() if d != "CPU")
            run["gpu_buffer_bytes"] = gpu_bytes
            run["nvml_delta_bytes"] = used1 - used0 if used0 is not None and used1 is not None else None
            run["over_budget"] = bool(self.gpu0) and gpu_bytes > budget_gib * GiB
        except OutOfMemory as e:
            run["oom"] = True
            run["error"] = str(e)[:500]
        except LoadFailed as e:
            run["error"] = str(e)[:500]
        except Exception as e:  # noqa: BLE001 - one broken run must not end the sweep
            run["error"] = f"{type(e).__name__}: {e}"[:500]
            run["traceback"] = traceback.format_exc()[-1500:]
        finally:
            if engine is not None:
                engine.close()
            gc.collect()
        run["wall_s"] = time.monotonic() - t0
        self.last_run_s = max(3.0, run["wall_s"])
        meas = run.get("measured", {})
        log(f"{budget_gib:g} GiB {label:<22} ngl={plan.n_gpu_layers:<3} ot={len(plan.cpu_tensor_patterns)} "
            f"ub={plan.n_ubatch} t={plan.threads}: decode {meas.get('decode_tps', 0):8.1f} "
            f"(pred {plan.predicted.decode_tps:8.1f}) prompt {meas.get('prompt_tps', 0):9.1f} "
            f"(pred {plan.predicted.prompt_tps:9.1f}) gpu {run.get('gpu_buffer_bytes', 0) / GiB:.2f} GiB"
            f"{' OVER' if run['over_budget'] else ''}{' OOM' if run['oom'] else ''}"
            f"{' ERR ' + run['error'][:80] if 'error' in run else ''}")
        self.results.setdefault(budget_gib, {"runs": []})["runs"].append(run)
        self.write(budget_gib)
        return run

    # -- the phases -----------------------------------------------------------------------------

    def fit_placements(self, budgets: list[float]) -> dict[float, dict[str, Any]]:
        """llama-fit-params for every budget, before this process holds any GPU memory."""
        tool = self.tools / "llama-fit-params"
        out: dict[float, dict[str, Any]] = {}
        for b in budgets:
            if self.smoke:  # exercise the parse -> evaluate -> measure path with a line in fit's format
                pat = r"blk\.1\.ffn_(up|down|gate)_exps" if self.anatomy.expert_count else r"blk\.1\.ffn_up"
                out[b] = {"smoke": "synthetic fit line",
                          "parsed": gpu_tools.parse_fit_params(f"-ngl {self.anatomy.n_layers + 1} -ot {pat}=CPU")}
                continue
            if not tool.exists() or not self.gpu0:
                out[b] = {"skipped": f"{tool} absent" if not tool.exists() else "no GPU"}
                continue
            # GPU.md's convention: a budget of B MiB is a margin of free_MiB - B, with free memory
            # read just before the call (this process may hold a CUDA context after the probe).
            free = (gpu_tools.gpu_memory(0) or self.gpu0)["free_bytes"]
            margin = int(free / 2**20 - b * 1024)
            out[b] = {"margin_mib": margin, "free_mib": free >> 20,
                      **gpu_tools.run_fit_params(tool, self.model, N_CTX, margin)}
            log(f"fit-params {b:g} GiB (margin {margin} MiB): {(out[b].get('parsed') or {}).get('line', out[b])}")
        return out

    def key_runs(self, b: float, fit: dict[str, Any]) -> None:
        """The four placements the summary compares, most important first."""
        self.results.setdefault(b, {"runs": []})["fit_params"] = fit
        for label, optimize in (("planner", "balanced"), ("planner_decode", "decode")):
            try:
                p = self.plan(b, optimize)
            except Exception as e:  # noqa: BLE001 - PlanInfeasible or a planner bug: recorded, sweep goes on
                self.results[b]["runs"].append({"label": label, "error": f"planner: {e}"})
                continue
            self.measure(b, label, p, group="key", extra={"reasons": list(p.reasons)})
        parsed = fit.get("parsed")
        if parsed:
            def fit_run() -> None:
                # llama-fit-params writes patterns for layers the model may not have (blk.48 of a
                # 48-layer model); llama.cpp ignores those, our executor refuses them: drop them here.
                import re

                names = [t.name for t in self.anatomy.tensors]
                patterns = tuple(pat for pat in parsed["cpu_tensor_patterns"]
                                 if any(re.search(pat, n) for n in names))
                p = self.evaluate(b, n_gpu_layers=parsed["n_gpu_layers"], cpu_tensor_patterns=patterns,
                                  flash_attn=True, threads=self.threads())
                self.measure(b, "fit", p, group="key", extra={"fit_line": parsed["line"]})

            self.guarded(f"fit run at {b:g} GiB", fit_run)

        def best_run() -> None:
            best = self.best_layers(b)
            if best is not None:
                self.measure(b, "best_layers", best, group="key")

        self.guarded(f"best whole layers at {b:g} GiB", best_run)

    def warm_up(self, b: float) -> None:
        """One unrecorded run first, so that process-wide first-time costs (CUDA context, cuBLAS
        handles, kernels) do not land on the planner's run, which is measured first."""
        from offload.runtime.benchmark import measure_plan

        plan = self.plan(b, "balanced")
        if self.smoke:
            plan = dataclasses.replace(plan, n_gpu_layers=0, devices=tuple(d for d in plan.devices if d.kind == "CPU"))
        t0 = time.monotonic()
        measure_plan(self.model, plan, prompt_tokens=min(256, self.args.prompt), gen_tokens=16, record=False)
        log(f"warm-up run took {time.monotonic() - t0:.1f} s")

    def threads(self) -> int:
        """The planner's thread count (the same at every budget), used for the non-planner placements."""
        if self._threads is None:
            try:
                self._threads = int(self.plan(self.budgets[0], "balanced").threads)
            except Exception:  # noqa: BLE001
                self._threads = int(self.hw.cpu.cores)
        return self._threads

    def best_layers(self, b: float) -> Any:
        """The most whole layers the planner's memory model says fit (what Ollama does)."""
        best = None
        for ngl in range(self.anatomy.n_layers + 1, -1, -1):
            p = self.evaluate(b, n_gpu_layers=ngl, flash_attn=True, threads=self.threads())
            if self.fits(p):
                best = p
                break
        return best

    def llama_bench(self, b: float) -> None:
        """Our executor's fit run once more through llama-bench: the executor adds no overhead."""
        tool = self.tools / "llama-bench"
        fit = next((r for r in self.results.get(b, {}).get("runs", []) if r["label"] == "fit"), None)
        if not tool.exists() or fit is None or self.time_left() < 60:
            self.results.setdefault(b, {"runs": []})["llama_bench"] = {"skipped": "no tool, fit run or time"}
            return
        res = gpu_tools.run_llama_bench(tool, self.model, fit["placement"]["n_gpu_layers"],
                                        fit["cpu_tensor_patterns"], threads=fit["placement"]["threads"],
                                        prompt=self.args.prompt, gen=self.args.gen,
                                        n_ubatch=fit["placement"]["n_ubatch"])
        res["ours"] = fit.get("measured")
        # llama-bench's tg runs from an empty context; ours decodes after the prompt. Measure its
        # decode at the same depth too (needs a llama-bench with -d; an error is recorded if not).
        if self.time_left() > 60:
            deep = gpu_tools.run_llama_bench(tool, self.model, fit["placement"]["n_gpu_layers"],
                                             fit["cpu_tensor_patterns"], threads=fit["placement"]["threads"],
                                             prompt=0, gen=self.args.gen, n_ubatch=fit["placement"]["n_ubatch"],
                                             depth=self.args.prompt)
            res["decode_at_depth"] = deep
        self.results[b]["llama_bench"] = res
        log(f"llama-bench of the fit placement: {res}")
        self.write(b)

    def heal(self) -> None:
        """A full-GPU plan against a card made too small (memory held by a blocker), in a subprocess."""
        if not self.gpu0 or self.time_left() < 60:
            self.results.setdefault(self.budgets[0], {"runs": []})["heal"] = {"skipped": "no GPU or time"}
            return
        cmd = [sys.executable, __file__, "--heal-only", "--model", self.kind, "--model-path", str(self.model),
               "--out", str(self.out)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, self.time_left() - 20))
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"rc": r.returncode, "tail": (r.stdout + r.stderr)[-2000:]}
        except subprocess.TimeoutExpired:
            res = {"error": "timed out"}
        log(f"heal: {res}")
        self.results.setdefault(self.budgets[0], {"runs": []})["heal"] = res
        self.write(self.budgets[0])

    def sweep_candidates(self, b: float) -> list[tuple[str, dict[str, Any]]]:
        """Alternatives around the edge, for regret, most telling first: expert groups, n_ubatch,
        whole layers near the edge, threads."""
        key = {r["label"]: r for r in self.results.get(b, {}).get("runs", [])}
        best = self.best_layers(b)
        threads = self.threads()
        cands: list[tuple[str, dict[str, Any]]] = []
        base = key.get("planner")
        # The alternatives run in host memory of the kind the planner chose (pinned or mapped), so
        # that they differ from the planner's plan in placement only; fit and best_layers keep
        # llama.cpp's and Ollama's default (mapped) as baselines, and two runs swap it over.
        pinned = bool(base and "placement" in base and base["placement"].get("use_mmap") is False)
        if pinned and base:
            bp0 = {"n_gpu_layers": base["placement"]["n_gpu_layers"],
                   "cpu_tensor_patterns": tuple(base["cpu_tensor_patterns"]),
                   "n_ubatch": base["placement"]["n_ubatch"], "threads": base["placement"]["threads"],
                   "kv_type": base["placement"]["kv_type"]}
            cands.append(("planner_mmap", {**bp0, "pinned_weights": False}))
            fit = key.get("fit")
            if fit and "placement" in fit:
                cands.append(("fit_pinned", {"n_gpu_layers": fit["placement"]["n_gpu_layers"],
                                             "cpu_tensor_patterns": tuple(fit["cpu_tensor_patterns"]),
                                             "pinned_weights": True}))
        if best is not None:
            for d in (-1, 1, -2):
                n = best.n_gpu_layers + d
                if 0 <= n <= self.anatomy.n_layers + 1:
                    cands.append((f"layers_{n}", {"n_gpu_layers": n, "pinned_weights": pinned}))
        if self.anatomy.expert_count:
            n_layers = self.anatomy.n_layers
            k_min = next((k for k in range(n_layers + 1)
                          if self.fits(self.evaluate(b, n_gpu_layers=n_layers + 1, flash_attn=True, threads=threads,
                                                     cpu_tensor_patterns=(self.expert_pattern(list(range(k))),)
                                                     if k else ()))), None)
            if k_min is not None:
                for k in sorted({k_min, min(k_min + 2, n_layers), min(k_min + 6, n_layers), n_layers}):
                    pats = (self.expert_pattern(list(range(k))),) if k else ()
                    cands.append((f"experts_cpu_{k}", {"n_gpu_layers": n_layers + 1, "cpu_tensor_patterns": pats,
                                                       "pinned_weights": pinned}))
        if base and "placement" in base:
            bp = {"n_gpu_layers": base["placement"]["n_gpu_layers"],
                  "cpu_tensor_patterns": tuple(base["cpu_tensor_patterns"]),
                  "n_ubatch": base["placement"]["n_ubatch"], "threads": base["placement"]["threads"],
                  "kv_type": base["placement"]["kv_type"], "pinned_weights": pinned}
            for ub in (512, 1024, 2048):
                if ub != bp["n_ubatch"]:
                    cands.append((f"planner_ubatch_{ub}", {**bp, "n_ubatch": ub}))
            for t in (4, 8, 12, 16):
                if t != bp["threads"] and t <= max(self.hw.cpu.threads or 0, self.hw.cpu.cores):
                    cands.append((f"planner_threads_{t}", {**bp, "threads": t}))
        order = ("planner_mmap", "fit_pinned", "experts_cpu", "planner_ubatch_2048", "layers", "planner_ubatch",
                 "planner_threads")
        return sorted(cands, key=lambda c: next(i for i, o in enumerate(order) if c[0].startswith(o)))

    def sweep_runs(self, budgets: list[float]) -> None:
        """The alternatives of every budget, taken in turn across budgets so each gets some."""
        lists: dict[float, list[tuple[str, dict[str, Any]]]] = {}
        for b in budgets:
            try:
                lists[b] = self.sweep_candidates(b)
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"sweep candidates at {b:g} GiB failed: {e}"[:300])
        threads = self.threads()
        while any(lists.values()):
            for b in budgets:
                if not lists.get(b):
                    continue
                label, knobs = lists[b].pop(0)
                knobs = {"flash_attn": True, "threads": threads, **knobs}
                try:
                    plan = self.evaluate(b, **knobs)
                except Exception as e:  # noqa: BLE001
                    self.notes.append(f"evaluate failed for {label}: {e}"[:300])
                    continue
                if self.measure(b, label, plan) is None:
                    return

    # -- results --------------------------------------------------------------------------------

    def summary(self, b: float) -> dict[str, Any]:
        runs = [r for r in self.results.get(b, {}).get("runs", []) if "measured" in r]
        by = {r["label"]: r for r in runs}

        def m(label: str, key: str) -> float | None:
            return by[label]["measured"][key] if label in by else None

        def ratio(a: float | None, c: float | None) -> float | None:
            return a / c if a and c else None

        ok = [r for r in runs if not r["over_budget"]]
        best_sweep = max((r["measured"]["decode_tps"] for r in ok), default=None)
        errs_d = [abs(r["predicted"]["decode_tps"] / r["measured"]["decode_tps"] - 1) for r in runs
                  if r["measured"]["decode_tps"] > 0]
        errs_p = [abs(r["predicted"]["prompt_tps"] / r["measured"]["prompt_tps"] - 1) for r in runs
                  if r["measured"]["prompt_tps"] > 0]
        planner_runs = [r for r in self.results.get(b, {}).get("runs", []) if r["label"] in ("planner", "planner_decode")]
        return {
            "model_kind": self.kind, "budget_gib": b, "model_path": str(self.model),
            "planner_decode_tps": m("planner", "decode_tps"), "planner_prompt_tps": m("planner", "prompt_tps"),
            "decode_mode_decode_tps": m("planner_decode", "decode_tps"),
            "decode_mode_prompt_tps": m("planner_decode", "prompt_tps"),
            "fit_decode_tps": m("fit", "decode_tps"), "fit_prompt_tps": m("fit", "prompt_tps"),
            "best_layer_split_decode_tps": m("best_layers", "decode_tps"),
            "best_layer_split_prompt_tps": m("best_layers", "prompt_tps"),
            "best_sweep_decode_tps": best_sweep,
            "regret": ratio(best_sweep, m("planner_decode", "decode_tps")),
            "planner_vs_fit_decode": ratio(m("planner", "decode_tps"), m("fit", "decode_tps")),
            "planner_vs_fit_prompt": ratio(m("planner", "prompt_tps"), m("fit", "prompt_tps")),
            "decode_mode_vs_fit_decode": ratio(m("planner_decode", "decode_tps"), m("fit", "decode_tps")),
            "planner_vs_best_layer_split": ratio(m("planner", "decode_tps"), m("best_layers", "decode_tps")),
            "median_decode_pred_error": statistics.median(errs_d) if errs_d else None,
            "median_prompt_pred_error": statistics.median(errs_p) if errs_p else None,
            "over_budget_placements": sum(1 for r in planner_runs if r.get("over_budget")),
            "oom": sum(1 for r in planner_runs if r.get("oom")),
            "over_budget_any_run": sum(1 for r in runs if r.get("over_budget")),
            "oom_any_run": sum(1 for r in self.results.get(b, {}).get("runs", []) if r.get("oom")),
            "runs_measured": len(runs),
            "device": (self.gpu0 or {}).get("name") or ("CPU smoke (no GPU)" if self.smoke else "CPU"),
            "cpu_smoke": self.smoke, "prompt_tokens": self.args.prompt, "gen_tokens": self.args.gen,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "notes": self.notes,
        }

    def write(self, b: float) -> None:
        data = {"summary": self.summary(b), **self.results.get(b, {}), "hardware": self.hw.to_dict()}
        path = self.out / f"{self.kind}-{b:g}gib.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)

    def guarded(self, what: str, fn: Any, *args: Any) -> None:
        """Run one phase; a failure is noted in the results and the sweep goes on."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - partial results beat none on a 10-minute machine
            self.notes.append(f"{what} failed: {type(e).__name__}: {e}"[:400])
            log(f"{what} failed:\n{traceback.format_exc()}")

    def run(self, budgets: list[float]) -> None:
        """All phases, most important first: key placements at every budget, then the extras."""
        self.budgets = budgets
        fits: dict[float, dict[str, Any]] = {b: {} for b in budgets}
        self.guarded("llama-fit-params", lambda: fits.update(self.fit_placements(budgets)))
        self.guarded("warm-up", self.warm_up, budgets[0])
        for b in budgets:
            self.guarded(f"key runs at {b:g} GiB", self.key_runs, b, fits[b])
        self.guarded("llama-bench", self.llama_bench, budgets[0])
        if self.args.heal:
            self.guarded("heal", self.heal)
        self.guarded("sweep", self.sweep_runs, budgets)
        for b in budgets:
            self.write(b)
            log(f"summary {b:g} GiB: {json.dumps(self.summary(b), default=str)}")


def heal_only(args: argparse.Namespace) -> dict[str, Any]:
    """Hold GPU memory so that a full-GPU plan no longer fits, then load it with healing."""
    from offload.planner import anatomy as anatomy_mod
    from offload.planner import evaluate  # type: ignore[attr-defined]
    from offload.planner import hardware as hw_mod
    from offload.planner.types import Placement, PlanRequest  # type: ignore[attr-defined]
    from offload.runtime.benchmark import measure_plan
    from offload.runtime.loader import load_healing

    model = Path(args.model_path)
    a = anatomy_mod.read(model)
    hw = hw_mod.probe()
    plan = evaluate(a, hw, PlanRequest(n_ctx=N_CTX, prompt_tokens=512),
                    Placement(n_gpu_layers=a.n_layers + 1, n_ctx=N_CTX, flash_attn=True))
    need = sum(d.total_bytes for d in plan.devices if d.kind == "GPU")
    free = gpu_tools.gpu_memory(0)["free_bytes"]  # type: ignore[index]
    # Leave 60% of what the plan needs (+0.5 GiB for the CUDA context): about 40% must be given up.
    keep = int(need * 0.6) + GiB // 2
    blocker = gpu_tools.GpuBlocker(max(free - keep, 0))
    t0 = time.monotonic()
    res: dict[str, Any] = {"plan_gpu_bytes": need, "free_bytes_before": free, "left_free_bytes": keep,
                           "n_gpu_layers_asked": plan.n_gpu_layers}
    try:
        engine, healed, gave_up = load_healing(model, plan)
        res.update(loaded=True, gave_up=gave_up, n_gpu_layers=healed.n_gpu_layers,
                   cpu_tensor_patterns=list(healed.cpu_tensor_patterns), measured_bytes=engine.measured_bytes,
                   heal_s=time.monotonic() - t0)
        m = measure_plan(model, healed, prompt_tokens=256, gen_tokens=32, record=False, engine=engine)
        res["measured"] = {k: m["measured"][k] for k in ("prompt_tps", "decode_tps")}
        engine.close()
    except Exception as e:  # noqa: BLE001 - reported, not raised: this is the proof's result
        res.update(loaded=False, error=f"{type(e).__name__}: {e}"[:800])
    finally:
        blocker.close()
    return res


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["dense", "moe"], required=True)
    ap.add_argument("--model-path", help="GGUF to use (written there if missing)")
    ap.add_argument("--budgets", help="GiB, comma-separated (default: dense 3,4,6; moe 8,12,16,24)")
    ap.add_argument("--time-budget-s", type=float, default=240.0, help="stop starting runs after this")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (2048; smoke 256)")
    ap.add_argument("--gen", type=int, default=None, help="decode tokens (128; smoke 16)")
    ap.add_argument("--tools-dir", default="/tmp/llama-tools", help="where llama-bench/llama-fit-params are")
    ap.add_argument("--heal", action="store_true", help="also prove healing against a blocked card")
    ap.add_argument("--heal-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny model, pretend GPU in the planner, GPU layers executed on the CPU")
    args = ap.parse_args(argv)
    if args.heal_only:
        print(json.dumps(heal_only(args), default=str), flush=True)
        return 0
    args.prompt = args.prompt or (256 if args.cpu_smoke else 2048)
    args.gen = args.gen or (16 if args.cpu_smoke else 128)
    budgets = ([float(x) for x in args.budgets.split(",")] if args.budgets
               else (SMOKE_BUDGETS if args.cpu_smoke else DEFAULT_BUDGETS)[args.model])
    sweep = Sweep(args)
    log(f"model {sweep.model} ({sweep.anatomy.n_layers} layers), GPU {sweep.gpu0}, budgets {budgets} GiB, "
        f"{args.time_budget_s:.0f} s")
    sweep.run(budgets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
