#!/bin/bash
# The GPU sweep on the device, in one command of at most 10 minutes:
#   bash bench/device_run.sh KIND [BUDGETS_GIB] [TOTAL_S] [extra gpu_sweep.py args...]
#   e.g. bash bench/device_run.sh dense 3,4,6 560 --heal
# Environment: PREFLIGHT_GIB=N first loads the planner's plan at N GiB in a process of its own;
# ALSO_WRITE=KIND writes that model too while llama.cpp builds, for a following call.
# Starts .gpu/build.sh (CUDA llama-cpp-python, llama-bench, llama-fit-params; skipped on a warm
# machine) in the background, meanwhile writes the synthetic model to /tmp (kept on a warm machine),
# then sweeps until TOTAL_S seconds after the start, writing $OUT/KIND-<budget>gib.json after
# every run, plus $OUT/sweep-KIND.log.
set -uo pipefail
start=$(date +%s)
kind=${1:-dense}; budgets=${2:-}; total=${3:-560}
shift $(( $# < 3 ? $# : 3 ))
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
synth_kind=$kind
# --cpu-smoke (a rehearsal on a machine without a GPU) uses the tiny model of the same shape family.
case " $* " in *" --cpu-smoke "*) synth_kind=tiny-$kind ;; esac
model=/tmp/synth-$synth_kind.gguf

bash .gpu/build.sh > /tmp/build.out 2>&1 &
build_pid=$!
# gguf is pure Python: import it straight from the carried wheel while the build installs it.
gguf_whl=$(ls .gpu/wheels/gguf-*.whl 2>/dev/null | head -1)
PYTHONPATH="$gguf_whl" python3 bench/synth_models.py "$synth_kind" "$model" > /tmp/synth-$kind.out 2>&1 &
synth_pid=$!

# ALSO_WRITE=KIND writes a second model meanwhile (kept for the next call on a warm machine).
also_pid=
if [ -n "${ALSO_WRITE:-}" ]; then
  PYTHONPATH="$gguf_whl" python3 bench/synth_models.py "$ALSO_WRITE" "/tmp/synth-$ALSO_WRITE.gguf" > /tmp/synth-$ALSO_WRITE.out 2>&1 &
  also_pid=$!
fi

wait $build_pid; build_rc=$?
tail -3 /tmp/build.out
if [ $build_rc -ne 0 ]; then cp /tmp/build.out "$OUT/build.out"; echo "build failed"; exit 1; fi
wait $synth_pid; synth_rc=$?
cat /tmp/synth-$kind.out
if [ $synth_rc -ne 0 ]; then echo "writing the model failed"; exit 1; fi
if [ -n "$also_pid" ]; then wait $also_pid; echo "also wrote: $(tail -1 /tmp/synth-$ALSO_WRITE.out)"; fi
nvidia-smi --query-gpu=name,memory.total,memory.used,memory.free --format=csv,noheader 2>/dev/null

export PYTHONPATH=/tmp/site${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}
# A first load in a process of its own: a crash here shows where (faulthandler) and spares the sweep.
if [ -n "${PREFLIGHT_GIB:-}" ]; then
  timeout 150 python3 -X faulthandler bench/preflight.py "$model" "$PREFLIGHT_GIB" > "$OUT/preflight.log" 2>&1
  echo "preflight rc=$?"; tail -25 "$OUT/preflight.log"
fi
# Keep 25 s for the last run to finish and the results to come back.
left=$(( total - ($(date +%s) - start) - 25 ))
echo "sweep: $kind budgets=${budgets:-default} ${left}s left"
python3 -X faulthandler bench/gpu_sweep.py --model "$kind" --model-path "$model" --out "$OUT" --time-budget-s "$left" \
  ${budgets:+--budgets "$budgets"} "$@" 2>&1 | tee "$OUT/sweep-$kind.log" | grep -v '^\[.*summary' | tail -60
echo "elapsed $(( $(date +%s) - start ))s; files:"; ls -la "$OUT"
