"""Re-predict every recorded GPU run with the current speed model and report the median errors.

The GPU sweep records each placement with what was measured; when the speed model changes, this
shows how its predictions fare on those same runs without another trip to the GPU:

    python bench/revalidate.py bench/results/{dense-3,dense-4,dense-6,moe-8,moe-12,moe-16}gib.json

The synthetic models must be at /tmp/synth-{dense,moe}.gguf (``python bench/synth_models.py KIND
PATH``: same seed, same header). Each file's runs are re-predicted on the hardware profile that
file recorded.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys

import gpu_sweep  # noqa: F401 - puts this checkout's offload on the path

from offload.planner import anatomy, evaluate
from offload.planner.types import Hardware, Placement, PlanRequest


def main(files: list[str]) -> dict[str, object]:
    names = {f.name for f in dataclasses.fields(Placement)}
    anatomies: dict[str, object] = {}
    out: dict[str, object] = {}
    all_d: list[float] = []
    all_p: list[float] = []
    for f in files:
        d = json.load(open(f))
        hw = Hardware.from_dict(d["hardware"])
        kind = d["summary"]["model_kind"]
        a = anatomies.setdefault(kind, anatomy.read(f"/tmp/synth-{kind}.gguf"))
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
    print(json.dumps(main(sys.argv[1:]), indent=2))
