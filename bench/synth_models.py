"""Write a synthetic GGUF model with random, zero-mean weights and a tokenizer, for timing llama.cpp.

The writer is ``tests/synth.py`` (gguf + numpy only, so a bare machine can run this while llama.cpp
builds). Usage:

    python bench/synth_models.py dense /tmp/synth-dense.gguf    # Mistral-7B shape, 4.6 GB
    python bench/synth_models.py moe /tmp/synth-moe.gguf        # Qwen3-30B-A3B shape, 19.6 GB
    python bench/synth_models.py tiny-dense|tiny-moe PATH       # seconds to write, for CPU tests
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:  # gguf's package init imports yaml for model cards only; a bare device may lack it
    import yaml  # noqa: F401
except ImportError:
    import types

    sys.modules["yaml"] = types.ModuleType("yaml")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.synth import SPECS, ModelSpec  # noqa: E402
from tests.synth import write_model as _write  # noqa: E402

__all__ = ["SPECS", "write_model"]


def write_model(
    path: str | os.PathLike[str], kind: str | ModelSpec, seed: int = 0, header_only: bool = False
) -> Path:
    """A loadable model with random weights, or only its header (``header_only``: a sparse file)."""
    return _write(path, kind, data="sparse" if header_only else "random", tokenizer=True, seed=seed)


def main(argv: list[str] | None = None) -> int:
    """Command line: write one model unless it is already there."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("kind", choices=sorted(SPECS))
    ap.add_argument("path")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if Path(args.path).exists() and not args.force:
        print(f"{args.path} exists")
        return 0
    t0 = time.perf_counter()
    p = write_model(args.path, args.kind)
    print(f"wrote {p} ({p.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
