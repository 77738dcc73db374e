#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU machine lacks for benchmarks/gpu_check.sh
# (its image has PyTorch, numpy, scipy, pyarrow, Pillow, tqdm and pytest, no diffusers), into .whl/
# for Python 3.12. Versions: those this project's .venv has, so both machines run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
for pkg in diffusers huggingface_hub httpx2 httpcore2 truststore importlib_metadata lazy-importer torchdiffeq; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$pkg==$(version "$pkg")"
done
ls -la .whl
