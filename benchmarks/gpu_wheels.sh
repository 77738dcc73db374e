#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU machine lacks for benchmarks/gpu_check.sh,
# into .whl/ for Python 3.12 (../shared/GPU.md: its image has PyTorch, torchdiffeq, numpy, scipy,
# pyarrow, Pillow, OpenCV, scikit-image and pytest, and peft and transformers, which need
# huggingface_hub < 2.0: its own 1.x stays, so huggingface_hub is NOT brought; 2.x breaks
# diffusers' import through peft there). faiss-gpu (135 MB) is over what travels (64 MiB): faiss-cpu.
# Versions: those this project's .venv has, so both machines run the same code (about 33 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
for pkg in diffusers faiss-cpu albumentations albucore pydantic pydantic_core annotated-types typing-inspection \
    typing_extensions stringzilla simsimd importlib_metadata lazy-importer; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$pkg==$(version "$pkg")"
done
du -sh .whl && ls .whl
