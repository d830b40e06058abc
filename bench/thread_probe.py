#!/usr/bin/env python3
"""Decode speed against the CPU thread count, for placements a sweep already measured.

Every placement of the given ``gpu_sweep.py`` documents (its last load that stayed within the
budget) is loaded once more by llama-bench and decoded with each thread count, with an empty
context and with ``--depth`` tokens in it:

    python bench/thread_probe.py --threads 8,16,24,32 --depth 1024 --labels fit_no_mmap,offload \
        --out threads.json bench/results/sweep-X/sweep-dense-3gib.json

It answers whether all cores (what offload plans, and the expert line's ``-t <cores>``) is the
fastest decode on a machine, where CPU-resident weights are read by every thread.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

# llama-bench arguments this probe sets itself (with the number of values each takes).
_OWN = {"-t": 1, "-p": 1, "-n": 1, "-r": 1, "-o": 1, "-d": 1, "-v": 0}


def placement_args(cmd: str) -> tuple[str, list[str]]:
    """The tool and the placement's arguments of a recorded llama-bench command line."""
    words = shlex.split(cmd)
    tool, rest, i = words[0], [], 1
    while i < len(words):
        w = words[i]
        if w in _OWN:
            i += 1 + _OWN[w]
            continue
        rest.append(w)
        i += 1
    return tool, rest


def last_loads(doc: dict[str, Any], labels: list[str] | None) -> dict[str, str]:
    """The command of each label's last load that was not superseded by a refit."""
    out: dict[str, str] = {}
    for r in doc.get("runs", []):
        if r.get("superseded") or r.get("rc") != 0 or r.get("over_budget"):
            continue
        if labels and r["label"] not in labels:
            continue
        out[r["label"]] = r["cmd"]
    return out


def probe(cmd: str, threads: str, gen: int, depth: int, reps: int, timeout_s: float) -> dict:
    tool, args = placement_args(cmd)
    full = [tool, *args, "-t", threads, "-p", "0", "-n", str(gen), "-r", str(reps), "-o", "json"]
    if depth:
        full += ["-d", f"0,{depth}"]
    t0 = time.monotonic()
    r = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s)
    rows = []
    if r.returncode == 0:
        for row in json.loads(r.stdout or "[]"):
            rows.append(
                {
                    "threads": row.get("n_threads"),
                    "depth": row.get("n_depth", 0),
                    "decode_tps": row.get("avg_ts"),
                    "samples_ts": row.get("samples_ts"),
                }
            )
    return {
        "cmd": shlex.join(full),
        "rc": r.returncode,
        "wall_s": round(time.monotonic() - t0, 1),
        "rows": rows,
        "stderr_tail": r.stderr[-800:] if r.returncode else "",
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | budget | placement | depth | " + "threads → decode t/s |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        by_depth: dict[int, list[str]] = {}
        for row in res["rows"]:
            by_depth.setdefault(row["depth"], []).append(
                f"{row['threads']}: {row['decode_tps']:.1f}"
            )
        for d, cells in sorted(by_depth.items()):
            lines.append(
                f"| {res['kind']} | {res['budget_gib']:g} GiB | {res['label']} | {d} | "
                + ", ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("docs", nargs="+", help="gpu_sweep.py documents (sweep-<kind>-<B>gib.json)")
    ap.add_argument("--labels", help="placements to probe (default: all)")
    ap.add_argument("--threads", default="8,16,24,32", help="llama-bench -t values")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--depth", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--out", required=True, help="JSON written after every placement")
    args = ap.parse_args(argv)
    if args.depth < 0 or args.gen < 1 or args.reps < 1:
        ap.error("--depth must be 0 or more, --gen and --reps 1 or more")
    if not all(t.strip().isdigit() and int(t) > 0 for t in args.threads.split(",")):
        ap.error("--threads: positive integers separated by commas")
    labels = args.labels.split(",") if args.labels else None
    results: list[dict[str, Any]] = []
    for path in args.docs:
        doc = json.loads(Path(path).read_text())
        for label, cmd in last_loads(doc, labels).items():
            res = probe(cmd, args.threads, args.gen, args.depth, args.reps, args.timeout_s)
            res.update(kind=doc["kind"], budget_gib=doc["budget_gib"], label=label)
            results.append(res)
            best = max(res["rows"], key=lambda r: r["decode_tps"] or 0, default=None)
            print(
                f"{doc['kind']} {doc['budget_gib']:g} GiB {label}: rc {res['rc']}, {res['wall_s']} s, "
                f"best {best}",
                flush=True,
            )
            Path(args.out).write_text(
                json.dumps({"threads": args.threads, "results": results}, indent=1)
            )
    print(table(results))
    meds = [r["decode_tps"] for res in results for r in res["rows"] if r["decode_tps"]]
    return 0 if meds and statistics.median(meds) > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
