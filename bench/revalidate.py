"""Re-predict every recorded GPU run with the current speed model and report the median errors.

The GPU sweeps record each placement with what was measured; when the speed model changes, this
shows how its predictions fare on those same runs without another trip to the GPU:

    python bench/revalidate.py bench/results/sweep-2026-11-30h/sweep-dense-*gib.json
    python bench/revalidate.py --speed defaults bench/results/sweep-2026-11-30*/sweep-*.json
    python bench/revalidate.py bench/results/{dense-3,dense-4,dense-6,moe-8,moe-12,moe-16}gib.json

Two kinds of files: ``gpu_sweep.py`` documents (``sweep-<kind>-<B>gib.json``: every candidate,
baselines included, re-predicted from its llama-bench arguments on the hardware the document
recorded, with ``--speed``: the speed parameters it recorded, the defaults, or a JSON file of
them; the decode at the document's decode depth where it has one), and the first sweep's files at
the top of ``results/`` (re-predicted with the defaults). The synthetic models must be at
``--model-dir``/synth-{dense,moe}.gguf (``python bench/synth_models.py KIND PATH``: same seed,
same header; a header-only file is enough).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import gpu_sweep  # noqa: F401 - puts this checkout's offload on the path

from offload.planner import anatomy, evaluate
from offload.planner.types import Hardware, Placement, PlanRequest


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def sweep_doc(doc: dict[str, Any], speed: str, model_dir: str) -> dict[str, Any]:
    """Errors of every measured candidate of one ``gpu_sweep.py`` document, re-predicted."""
    from offload.planner.cost import SpeedParams

    hw = Hardware.from_dict(doc["hardware"])
    if speed == "recorded":
        params = SpeedParams.from_dict(doc["speed_params"]) if doc.get("speed_params") else None
    elif speed == "defaults":
        params = None
    else:
        params = SpeedParams.from_dict(json.loads(Path(speed).read_text()))
    doc = {**doc, "model_path": str(Path(model_dir) / f"synth-{doc['kind']}.gguf")}
    depth = int(doc.get("decode_depth") or 0)
    rows: dict[str, Any] = {}
    for label, cand in doc["candidates"].items():
        m = doc.get("medians", {}).get(label) or {}
        decode = m.get("decode_tps_at_depth") if depth else m.get("decode_tps")
        if not decode or not m.get("prompt_tps") or not cand.get("args"):
            continue
        p = gpu_sweep.predict_args(doc, cand["args"], hw, params, context=depth or None)
        rows[label] = {
            "decode_error": abs(p["decode_tps"] / decode - 1),
            "prompt_error": abs(p["prompt_tps"] / m["prompt_tps"] - 1),
            "decode_tps": [round(p["decode_tps"], 1), round(decode, 1)],
            "prompt_tps": [round(p["prompt_tps"]), round(m["prompt_tps"])],
        }
    return rows


def main(files: list[str], speed: str = "recorded", model_dir: str = "/tmp") -> dict[str, object]:
    """Median errors per file and over all files (sweep documents: offload's plans and the
    baselines apart)."""
    out: dict[str, object] = {}
    groups: dict[str, dict[str, list[float]]] = {}
    legacy = []
    for f in files:
        doc = json.loads(Path(f).read_text())
        if "candidates" not in doc:
            legacy.append(f)
            continue
        rows = sweep_doc(doc, speed, model_dir)
        out[f] = rows
        for label, r in rows.items():
            g = groups.setdefault("offload" if label.startswith("offload") else "baselines", {})
            g.setdefault("decode", []).append(r["decode_error"])
            g.setdefault("prompt", []).append(r["prompt_error"])
    for name, g in groups.items():
        out[f"all {name}"] = {
            "placements": len(g["decode"]),
            "median_decode_pred_error": _median(g["decode"]),
            "median_prompt_pred_error": _median(g["prompt"]),
        }
    if legacy:
        out.update(first_sweep(legacy, model_dir))
    return out


def first_sweep(files: list[str], model_dir: str = "/tmp") -> dict[str, object]:
    names = {f.name for f in dataclasses.fields(Placement)}
    anatomies: dict[str, object] = {}
    out: dict[str, object] = {}
    all_d: list[float] = []
    all_p: list[float] = []
    for f in files:
        d = json.load(open(f))
        hw = Hardware.from_dict(d["hardware"])
        kind = d["summary"]["model_kind"]
        a = anatomies.setdefault(kind, anatomy.read(f"{model_dir}/synth-{kind}.gguf"))
        de, pe = [], []
        for r in d["runs"]:
            m = r.get("measured") or {}
            if not m.get("decode_tps"):
                continue
            pl = {
                **r["placement"],
                "cpu_tensor_patterns": tuple(r.get("cpu_tensor_patterns") or ()),
                "pinned_weights": r["placement"].get("use_mmap") is False,
            }
            if pl.get("n_gpu_layers", 0) < 0:
                pl["n_gpu_layers"] = a.n_layers + 1  # type: ignore[attr-defined]
            p = evaluate(
                a,
                hw,
                PlanRequest(n_ctx=4096, prompt_tokens=2048),
                Placement(**{k: v for k, v in pl.items() if k in names}),
            )
            de.append(abs(p.predicted.decode_tps / m["decode_tps"] - 1))
            pe.append(abs(p.predicted.prompt_tps / m["prompt_tps"] - 1))
        all_d += de
        all_p += pe
        out[f.rsplit("/", 1)[-1]] = {
            "runs": len(de),
            "median_decode_pred_error": statistics.median(de),
            "median_prompt_pred_error": statistics.median(pe),
        }
    out["all"] = {
        "runs": len(all_d),
        "median_decode_pred_error": statistics.median(all_d),
        "median_prompt_pred_error": statistics.median(all_p),
    }
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("files", nargs="+")
    ap.add_argument(
        "--speed",
        default="recorded",
        help="sweep documents: 'recorded' (their speed parameters), 'defaults', or a JSON file",
    )
    ap.add_argument("--model-dir", default="/tmp", help="where synth-{dense,moe}.gguf are")
    a = ap.parse_args()
    print(json.dumps(main(a.files, a.speed, a.model_dir), indent=2))
