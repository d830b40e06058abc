#!/bin/bash
# One device call's work, by phase. Carry [".gpu"] (filled by the GPU recipe's prepare.sh, then
# bench/device_prepare.sh). Each phase fits one 10-minute call and leaves at most 8 files in $OUT.
#
#   bash bench/device_run.sh install   On a bare machine: offload installed into a venv, then the
#       README's GPU command run as written (plus --no-index --find-links to the carried wheels),
#       `offload hardware` before and after it, `offload run` and `offload ps` on a synthetic model
#       (ps must say 100% GPU), and llama.cpp's device list checked against NVML
#       (bench/backend_check.py). The same build keeps llama-bench and llama-fit-params
#       (/tmp/llama-tools), and both synthetic models are written to /tmp meanwhile; what is left
#       of the call starts the sweep (SWEEP_AFTER=0: not), which the next calls resume.
#   bash bench/device_run.sh build     On a bare machine: the GPU recipe's .gpu/build.sh instead
#       (no install test), models written meanwhile.
#   bash bench/device_run.sh sweep [gpu_sweep.py args]     On a warm machine: the single-GPU
#       sweep (bench/gpu_sweep.py), resumed where the last call stopped, until this call's end.
#   bash bench/device_run.sh two-gpu [gpu_sweep.py args]   On a two-GPU host: the recipe's build
#       when this machine has none, then the two-GPU sweep, resumable the same way.
#   bash bench/device_run.sh plan-check [plan_check.py args]   On a warm machine: plans run through
#       offload's own executor with nvidia-smi's peak per GPU (bench/plan_check.py).
#   bash bench/device_run.sh runners   On a warm machine: runner processes against
#       llama-batched-bench (bench/runner_bench.py: the dense model fully on the GPU, the MoE at 8
#       and 12 GiB; RUNNER_PARTS picks) and GPU memory after unloading (bench/unload_check.py).
#
# LIMIT_S (default 570) is how long this call may take; loads that would end later are not started.
# Results of an earlier call placed in bench/results/ are resumed from when /tmp has none.
# Rehearsal on a machine without a GPU (DEVICE_TMP keeps this script's files apart from others'):
#   DEVICE_TMP=/tmp/rehearsal INSTALL_CMAKE_ARGS=-DGGML_NATIVE=OFF RUN_MODEL=tiny-dense CPU_OK=1 \
#     MODELS="tiny-dense tiny-moe" SWEEP_ARGS="--cpu-smoke --reps 1" bash bench/device_run.sh install
#   DEVICE_TMP=/tmp/rehearsal CPU_OK=1 MODELS="tiny-moe tiny-dense" bash bench/device_run.sh sweep --cpu-smoke
set -uo pipefail
start=$(date +%s)
phase=${1:-}
shift || true
LIMIT_S=${LIMIT_S:-570}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
T=${DEVICE_TMP:-/tmp}
mkdir -p "$T"
OUT=${OUT:-$T/out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on shared hosts

say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - start ))s] $*"; }

write_models() {  # in the background; kept in /tmp on a warm machine
  local gguf_whl k
  gguf_whl=$(ls .gpu/wheels/gguf-*.whl 2>/dev/null | head -1)
  for k in ${MODELS:-dense moe}; do
    [ -f "$T/synth-$k.gguf" ] && continue
    PYTHONPATH="$gguf_whl" python3 bench/synth_models.py "$k" "$T/synth-$k.gguf" > "$T/synth-$k.out" 2>&1 &
  done
}

wait_models() {  # the writers of this call, or (after a call that ended first) written now
  local k
  wait
  for k in ${MODELS:-dense moe}; do
    if [ ! -f "$T/synth-$k.gguf" ]; then
      say "writing $T/synth-$k.gguf now"
      PYTHONPATH="$(ls .gpu/wheels/gguf-*.whl | head -1)" python3 bench/synth_models.py "$k" "$T/synth-$k.gguf" \
        || return 1
    fi
  done
  ls -la "$T"/synth-*.gguf
}

gpu_python() {  # the Python whose llama_cpp offloads to a GPU: the install phase's venv, else the recipe's
  # CPU_OK=1 (rehearsals only) accepts a build without GPU support.
  local check="import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() or ${CPU_OK:-0} else 1)"
  if [ -x "$T/venv/bin/python" ] && "$T/venv/bin/python" -c "$check" 2>/dev/null; then
    PY=$T/venv/bin/python
  elif PYTHONPATH=/tmp/site python3 -c "$check" 2>/dev/null; then
    PY=python3
    # The recipe's build leaves offload itself uninstalled: this checkout, through a shim that
    # names its three folders as the offload namespace (runner children inherit it).
    mkdir -p "$T/shim/offload"
    local f
    for f in planner runtime models; do ln -sfn "$root/$f" "$T/shim/offload/$f"; done
    export PYTHONPATH=/tmp/site:$T/shim${PYTHONPATH:+:$PYTHONPATH}
  else
    return 1
  fi
  say "GPU build: $PY ($("$PY" -c 'import llama_cpp; print(llama_cpp.__file__)'))"
}

link_tools() {  # llama-bench and llama-fit-params of the same build (this script's or the recipe's)
  local t f
  mkdir -p "$T/llama-tools"
  for t in llama-bench llama-fit-params llama-batched-bench; do
    [ -x "$T/llama-tools/$t" ] && continue
    f=$(find "$T/lcp/build" /tmp/lcp/build -name "$t" -type f -perm -u+x 2>/dev/null | head -1)
    [ -n "$f" ] && ln -sf "$f" "$T/llama-tools/$t"
  done
  [ -x "$T/llama-tools/llama-bench" ] && [ -x "$T/llama-tools/llama-fit-params" ]
}

recipe_build() {
  say "building with .gpu/build.sh"
  write_models
  bash .gpu/build.sh > "$T/build.out" 2>&1
  local rc=$?
  tail -3 "$T/build.out"
  if [ $rc -ne 0 ]; then cp "$T/build.out" "$OUT/build.out"; say "build failed"; return 1; fi
  wait_models
}

sweep() {  # GPUS=1|2, then gpu_sweep.py arguments
  local gpus=$1
  shift
  gpu_python || { say "no GPU build on this machine (a cold one?): run the install or build phase first"; return 2; }
  link_tools || { say "llama-bench / llama-fit-params not found under $T/lcp/build or /tmp/lcp/build"; return 2; }
  wait_models || return 1
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,memory.free --format=csv,noheader
  "$PY" -X faulthandler bench/gpu_sweep.py --gpus "$gpus" --end-time $(( start + LIMIT_S - 10 )) --out "$OUT" \
    --state "$T/offload-sweep" --resume-from bench/results --model-dir "$T" --tools-dir "$T/llama-tools" "$@"
}

check() {  # NAME, then a command whose success is the check
  local name=$1
  shift
  if "$@"; then say "PASS $name"; else say "FAIL $name"; FAILED=$(( ${FAILED:-0} + 1 )); fi
}

install() {
  local fl=$T/findlinks v cmd run model=${RUN_MODEL:-dense}
  write_models
  rm -rf "$fl" && mkdir -p "$fl"
  ln -s "$root"/.gpu/wheels/*.whl "$root"/.gpu/build-wheels/*.whl "$fl"/
  v=$(ls .gpu/llama_cpp_python-*-slim.tar.gz | sed -E 's/.*llama_cpp_python-(.*)-slim.tar.gz/\1/')
  ln -s "$root"/.gpu/llama_cpp_python-"$v"-slim.tar.gz "$fl/llama_cpp_python-$v.tar.gz"
  # A fresh venv that also sees the image's packages (numpy, click, httpx...) through a .pth file
  # (the image's python3 is itself a venv, whose packages --system-site-packages would not show);
  # the rest comes from the carried wheels. offload itself without its dependencies: the embedded
  # model's package is too large to carry.
  if ! "${PYTHON3:-python3}" -m venv --clear "$T/venv" > /dev/null 2>&1; then
    # A base Python without ensurepip: a venv without pip, then pip from its carried wheel.
    local pip_whl
    pip_whl=$(ls "$root"/.gpu/build-wheels/pip-*.whl | head -1)
    "${PYTHON3:-python3}" -m venv --clear --without-pip "$T/venv" || return 1
    "$T/venv/bin/python" "$pip_whl/pip" install -q --no-index "$pip_whl" || return 1
  fi
  "${PYTHON3:-python3}" -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$("$T/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/image-packages.pth"
  ln -sfn "$T/venv" .venv
  .venv/bin/pip install -q --no-index --find-links "$fl" fastapi uvicorn pydantic platformdirs gguf diskcache || return 1
  .venv/bin/pip install -q --no-index --no-deps --no-build-isolation . || return 1
  OFFLOAD_HOST=127.0.0.1:$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  export OFFLOAD_HOME=$T/offload-install OFFLOAD_HOST
  if ls .gpu/cpu-wheel/llama_cpp_python-*.whl > /dev/null 2>&1; then
    say "before: llama-cpp-python built for the CPU only (as 'pip install .' leaves it)"
    .venv/bin/pip install -q --no-index --no-deps .gpu/cpu-wheel/llama_cpp_python-*.whl || return 1
    .venv/bin/offload hardware > "$T/hw-before.txt" 2>&1
    cat "$T/hw-before.txt"
    check "offload hardware warns that llama.cpp cannot use the GPU and gives the command" \
      grep -q 'built without GPU support.*CMAKE_ARGS="-DGGML_CUDA=on"' "$T/hw-before.txt"
  fi
  cmd=$(grep -m1 -E '^CMAKE_ARGS="-DGGML_CUDA=on" \.venv/bin/pip install ' README.md)
  [ -n "$cmd" ] || { say "no GPU install command in README.md"; return 1; }
  run=${cmd/pip install /pip install --no-index --find-links $fl }
  # Only for rehearsals on a machine without CUDA: another backend's arguments.
  [ -n "${INSTALL_CMAKE_ARGS:-}" ] && run=${run/-DGGML_CUDA=on/$INSTALL_CMAKE_ARGS}
  say "README: $cmd"
  say "runs:   $run"
  # Not part of the command: keep the build folder and build llama.cpp's tools in it too, so the
  # sweep uses llama-bench and llama-fit-params from these very sources and flags (as the GPU
  # recipe's build.sh does: the tools bring their own mtmd, so the package's copy is left out).
  export SKBUILD_BUILD_DIR=$T/lcp/build SKBUILD_CMAKE_DEFINE="LLAMA_BUILD_TOOLS=ON;LLAVA_BUILD=OFF"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  if ! bash -c "$run" > "$T/install-build.log" 2>&1; then
    tail -40 "$T/install-build.log"
    tail -c 2000000 "$T/install-build.log" > "$OUT/install-build.log"
    say "the README's command failed"
    return 1
  fi
  unset SKBUILD_BUILD_DIR SKBUILD_CMAKE_DEFINE
  say "built"
  .venv/bin/offload hardware > "$T/hw-after.txt" 2>&1
  cat "$T/hw-after.txt"
  check "offload hardware lists the GPU and warns no more" \
    bash -c "! grep -q 'without GPU support' '$T/hw-after.txt' && ! grep -q 'No GPUs' '$T/hw-after.txt'"
  .venv/bin/python -m offload.runtime.runner.probe --bandwidth > "$OUT/probe.json"
  cat "$OUT/probe.json"
  check "llama.cpp's device list agrees with NVML" .venv/bin/python bench/backend_check.py --out "$OUT/backend-check.json"
  link_tools && check "llama-bench and llama-fit-params built" true
  MODELS=$model wait_models || return 1
  printf 'FROM %s\nTEMPLATE "{{ .Prompt }}"\nPARAMETER temperature 0\nPARAMETER num_predict 16\n' \
    "$T/synth-$model.gguf" > "$T/Modelfile.synth"
  .venv/bin/offload create "synth-$model" -f "$T/Modelfile.synth" || return 1
  # `offload run` starts the server in the background, as it does for a user.
  .venv/bin/offload run "synth-$model" "Why is the sky blue?" --verbose
  .venv/bin/offload ps | tee "$T/ps.txt"
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
  check "offload ps shows the model 100% on the GPU" grep -q "100% GPU" "$T/ps.txt"
  .venv/bin/offload stop "synth-$model"
  # The server (and any runner it left) must not hold GPU memory during the sweep: end it by the
  # id of the process that listens on its port.
  .venv/bin/python - <<'PY'
import os, psutil
port = int(os.environ["OFFLOAD_HOST"].rsplit(":", 1)[1])
for c in psutil.net_connections("tcp"):
    if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
        server = psutil.Process(c.pid)
        procs = [server, *server.children(recursive=True)]
        for p in procs:
            p.terminate()
        for p in psutil.wait_procs(procs, timeout=15)[1]:
            p.kill()
        print(f"ended the server (pid {c.pid})")
PY
  cp "$OFFLOAD_HOME/logs/server.log" "$OUT/server.log" 2>/dev/null
  say "install phase: ${FAILED:-0} checks failed"
  local failed=${FAILED:-0}
  # The rest of this call starts the sweep (its files stay in $T until a sweep call returns them).
  # SWEEP_ARGS: extra gpu_sweep.py arguments (split into words on purpose)
  if [ "${SWEEP_AFTER:-1}" = 1 ]; then sweep 1 --out "" ${SWEEP_ARGS:-}; fi
  [ "$failed" -eq 0 ]
}

runners() {  # runner processes against llama-batched-bench, and unloading (bench/runner_bench.py)
  gpu_python || { say "no GPU build on this machine (a cold one?): run the install or build phase first"; return 2; }
  link_tools; [ -x "$T/llama-tools/llama-batched-bench" ] || { say "llama-batched-bench not built"; return 2; }
  wait_models || return 1
  local what=${RUNNER_PARTS:-dense moe8 moe12 unload} dense=$T/synth-${DENSE:-dense}.gguf moe=$T/synth-${MOE:-moe}.gguf
  for w in $what; do
    if [ $(( $(date +%s) - start )) -gt $(( LIMIT_S - ${RUNNER_RESERVE_S:-150} )) ]; then say "no time left for $w"; break; fi
    case $w in
      dense) "$PY" bench/runner_bench.py --model "$dense" --tools "$T/llama-tools" ${RUNNER_ARGS:-} \
               --out "$OUT/runner-gpu-dense.json" --repeats ${REPEATS:-3} ;;
      moe8|moe12) "$PY" bench/runner_bench.py --model "$moe" --gpu-memory "${w#moe}GiB" ${RUNNER_ARGS:-} \
               --tools "$T/llama-tools" --parts batched --out "$OUT/runner-gpu-$w.json" --repeats ${REPEATS:-3} ;;
      unload) "$PY" bench/unload_check.py --model "$dense" --out "$OUT/unload-dense.json"
              "$PY" bench/unload_check.py --model "$moe" --gpu-memory 8GiB --out "$OUT/unload-moe-8gib.json" ;;
    esac
    say "runner part $w: exit $?"
  done
}

main() {
  case "$phase" in
    runners) runners ;;
    install) install ;;
    build) recipe_build && link_tools ;;
    sweep) sweep 1 "$@" ;;
    two-gpu) { gpu_python || recipe_build; } && sweep 2 "$@" ;;
    plan-check) gpu_python && MODELS=${MODELS:-moe} wait_models && "$PY" bench/plan_check.py "$@" --out "$OUT" ;;
    *) echo "usage: bash bench/device_run.sh install|build|sweep|two-gpu|runners|plan-check [args]" >&2; return 2 ;;
  esac
}

main "$@" 2>&1 | tee "$OUT/$phase.log"
rc=${PIPESTATUS[0]}
say "phase $phase: exit $rc after $(( $(date +%s) - start )) s; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
