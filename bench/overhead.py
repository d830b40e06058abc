"""Runtime overhead: `offload run --verbose` against a direct llama-cpp-python call.

Both run the same model file, the same prompt text (the chat template already applied), the same
llama.cpp parameters (taken from the plan offload would use) and the same sampling. We compare
decode rate and time to first token; the ratio offload/direct is the runtime's overhead (1.0 = none).

    python bench/overhead.py [--model gemma3:270m] [--runs 5] [--out bench/results/overhead-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper."


def direct(model_path: str, params: dict, text: str, sampling: dict, n_predict: int) -> dict:
    """One generation through llama_cpp.Llama, timed the same way the engine times it."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path, verbose=False, **params)
    load_s = time.perf_counter() - t0
    tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
    t1 = time.perf_counter()
    first = None
    n = 0
    for tok in llm.generate(tokens, **sampling):
        if first is None:
            first = time.perf_counter()
        if llm._model.token_eos() == tok:
            break
        n += 1
        if n >= n_predict:
            break
    end = time.perf_counter()
    llm.close()
    return {"load_s": load_s, "ttft_s": first - t1, "decode_tps": (n - 1) / (end - first), "tokens": n}


def via_cli(model: str, env: dict) -> dict:
    """One `offload run --verbose`; first byte of the answer measured from outside."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "offload.runtime.cli", "run", model, PROMPT, "--verbose"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    first_byte = p.stdout.read(1)
    t_first = time.perf_counter()
    rest, err = p.communicate()
    assert first_byte, err.decode()
    stats = dict(re.findall(r"^([a-z ]+):\s+(.+)$", err.decode(), re.M))
    rate = float(stats["eval rate"].split()[0])
    pe = stats["prompt eval duration"]
    pe_s = float(pe[:-2]) / 1000 if pe.endswith("ms") else float(pe[:-1])
    return {"cli_first_byte_s": t_first - t0, "decode_tps": rate, "server_prompt_eval_s": pe_s,
            "tokens": int(stats["eval count"].split()[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from offload.models.modelfile import parse_modelfile  # noqa: F401 - the store needs it
    from offload.models.store import Store
    from offload.runtime import config, prompt
    from offload.runtime.client import ensure_server
    from offload.runtime.engine import llama_params
    from offload.runtime.options import merge_options
    from offload.runtime.scheduler import Scheduler
    from offload.runtime.server.app import create_app  # noqa: F401 - same import cost as serve

    sched = Scheduler(Store(config.models_dir()))
    info = sched.resolve(args.model)
    options = merge_options(info.params, {})
    plan = sched.plan_for(info, options)
    text, _ = prompt.render_chat(info.template, None, [{"role": "user", "content": PROMPT}])
    params = llama_params(plan)
    sampling = {"temp": options.get("temperature", 0.8), "top_k": options.get("top_k", 40),
                "top_p": options.get("top_p", 0.9), "min_p": 0.0, "repeat_penalty": 1.1}
    n_predict = int(options.get("num_predict", 128))
    sched.close()

    client = ensure_server()
    client.post("/api/chat", {"model": args.model, "messages": []})  # load once, as a user's second run
    env = dict(os.environ)
    cli_runs, direct_runs = [], []
    for _ in range(args.runs):  # interleaved, so drift hits both alike
        cli_runs.append(via_cli(args.model, env))
        direct_runs.append(direct(str(info.model_path), params, text, sampling, n_predict))
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    result = {
        "model": args.model, "runs": args.runs, "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": {k: params[k] for k in ("n_ctx", "n_batch", "n_threads", "n_gpu_layers")},
        "offload": {"decode_tps": med(cli_runs, "decode_tps"), "server_prompt_eval_s": med(cli_runs, "server_prompt_eval_s"),
                    "cli_first_byte_s": med(cli_runs, "cli_first_byte_s")},
        "direct": {"decode_tps": med(direct_runs, "decode_tps"), "ttft_s": med(direct_runs, "ttft_s"),
                   "load_s": med(direct_runs, "load_s")},
        "raw": {"offload": cli_runs, "direct": direct_runs},
    }
    result["decode_ratio"] = result["offload"]["decode_tps"] / result["direct"]["decode_tps"]
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
