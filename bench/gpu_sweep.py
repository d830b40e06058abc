#!/usr/bin/env python3
"""The GPU proof: offload's plans against the best llama.cpp command lines, at the same budget,
all measured by the same llama-bench binary.

At every budget B (GiB per GPU, as nvidia-smi counts a whole process, CUDA context included) six
candidates run, each loaded ``--reps`` times (3) in a llama-bench process of its own:

    fit             llama.cpp's --fit placement (llama-fit-params -fitt free-B), file mapped
    fit_no_mmap     the same with -lm none (what --no-mmap gives)
    expert          --no-mmap -ub 2048 -b 2048 -t <cores>, with fit re-run for -ub 2048
    offload         `offload plan --json --gpu-memory B` (the default plan), replayed with its
                    -ngl/-ot/-ts/-ub/-b/-t/-ctk/-fa/-lm
    offload_decode  the same with --optimize decode
    offload_prompt  the same with --optimize prompt

nvidia-smi's peak memory of every GPU is recorded beside llama.cpp's buffers for every load. A
baseline whose load goes over the budget (llama.cpp's fit does not count all of the CUDA context)
is fitted again with its margins raised by the overshoot, so every candidate runs within the same
memory; its earlier loads stay in the file, marked superseded. Each load also times a prompt of
the typical request's length (1024 tokens), which the request time uses. The
run is resumable: the state of each budget lives in ``--state`` (kept on a warm machine) and
is copied to ``--out`` after every load; what is done is skipped; loads stop before ``--end-time``.

    python bench/gpu_sweep.py --state /tmp/offload-sweep --out $OUT --end-time $(( $(date +%s) + 500 ))
    python bench/gpu_sweep.py --gpus 2 ...                   # budgets per card, two GPUs
    python bench/gpu_sweep.py --cpu-smoke --out /tmp/smoke   # every path on a CPU, tiny models
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _use_checkout() -> str:
    """Import ``offload`` from this checkout (a shim of symlinks), whatever else is installed;
    returns the shim's folder for the child processes' PYTHONPATH."""
    checkout = HERE.parent.resolve()
    tag = hashlib.sha256(str(checkout).encode()).hexdigest()[:10]  # one shim per checkout
    shim = Path(tempfile.gettempdir()) / f"offload-shim-{os.getuid()}-{tag}"
    pkg = shim / "offload"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("planner", "runtime", "models"):
        link = pkg / name
        if link.is_symlink() and link.resolve() != (HERE.parent / name).resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(HERE.parent / name)
    sys.path.insert(0, str(shim))
    return str(shim)


SHIM = _use_checkout()

import gpu_tools  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
LABELS = ("fit", "fit_no_mmap", "expert", "offload", "offload_decode", "offload_prompt")
BASELINES = LABELS[:3]
OURS = LABELS[3:]
DEFAULT_BUDGETS = {
    1: {"moe": [8.0, 12.0, 16.0], "dense": [3.0, 4.0]},
    2: {"moe": [6.0, 8.0], "dense": [6.0, 8.0]},
}
# Above the smallest GPU plan a budget that counts the CUDA context and kernels allows (about
# 0.66 GiB dense, 0.78 GiB MoE).
SMOKE_BUDGETS = {"tiny-moe": [0.9, 1.1], "tiny-dense": [0.75]}
SMOKE_FREE_MIB = 2048  # the pretend card of --cpu-smoke
# A baseline whose load went over the budget as nvidia-smi counts it (llama.cpp's fit does not
# count all of the CUDA context) is fitted again with its margins raised by the overshoot and this
# much, at most MAX_REFITS times; its over-budget loads are kept, marked superseded, out of the
# medians. So every candidate runs within the same GPU memory.
REFIT_EXTRA_MIB = 32
MAX_REFITS = 2
# What one calibration sweep may take (ten placements loaded by a runner, 512 + 64 tokens each).
CALIBRATION_S = 240
# Which fit each baseline's placement comes from.
FIT_SOURCE = {"fit": "fit", "fit_no_mmap": "fit", "expert": "expert"}
MAX_LOAD_S = 400.0  # one llama-bench process longer than this is a failure, not a slow placement
WORKLOAD = (1024, 256)  # prompt and answer tokens of a typical request: time = P/prompt + G/decode
TARGETS = {
    "request_speedup": 1.10,
    "decode_ratio": 1.00,
    "prompt_ratio": 1.00,
    "decode_error": 0.10,
    "prompt_error": 0.20,
}


def log(msg: str) -> None:
    """Progress on stdout (a bench script, not library code)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x]
    return statistics.median(xs) if xs else None


def predict_args(
    doc: dict[str, Any], args: list[str], hw: Any, speed: Any, context: int | None = None
) -> dict[str, float]:
    """The speed model's prediction for a placement given as llama-bench arguments, on ``hw``
    with ``speed``: prompt t/s at the sweep's prompt length; decode t/s with ``context`` tokens in
    the KV cache (default: the prompt length, as `offload plan --prompt-tokens` predicts it)."""
    from offload.planner import anatomy, evaluate
    from offload.planner.types import Placement, PlanRequest

    a = anatomy.read(doc["model_path"])
    names = [t.name for t in a.tensors]
    kv = dict(zip(args[::2], args[1::2], strict=False))
    rules = [r.rpartition("=") for r in kv.get("-ot", "").split(";") if "=" in r]
    # fit may name one block too many
    rules = [r for r in rules if any(re.search(r[0], n) for n in names)]
    cpu = [p for p, _, b in rules if b == "CPU"]
    gpu = [
        (p, int(b[len(gpu_tools.GPU_BUFT) :]))
        for p, _, b in rules
        if b.startswith(gpu_tools.GPU_BUFT) and b[len(gpu_tools.GPU_BUFT) :].isdigit()
    ]
    ngl = int(kv["-ngl"])
    knobs = {
        "n_gpu_layers": ngl if ngl >= 0 else a.n_layers + 1,
        "cpu_tensor_patterns": tuple(cpu),
        "gpu_tensor_patterns": tuple(gpu),
        "n_ctx": doc["ctx"],
        "n_batch": int(kv.get("-b", 2048)),
        "n_ubatch": int(kv.get("-ub", 512)),
        "threads": int(kv.get("-t", 0)),
        "flash_attn": kv.get("-fa") == "1",
        "tensor_split": tuple(float(x) for x in kv["-ts"].split("/")) if "-ts" in kv else (),
        "pinned_weights": kv.get("-lm") == "none" and kv.get("--no-host") != "1",
        "use_mmap": kv.get("-lm") != "none",
    }
    fields = Placement.__dataclass_fields__
    place = Placement(**{k: v for k, v in knobs.items() if k in fields})
    req = PlanRequest(
        n_ctx=doc["ctx"],
        gpu_budget_bytes=int(doc["budget_gib"] * GiB),
        prompt_tokens=doc["prompt"],
    )
    p = evaluate(a, hw, req, place, speed)
    out = {"decode_tps": p.predicted.decode_tps, "prompt_tps": p.predicted.prompt_tps}
    if context is not None:
        from offload.planner.cost import predict

        at = predict(a, hw, p.placement, speed, prompt_tokens=doc["prompt"], context_tokens=context)
        out.update(decode_tps=at.decode_tps, decode_context=context)
    return out


class Sweep:
    """Every (model, budget) document, prepared once, measured load by load until the end time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.cpu_smoke
        self.end = args.end_time or (time.time() + args.time_budget_s)
        self.state = Path(args.state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out) if args.out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
        self.tools = Path(args.tools_dir)
        self.prefix = "sweep-2gpu-" if args.gpus == 2 else "sweep-"
        self.cores = args.expert_threads or os.cpu_count() or 1
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (SHIM, os.environ.get("PYTHONPATH")) if p
        )
        self.env["OFFLOAD_HOME"] = str(self.state / "offload-home")
        # This process reads the same calibration (for its predictions of the baselines).
        os.environ["OFFLOAD_HOME"] = self.env["OFFLOAD_HOME"]
        self.env.pop("OFFLOAD_GPU_MEMORY", None)
        if not self.smoke:  # one GPU means GPU 0 alone, also on a host with more
            self.env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(args.gpus))
        self.profile: Path | None = self._smoke_profile() if self.smoke else None
        self._hw: Any = None
        self.est_s: dict[str, float] = {}

    # -- documents -----------------------------------------------------------------------------

    def name(self, kind: str, budget: float) -> str:
        return f"{self.prefix}{kind}-{budget:g}gib.json"

    def load_doc(self, kind: str, budget: float, model: Path) -> dict[str, Any]:
        path = self.state / self.name(kind, budget)
        seed = (
            Path(self.args.resume_from) / self.name(kind, budget) if self.args.resume_from else None
        )
        for p in [] if self.args.fresh else [path, seed]:
            if p and p.exists():
                doc = json.loads(p.read_text())
                if (doc.get("prompt"), doc.get("gen"), doc.get("decode_depth", 0)) == (
                    self.args.prompt,
                    self.args.gen,
                    self.args.decode_depth,
                ):
                    log(f"resuming {p} ({len(doc.get('runs', []))} loads done)")
                    doc["reps"] = self.args.reps
                    doc["model_path"] = str(model)
                    return doc
        return {
            "kind": kind,
            "budget_gib": budget,
            "gpus": self.args.gpus,
            "model_path": str(model),
            "model_bytes": model.stat().st_size,
            "prompt": self.args.prompt,
            "gen": self.args.gen,
            "ctx": self.args.ctx,
            "decode_depth": self.args.decode_depth,
            "workload": list(WORKLOAD),
            "reps": self.args.reps,
            "cpu_smoke": self.smoke,
            "expert_threads": self.cores,
            "candidates": {},
            "runs": [],
            "notes": [],
        }

    def save(self, doc: dict[str, Any]) -> None:
        summarize(doc)
        doc["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        name = self.name(doc["kind"], doc["budget_gib"])
        for folder in [self.state, self.out]:
            if folder is None:
                continue
            tmp = folder / (name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1, default=str))
            os.replace(tmp, folder / name)

    def time_left(self) -> float:
        return self.end - time.time()

    # -- models and hardware ---------------------------------------------------------------------

    def model(self, kind: str) -> Path:
        path = Path(self.args.model_dir) / f"synth-{kind}.gguf"
        if not path.exists():
            import synth_models

            log(f"writing {path}")
            synth_models.write_model(path, kind)
        return path

    def _smoke_profile(self) -> Path:
        """A pretend machine for --cpu-smoke: this CPU and small GPUs, so plans place layers."""
        from offload.planner import hardware as hw_mod
        from offload.planner.types import GPUInfo

        hw = hw_mod.probe(measure=False)
        gpus = [
            GPUInfo(
                name="smoke-GPU",
                vram_bytes=SMOKE_FREE_MIB * MiB,
                mem_bandwidth_Bps=900e9,
                h2d_bandwidth_Bps=25e9,
                index=i,
                vram_free_bytes=SMOKE_FREE_MIB * MiB,
            ).__dict__
            for i in range(self.args.gpus)
        ]
        data = {**hw.to_dict(), "gpus": gpus}
        path = self.state / "smoke-hardware.json"
        path.write_text(json.dumps(data))
        return path

    def offload_cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "offload.runtime.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=self.env)

    def hardware(self) -> Any:
        """The machine as `offload plan` sees it (for predictions of the baselines)."""
        if self._hw is None:
            from offload.planner.types import Hardware

            if self.profile:
                self._hw = Hardware.from_dict(json.loads(self.profile.read_text()))
            else:
                r = self.offload_cli("hardware", "--json")
                self._hw = Hardware.from_dict(json.loads(r.stdout)) if r.returncode == 0 else False
        return self._hw or None

    def free_mib(self) -> list[int]:
        if self.smoke:
            return [SMOKE_FREE_MIB] * self.args.gpus
        rows = gpu_tools.gpu_memory() or []
        return [r["free_mib"] for r in rows[: self.args.gpus]]

    # -- candidates ------------------------------------------------------------------------------

    def prepare(self, doc: dict[str, Any]) -> None:
        """llama-fit-params and `offload plan` for every candidate not prepared yet."""
        cands = doc["candidates"]
        model = Path(doc["model_path"])
        budget_mib = int(doc["budget_gib"] * 1024)
        if "fit" not in cands or "expert" not in cands:
            free = self.free_mib()
            if len(free) < self.args.gpus:
                doc["notes"].append(
                    f"nvidia-smi shows {len(free)} GPUs, {self.args.gpus} needed: no fit baselines"
                )
            else:
                margins = [f - budget_mib for f in free]
                for label, extra in (("fit", []), ("expert", ["-ub", "2048", "-b", "2048"])):
                    if label in cands:
                        continue
                    fit = gpu_tools.run_fit_params(
                        self.tools / "llama-fit-params",
                        model,
                        doc["ctx"],
                        margins,
                        extra,
                        env=self.env,
                    )
                    fit.update(free_mib=free, margins_mib=margins, extra=extra)
                    log(
                        f"{doc['kind']} {doc['budget_gib']:g} GiB fit-params{' ' + ' '.join(extra) if extra else ''}"
                        f": {(fit.get('parsed') or {}).get('line') or fit.get('error') or fit.get('output_tail', '')[-300:]}"
                    )
                    if not fit.get("parsed"):
                        doc["notes"].append(
                            f"llama-fit-params failed for {label}: {fit.get('error') or fit.get('rc')}"
                        )
                        doc.setdefault("fit_failures", {})[label] = fit
                        continue
                    args = gpu_tools.fit_bench_args(fit["parsed"]) + ["-fa", "1"]
                    if label == "fit":
                        cands["fit"] = {"args": args, "source": fit}
                        cands["fit_no_mmap"] = {
                            "args": args + ["-lm", "none"],
                            "source": {"same_fit_as": "fit"},
                        }
                    else:
                        args += ["-lm", "none", "-ub", "2048", "-b", "2048", "-t", str(self.cores)]
                        cands["expert"] = {"args": args, "source": fit}
        for label, mode in (
            ("offload", None),
            ("offload_decode", "decode"),
            ("offload_prompt", "prompt"),
        ):
            if label in cands:
                continue
            cli = [
                "plan",
                str(model),
                "--json",
                "--gpu-memory",
                f"{budget_mib}MiB",
                "--ctx",
                str(doc["ctx"]),
                "--parallel",
                "1",
                *(["--optimize", mode] if mode else []),
                *(["--hardware", str(self.profile)] if self.profile else []),
            ]
            r = self.offload_cli(*cli, "--prompt-tokens", str(doc["prompt"]))
            if r.returncode == 2 and "No such option: --prompt-tokens" in r.stderr:
                r = self.offload_cli(
                    *cli
                )  # a planner that plans for a workload, not one prompt length
            if r.returncode != 0:
                doc["notes"].append(
                    f"offload {' '.join(cli[:1] + cli[2:])} failed: {r.stderr.strip()[-400:]}"
                )
                log(doc["notes"][-1])
                continue
            plan = json.loads(r.stdout)
            args, notes = gpu_tools.plan_bench_args(plan)
            cands[label] = {
                "args": args,
                "notes": notes,
                "plan": plan,
                "predicted": plan.get("predicted"),
                "stderr": r.stderr.strip()[-600:] or None,
                "planned_gpu_bytes": [
                    d.get("total_bytes") for d in plan.get("devices", []) if d.get("kind") == "GPU"
                ],
            }
            log(f"{doc['kind']} {doc['budget_gib']:g} GiB {label}: {' '.join(args)}")
        for label in BASELINES:
            if label in cands and "predicted" not in cands[label]:
                cands[label]["predicted"] = self.predict(doc, cands[label]["args"])
        depth = int(doc.get("decode_depth") or 0)
        for cand in cands.values():
            if depth and "predicted_at_depth" not in cand:
                # The decode where the loads measure it (llama-bench -d), every candidate alike.
                cand["predicted_at_depth"] = self.predict(doc, cand["args"], context=depth)
        hw = self.hardware()
        if hw is not None and "hardware" not in doc:
            # What the predictions were made for, so that they can be recomputed off the machine.
            doc["hardware"] = hw.to_dict()
            speed = self.speed(hw)
            doc["speed_params"] = speed.to_dict() if speed is not None else None
        self.save(doc)

    @staticmethod
    def speed(hw: Any) -> Any:
        """The speed model `offload plan` uses here: fitted to this machine's runs in the sweep's
        OFFLOAD_HOME (`offload bench` there calibrates it), else the defaults (None)."""
        from offload.runtime.serving import calibration

        return calibration.speed_params_for(hw.fingerprint)[0]

    def predict(
        self, doc: dict[str, Any], args: list[str], context: int | None = None
    ) -> dict[str, float] | None:
        """The planner's prediction for a placement given as llama-bench arguments (None where it
        cannot say): the prompt at the sweep's length, the decode with ``context`` tokens in the
        KV cache (default: that length too)."""
        try:
            hw = self.hardware()
            if hw is None:
                return None
            return predict_args(doc, args, hw, self.speed(hw), context)
        except Exception as e:  # noqa: BLE001 - a prediction is extra; the measurement stands
            doc["notes"].append(
                f"no prediction for {' '.join(args)[:80]}: {type(e).__name__}: {e}"[:300]
            )
            return None

    # -- measuring -------------------------------------------------------------------------------

    def estimate_s(self, doc: dict[str, Any], label: str) -> float:
        own = [r["wall_s"] for r in doc["runs"] if r["label"] == label and r.get("wall_s")]
        if own:
            return max(own)
        if f"{doc['kind']}/{label}" in self.est_s:
            return self.est_s[f"{doc['kind']}/{label}"]
        return 10.0 + 2.5 * doc["model_bytes"] / GiB

    def measure(self, doc: dict[str, Any], label: str, rep: int) -> dict[str, Any]:
        cand = doc["candidates"][label]
        before = gpu_tools.gpu_memory()
        used0 = {r["index"]: r["used_mib"] for r in before or []}
        timeout_s = max(10.0, min(MAX_LOAD_S, self.time_left() - 3))
        res = gpu_tools.run_llama_bench(
            self.tools / "llama-bench",
            Path(doc["model_path"]),
            cand["args"],
            prompt=doc["prompt"],
            gen=doc["gen"],
            env=self.env,
            monitor=not self.smoke,
            timeout_s=timeout_s,
            # The typical request's prompt length too: its time is measured, not scaled.
            more_prompts=(int(doc.get("workload", WORKLOAD)[0]),),
            depth=int(doc.get("decode_depth", 0)),
        )
        run: dict[str, Any] = {
            "label": label,
            "rep": rep,
            **res,
            "gpu_used_before_mib": used0 or None,
        }
        if str(res.get("error", "")).startswith("timed out") and timeout_s < MAX_LOAD_S:
            run["deadline_cut"] = True
            return run
        peaks = res.get("gpu_peak_mib")
        if peaks and used0:
            proc = {i: peaks.get(i, 0) - used0.get(i, 0) for i in range(self.args.gpus)}
            run["gpu_process_peak_mib"] = proc
            run["over_budget"] = any(v > doc["budget_gib"] * 1024 for v in proc.values())
        else:
            run["over_budget"] = None
        self.est_s[f"{doc['kind']}/{label}"] = res.get("wall_s") or 0
        log(
            f"{doc['kind']} {doc['budget_gib']:g} GiB {label:<15} #{rep}: prompt {run.get('prompt_tps') or 0:9.1f} "
            f"decode {run.get('decode_tps') or 0:7.1f} t/s  peak {run.get('gpu_process_peak_mib')} MiB "
            f"{' OVER' if run['over_budget'] else ''}{' OOM' if run.get('oom') else ''}"
            f"{' ERROR ' + str(run.get('error') or run.get('rc')) if run.get('error') or run.get('rc') else ''}"
            f" ({run.get('wall_s')} s)"
        )
        return run

    def calibrate(self) -> bool:
        """`offload bench MODEL --gpu-layers sweep` for each model of --calibrate, once per state:
        offload's plans (and the predictions of the baselines) then use the speed model fitted to
        this machine, as a user's would after running it. False while one is still to be done."""
        for kind in [k for k in (self.args.calibrate or "").split(",") if k]:
            done = self.state / f"calibration-{kind}.txt"
            if done.exists():
                continue
            if self.time_left() < CALIBRATION_S:
                log(f"no time left to calibrate on {kind}")
                return False
            t0 = time.time()
            r = self.offload_cli(
                "bench", str(self.model(kind)), "--gpu-layers", "sweep", "--prompt", "512",
                "--gen", "64", timeout_s=max(self.time_left() - 20, 60),
            )  # fmt: skip
            text = f"$ offload bench {kind} --gpu-layers sweep (exit {r.returncode}, {time.time() - t0:.0f} s)\n"
            text += r.stdout + r.stderr[-4000:]
            log(text)
            if r.returncode != 0:
                continue
            done.write_text(text)
            if self.out:
                (self.out / done.name).write_text(text)
        return True

    def run(self) -> list[dict[str, Any]]:
        """Prepare every document, then load round by round (every candidate once, then again)."""
        if not self.calibrate():
            # Plans made now would use the uncalibrated speed model, and a later call would keep
            # them: nothing is planned or loaded until the calibration has run.
            log("the calibration runs first: resume the sweep with more time")
            return []
        docs = []
        for kind, budgets in self.budgets().items():
            model = self.model(kind)
            docs += [self.load_doc(kind, b, model) for b in budgets]
        for doc in docs:
            if self.time_left() < 30:
                log("out of time while preparing")
                break
            self.prepare(doc)
        for rep in range(1, self.args.reps + 1):
            for doc in docs:
                for label in LABELS:
                    if label not in doc["candidates"] or any(
                        r["label"] == label and r["rep"] == rep and not r.get("superseded")
                        for r in doc["runs"]
                    ):
                        continue
                    same = self.same_placement(doc, label, rep)
                    if same is not None:
                        doc["runs"].append({**same, "label": label, "shared_with": same["label"]})
                        self.save(doc)
                        continue
                    need = self.estimate_s(doc, label) * 1.15 + 5
                    if self.time_left() < need:
                        log(
                            f"stopping: {self.time_left():.0f} s left, {label} needs about {need:.0f} s"
                        )
                        self.finish(docs)
                        return docs
                    while True:
                        run = self.measure(doc, label, rep)
                        if run.get("deadline_cut"):  # not a result: it runs again in the next call
                            log(f"stopping: {label} was cut short by the end time")
                            self.finish(docs)
                            return docs
                        doc["runs"].append(run)
                        self.save(doc)
                        if self.time_left() < 30 or not self.refit(doc, label, run):
                            break
        self.finish(docs)
        return docs

    def refit(self, doc: dict[str, Any], label: str, run: dict[str, Any]) -> bool:
        """After a baseline's load over the budget: fit its placement again with the margins raised
        by the overshoot, supersede the loads of the old placement, True when there is a new one."""
        src_label = FIT_SOURCE.get(label)
        peaks = run.get("gpu_process_peak_mib")
        if not src_label or not run.get("over_budget") or not peaks:
            return False
        cands = doc["candidates"]
        source = cands[src_label].get("source") or {}
        done = source.get("refits", [])
        if len(done) >= MAX_REFITS or "margins_mib" not in source:
            return False
        budget_mib = doc["budget_gib"] * 1024
        over = [max(0, int(peaks.get(i, 0) - budget_mib)) for i in range(self.args.gpus)]
        margins = [
            m + (o + REFIT_EXTRA_MIB if o else 0)
            for m, o in zip(source["margins_mib"], over, strict=True)
        ]
        extra = list(source.get("extra") or [])
        fit = gpu_tools.run_fit_params(
            self.tools / "llama-fit-params", Path(doc["model_path"]), doc["ctx"], margins, extra,
            env=self.env,
        )  # fmt: skip
        if not fit.get("parsed"):
            doc["notes"].append(f"refit of {src_label} failed: {fit.get('error') or fit.get('rc')}")
            return False
        args = gpu_tools.fit_bench_args(fit["parsed"]) + ["-fa", "1"]
        if src_label == "fit":
            new = {"fit": args, "fit_no_mmap": args + ["-lm", "none"]}
        else:
            new = {
                "expert": args + ["-lm", "none", "-ub", "2048", "-b", "2048", "-t", str(self.cores)]
            }
        fit.update(
            free_mib=source.get("free_mib"),
            margins_mib=margins,
            extra=extra,
            refits=[*done, {"over_mib": over, "args_before": cands[src_label]["args"]}],
        )
        for lab, a in new.items():
            cands[lab]["args"] = a
            cands[lab]["source"] = fit if lab == src_label else {"same_fit_as": src_label}
            cands[lab]["predicted"] = self.predict(doc, a)
        for r in doc["runs"]:
            if r["label"] in new:
                r["superseded"] = True
        log(
            f"{doc['kind']} {doc['budget_gib']:g} GiB {label} went {max(over)} MiB over: "
            f"{src_label} fitted again with margins {margins}: {fit['parsed'].get('line')}"
        )
        self.save(doc)
        return True

    def same_placement(self, doc: dict[str, Any], label: str, rep: int) -> dict[str, Any] | None:
        """A load of this round whose llama-bench arguments are identical (measured once for both)."""
        args = doc["candidates"][label]["args"]
        for r in doc["runs"]:
            if (
                r["rep"] == rep
                and "shared_with" not in r
                and not r.get("superseded")
                and doc["candidates"].get(r["label"], {}).get("args") == args
            ):
                return r
        return None

    def budgets(self) -> dict[str, list[float]]:
        if self.args.budgets:
            out: dict[str, list[float]] = {}
            for part in self.args.budgets.split(";"):
                kind, _, values = part.partition("=")
                out[kind.strip()] = [float(x) for x in values.split(",") if x.strip()]
            return out
        if self.smoke:
            return dict(SMOKE_BUDGETS)
        return dict(DEFAULT_BUDGETS[self.args.gpus])

    def finish(self, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            self.save(doc)
        all_docs = [
            json.loads(p.read_text()) for p in sorted(self.state.glob(f"{self.prefix}*gib.json"))
        ]
        md = summary_markdown([d for d in all_docs if d.get("gpus") == self.args.gpus])
        for folder in [self.state, self.out]:
            if folder is not None:
                (folder / f"{self.prefix}summary.md").write_text(md)
        log("summary:\n" + md)


# -- medians, targets, the table -------------------------------------------------------------------


def summarize(doc: dict[str, Any]) -> None:
    """Per candidate: medians over its loads, request time, peaks; then the targets of the budget."""
    p_w, g_w = doc.get("workload", WORKLOAD)
    med: dict[str, dict[str, Any]] = {}
    for label in LABELS:
        runs = [r for r in doc["runs"] if r["label"] == label and not r.get("superseded")]
        if not runs:
            continue
        ok = [r for r in runs if r.get("prompt_tps") and r.get("decode_tps")]
        prompt = _median([r["prompt_tps"] for r in ok])
        decode = _median([r["decode_tps"] for r in ok])
        # The request's prompt at its own length where the load measured it (a micro-batch as
        # large as the prompt copies CPU weights once either way), else at the sweep's length.
        at_p = _median([(r.get("prompt_tps_at") or {}).get(str(p_w)) or 0 for r in ok]) or None
        request_prompt = at_p if at_p else prompt
        # The request's answer decoded after its prompt, where the load measured it there.
        depth = str(doc.get("decode_depth") or "")
        at_d = _median([(r.get("decode_tps_at_depth") or {}).get(depth) or 0 for r in ok]) or None
        request_decode = at_d if at_d else decode
        peaks = [
            max(r["gpu_process_peak_mib"].values()) for r in runs if r.get("gpu_process_peak_mib")
        ]
        m: dict[str, Any] = {
            "loads": len(runs),
            "measured": len(ok),
            "prompt_tps": prompt,
            "decode_tps": decode,
            "request_prompt_tps": request_prompt,
            "decode_tps_at_depth": at_d,
            "request_s": p_w / request_prompt + g_w / request_decode
            if request_prompt and request_decode
            else None,
            "gpu_process_peak_mib": max(peaks) if peaks else None,
            "over_budget": sum(1 for r in runs if r.get("over_budget")),
            "oom": sum(1 for r in runs if r.get("oom")),
            "failed": sum(1 for r in runs if r.get("rc") or r.get("error")),
        }
        cand = doc["candidates"].get(label, {})
        pred = cand.get("predicted") or {}
        if pred and decode and prompt:
            # Decode predicted where the loads measured it: at the decode depth when the sweep
            # has one (`predicted_at_depth`), else as `offload plan --prompt-tokens` predicts it.
            at_depth = (cand.get("predicted_at_depth") or {}).get("decode_tps")
            m["decode_error"] = (
                abs(at_depth / at_d - 1)
                if at_depth and at_d
                else abs(pred["decode_tps"] / decode - 1)
            )
            m["prompt_error"] = abs(pred["prompt_tps"] / prompt - 1)
        med[label] = m
    doc["medians"] = med

    def get(label: str, key: str) -> float | None:
        return (med.get(label) or {}).get(key)

    base_req = [get(b, "request_s") for b in BASELINES if get(b, "request_s")]
    # Decode where the request decodes: after its prompt when the loads measured that (llama-bench
    # -d), else with an empty context (tg); the empty-context ratio is kept beside it.
    dkey = (
        "decode_tps_at_depth"
        if all(
            get(label, "decode_tps_at_depth")
            for label in (*BASELINES, "offload_decode")
            if label in med
        )
        and doc.get("decode_depth")
        else "decode_tps"
    )
    base_dec = [get(b, dkey) for b in BASELINES if get(b, dkey)]
    base_dec0 = [get(b, "decode_tps") for b in BASELINES if get(b, "decode_tps")]
    dec0 = get("offload_decode", "decode_tps")
    base_pro = [get(b, "prompt_tps") for b in BASELINES if get(b, "prompt_tps")]
    ours = [med[o] for o in OURS if o in med]
    req, dec, pro = (
        get("offload", "request_s"),
        get("offload_decode", dkey),
        get("offload_prompt", "prompt_tps"),
    )
    t = {
        "request_speedup": min(base_req) / req if req and base_req else None,
        "decode_ratio": dec / max(base_dec) if dec and base_dec else None,
        "decode_ratio_at": int(doc.get("decode_depth") or 0) if dkey != "decode_tps" else 0,
        "decode_ratio_empty_context": dec0 / max(base_dec0) if dec0 and base_dec0 else None,
        "prompt_ratio": pro / max(base_pro) if pro and base_pro else None,
        "decode_error": _median([o["decode_error"] for o in ours if "decode_error" in o]),
        "prompt_error": _median([o["prompt_error"] for o in ours if "prompt_error" in o]),
        "over_budget_loads": sum(m["over_budget"] for label, m in med.items() if label in OURS),
        "baseline_over_budget_loads": sum(
            m["over_budget"] for label, m in med.items() if label in BASELINES
        ),
        "superseded_loads": sum(1 for r in doc["runs"] if r.get("superseded")),
        "oom_loads": sum(m["oom"] for label, m in med.items() if label in OURS),
        "complete": all(
            get(label, "measured") and get(label, "measured") >= doc.get("reps", 3)
            for label in LABELS
        ),
    }
    t["request_speedup_paired"] = _paired_request_speedup(doc)
    t["met"] = {
        k: (v is not None and (v <= TARGETS[k] if k.endswith("error") else v >= TARGETS[k]))
        for k, v in t.items()
        if k in TARGETS
    }
    t["met"]["budget"] = t["over_budget_loads"] == 0 and t["oom_loads"] == 0
    doc["targets"] = t


def _request_s(doc: dict[str, Any], run: dict[str, Any]) -> float | None:
    """One load's request time: its prompt at the workload's length (else the sweep's) and its
    decode at the sweep's depth (else with an empty context)."""
    p_w, g_w = doc.get("workload", WORKLOAD)
    prompt = (run.get("prompt_tps_at") or {}).get(str(p_w)) or run.get("prompt_tps")
    depth = str(doc.get("decode_depth") or "")
    decode = (run.get("decode_tps_at_depth") or {}).get(depth) or run.get("decode_tps")
    return p_w / prompt + g_w / decode if prompt and decode else None


def _paired_request_speedup(doc: dict[str, Any]) -> float | None:
    """Median over rounds of (best baseline's request time / the default plan's) within a round.

    A round loads every candidate once, one after the other, so a slow spell of a shared host
    (every placement of a round can lose 40% of its decode) divides out; the medians of each
    candidate's own loads are kept beside it."""
    ratios = []
    for rep in sorted({r["rep"] for r in doc["runs"]}):
        this = {
            r["label"]: _request_s(doc, r)
            for r in doc["runs"]
            if r["rep"] == rep and not r.get("superseded")
        }
        base = [this[b] for b in BASELINES if this.get(b)]
        if base and this.get("offload"):
            ratios.append(min(base) / this["offload"])
    return _median(ratios)


def _pd(m: dict[str, Any] | None) -> str:
    if not m or not m.get("prompt_tps"):
        return "—"
    return f"{m['prompt_tps']:.0f} / {m['decode_tps']:.1f}"


def _ratio(v: float | None, ok: bool | None) -> str:
    return "—" if v is None else f"{v:.2f} {'✓' if ok else '✗'}"


def _paired(t: dict[str, Any]) -> str:
    v = t.get("request_speedup_paired")
    return "" if v is None else f" (paired {v:.2f})"


def _empty(t: dict[str, Any]) -> str:
    """The decode-mode ratio with an empty context, where the target's is at a depth."""
    if not t.get("decode_ratio_at") or t.get("decode_ratio_empty_context") is None:
        return ""
    return f" (tg, empty context: {t['decode_ratio_empty_context']:.2f})"


def summary_markdown(docs: list[dict[str, Any]]) -> str:
    """The README's table (prompt / decode t/s, medians) and the targets, one row per budget."""
    per = "per card " if docs and docs[0].get("gpus", 1) > 1 else ""
    reps = sorted({int(d.get("reps", 3)) for d in docs}) or [3]
    nreps = f"{reps[0]}" if len(reps) == 1 else f"{reps[0]}-{reps[-1]}"
    depth = max((int(d.get("decode_depth") or 0) for d in docs), default=0)
    lines = [
        f"Prompt / decode t/s (llama-bench pp{docs[0]['prompt'] if docs else ''} + tg{docs[0]['gen'] if docs else ''},"
        f" median of {nreps} loads, budget {per}as nvidia-smi counts it):",
        "",
        "| model | budget | fit, file mapped | fit, `--no-mmap` | expert line | offload (default) "
        "| `--optimize decode` | `--optimize prompt` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted(docs, key=lambda d: (d["kind"], d["budget_gib"])):
        m = d.get("medians", {})
        lines.append(
            f"| {d['kind']} | {d.get('gpus', 1)}×{d['budget_gib']:g} GiB | "
            + " | ".join(_pd(m.get(label)) for label in LABELS)
            + " |"
        )
    if depth:
        lines += [
            "",
            f"Decode t/s with {depth} tokens already in the context (llama-bench -d {depth}), medians:",
            "",
            "| model | budget | " + " | ".join(LABELS) + " |",
            "|---|---|" + "---|" * len(LABELS),
        ]
        for d in sorted(docs, key=lambda d: (d["kind"], d["budget_gib"])):
            m = d.get("medians", {})
            cells = [(m.get(label) or {}).get("decode_tps_at_depth") for label in LABELS]
            lines.append(
                f"| {d['kind']} | {d.get('gpus', 1)}×{d['budget_gib']:g} GiB | "
                + " | ".join("—" if c is None else f"{c:.1f}" for c in cells)
                + " |"
            )
    answer = (
        f", the answer decoded at depth {depth}, as are the decode-mode ratio and the decode errors"
        " (decode predicted at that depth)"
        if depth
        else ""
    )
    lines += [
        "",
        f"Targets (request = {WORKLOAD[0]} prompt + {WORKLOAD[1]} answer tokens, the prompt timed at "
        f"{WORKLOAD[0]} tokens where the loads measured it{answer}; ratios against the best of the three "
        "baselines, each held to the budget (a baseline over it is fitted again); prediction errors: "
        "median over offload's three plans):",
        "",
        "| model | budget | request speed-up ≥ 1.10 | decode-mode decode ≥ 1.00 | prompt-mode prompt ≥ 1.00 "
        "| decode error ≤ 10% | prompt error ≤ 20% | offload loads over budget / OOM "
        "| baseline loads over budget (refitted) | peak MiB (offload) | loads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted(docs, key=lambda d: (d["kind"], d["budget_gib"])):
        t, met = d.get("targets", {}), d.get("targets", {}).get("met", {})
        peak = (d.get("medians", {}).get("offload") or {}).get("gpu_process_peak_mib")
        loads = sum(1 for r in d["runs"] if "shared_with" not in r)
        lines.append(
            f"| {d['kind']} | {d.get('gpus', 1)}×{d['budget_gib']:g} GiB | "
            f"{_ratio(t.get('request_speedup'), met.get('request_speedup'))}{_paired(t)} | "
            f"{_ratio(t.get('decode_ratio'), met.get('decode_ratio'))}{_empty(t)} | "
            f"{_ratio(t.get('prompt_ratio'), met.get('prompt_ratio'))} | "
            f"{_ratio(t.get('decode_error'), met.get('decode_error'))} | "
            f"{_ratio(t.get('prompt_error'), met.get('prompt_error'))} | "
            f"{t.get('over_budget_loads', 0)} / {t.get('oom_loads', 0)} | "
            f"{t.get('baseline_over_budget_loads', 0)} ({t.get('superseded_loads', 0)}) | "
            f"{peak if peak is not None else '—'} | "
            f"{loads}{'' if t.get('complete') else ' (incomplete)'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--gpus", type=int, choices=[1, 2], default=1, help="GPUs to use (budgets are per card)"
    )
    ap.add_argument(
        "--budgets", help='GiB per model, e.g. "moe=8,12,16;dense=3,4" (default: by --gpus)'
    )
    ap.add_argument(
        "--reps", type=int, default=3, help="loads of every placement (median reported)"
    )
    ap.add_argument("--prompt", type=int, default=None, help="llama-bench -p (2048; smoke 64)")
    ap.add_argument("--gen", type=int, default=None, help="llama-bench -n (64; smoke 8)")
    ap.add_argument(
        "--decode-depth",
        type=int,
        default=0,
        help="also decode with this many tokens in the context (llama-bench -d); the request time "
        "then uses that decode (e.g. 1024, the typical request's prompt)",
    )
    ap.add_argument(
        "--ctx",
        type=int,
        default=None,
        help="context all candidates are planned for (prompt + gen + decode depth)",
    )
    ap.add_argument(
        "--state",
        default=str(Path(tempfile.gettempdir()) / "offload-sweep"),
        help="where the documents live between calls",
    )
    ap.add_argument(
        "--out", default=os.environ.get("OUT"), help="where they are copied after every load"
    )
    ap.add_argument(
        "--resume-from", help="documents to start from where --state has none (e.g. bench/results)"
    )
    ap.add_argument("--fresh", action="store_true", help="ignore --state and --resume-from")
    ap.add_argument(
        "--model-dir", default=tempfile.gettempdir(), help="synth-<kind>.gguf (written if missing)"
    )
    ap.add_argument(
        "--tools-dir", default="/tmp/llama-tools", help="llama-bench and llama-fit-params"
    )
    ap.add_argument("--expert-threads", type=int, help="-t of the expert line (default: all cores)")
    ap.add_argument(
        "--calibrate",
        help="models (dense,moe) to calibrate the speed model on first, in --state's offload home",
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument(
        "--end-time", type=float, help="epoch seconds: start no load that would end after it"
    )
    g.add_argument(
        "--time-budget-s", type=float, default=540.0, help="seconds from now instead of --end-time"
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny models, a pretend GPU for the planner"
    )
    args = ap.parse_args(argv)
    args.prompt = args.prompt or (64 if args.cpu_smoke else 2048)
    args.gen = args.gen or (8 if args.cpu_smoke else 64)
    if args.decode_depth < 0:
        ap.error("--decode-depth must be 0 or more")
    if args.calibrate:
        import synth_models

        unknown = [k for k in args.calibrate.split(",") if k and k not in synth_models.SPECS]
        if unknown:
            ap.error(
                f"--calibrate: no synthetic model {unknown}; one of {sorted(synth_models.SPECS)}"
            )
    # llama-bench sizes each test's context as its prompt + answer + depth.
    args.ctx = args.ctx or args.prompt + args.gen + args.decode_depth
    if args.fresh:
        shutil.rmtree(args.state, ignore_errors=True)
    sweep = Sweep(args)
    log(
        f"{args.gpus} GPU(s), budgets {sweep.budgets()}, {args.reps} loads each, {sweep.time_left():.0f} s, "
        f"GPUs {gpu_tools.gpu_memory()}"
    )
    sweep.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
