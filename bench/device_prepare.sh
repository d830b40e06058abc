#!/bin/bash
# Run on a machine with network, in the project's root, after the GPU recipe's prepare.sh has
# filled .gpu/ (the slimmed llama-cpp-python sdist, the gguf and diskcache wheels, build.sh).
# Adds what the phases of bench/device_run.sh need on a GPU machine without network:
#   .gpu/wheels/        offload's dependencies the device image lacks: fastapi, uvicorn, pydantic,
#                       platformdirs (and what they pull in), for Python 3.12 on x86-64 Linux
#   .gpu/build-wheels/  llama-cpp-python's build requirements (scikit-build-core, ninja) and pip, so
#                       the README's pip command can build in pip's isolated build environment
#   .gpu/cpu-wheel/     a portable CPU-only llama-cpp-python wheel: the state "offload installed,
#                       llama.cpp without GPU support" that the install phase starts from. Built
#                       here once (about 10 minutes on 2 cores); kept across runs of this script.
# The whole .gpu/ stays under the 64 MiB a device call may carry.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if [ ! -f .gpu/build.sh ] || ! ls .gpu/llama_cpp_python-*-slim.tar.gz > /dev/null 2>&1; then
  echo "run the GPU recipe's prepare.sh first: it fills .gpu/ with the sdist and build.sh" >&2
  exit 1
fi
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${target[@]}" -d .gpu/wheels fastapi uvicorn pydantic platformdirs
# ninja too, in case the image's is not on the PATH (cmake is; its wheel would not fit the carry limit)
# pip too, for a venv whose base Python lacks ensurepip.
python3 -m pip download -q "${target[@]}" -d .gpu/build-wheels "scikit-build-core>=0.9.2" ninja pip
if ! ls .gpu/cpu-wheel/llama_cpp_python-*.whl > /dev/null 2>&1; then
  # GGML_NATIVE=OFF: the wheel must run on the device's CPU, not only on this one.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" python3 -m pip wheel -q --no-cache-dir --no-deps \
    -w .gpu/cpu-wheel .gpu/llama_cpp_python-*-slim.tar.gz
fi
du -sh .gpu .gpu/wheels .gpu/build-wheels .gpu/cpu-wheel
total=$(du -sm .gpu | cut -f1)
if [ "$total" -gt 62 ]; then echo "warning: .gpu/ holds ${total} MiB; a device call carries at most 64" >&2; fi
