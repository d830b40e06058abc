"""Stand-ins for llama.cpp's ``llama-bench`` and ``llama-fit-params``, for machines that lack them.

The GPU sweep drives those two binaries; llama-cpp-python does not ship them. These take the
same arguments, measure with llama.cpp itself (through llama-cpp-python, on the CPU: placement
arguments are checked for their syntax, as the real tools do, and otherwise have nothing to
place) and print what the real tools print on a build without a GPU. Run as
``python llama_tools_standin.py bench|fit-params ARGS...``.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time


def _args(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-v", "--verbose"):
            out[a] = "1"
            i += 1
            continue
        if i + 1 >= len(argv):
            sys.exit(f"error: {a} needs a value")
        out[a] = argv[i + 1]
        i += 2
    return out


def fit_params(argv: list[str]) -> int:
    a = _args(argv)
    for key in ("-m", "-c", "-fitt"):
        if key not in a:
            sys.exit(f"error: {key} is required here")
    print("llama_fit_params: printing fitted CLI arguments to stdout...", file=sys.stderr)
    print(f"-c {a['-c']} -ngl -1")  # what a build without a GPU prints
    return 0


def bench(argv: list[str]) -> int:
    import llama_cpp

    a = _args(argv)
    for pat in filter(None, a.get("-ot", "").split(";")):
        name, _, buft = pat.partition("=")
        re.compile(name)
        if buft != "CPU":
            print(f"error: unrecognized buffer type '{buft}'")
            return 1
    if a.get("-lm", "auto") not in ("auto", "none", "mmap"):
        print(f"error: unknown load mode {a['-lm']}")
        return 1
    # -p takes a comma-separated list of prompt lengths, each a test of its own; so does -d, the
    # tokens already in the context (KV cache) when each test starts.
    prompts, n_gen = [int(x) for x in a.get("-p", "512").split(",")], int(a.get("-n", 128))
    depths = [int(x) for x in a.get("-d", "0").split(",")]
    n_prompt = max(prompts) + max(depths)
    n_ubatch = int(a.get("-ub", 512))
    threads = int(a.get("-t", 2))
    llm = llama_cpp.Llama(
        a["-m"],
        n_ctx=n_prompt + n_gen + 1,
        n_batch=int(a.get("-b", 2048)),
        n_ubatch=n_ubatch,
        n_threads=threads,
        use_mmap=a.get("-lm", "auto") != "none",
        flash_attn=a.get("-fa", "0") in ("1", "on"),
        verbose="-v" in a,
    )
    rng = random.Random(0)
    tokens = [rng.randrange(10, llm.n_vocab()) for _ in range(n_prompt)]
    rows = []
    tests = [
        (d, kind, n) for d in depths for kind, n in [*(("pp", p) for p in prompts), ("tg", n_gen)]
    ]
    for depth, kind, n in tests:
        llm.reset()
        llm.eval(tokens[: min(8, n_prompt)])  # warm-up, as llama-bench does
        llm.reset()
        if depth:
            llm.eval(tokens[:depth])
        t0 = time.perf_counter()
        if kind == "pp":
            llm.eval(tokens[depth : depth + n])
        else:
            for i in range(n):
                llm.eval([tokens[(depth + i) % len(tokens)]])
        dt = time.perf_counter() - t0
        rows.append(
            {
                "n_prompt": n if kind == "pp" else 0,
                "n_gen": n if kind == "tg" else 0,
                "n_depth": depth,
                "n_threads": threads,
                "n_ubatch": n_ubatch,
                "load_mode": a.get("-lm", "auto"),
                "avg_ts": n / dt,
                "samples_ts": [n / dt],
                "backends": "CPU",
            }
        )
    llm.close()
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    tool, rest = sys.argv[1], sys.argv[2:]
    sys.exit(bench(rest) if tool == "bench" else fit_params(rest))
