#!/usr/bin/env bash
# The GPU check (issue 11), under 8 minutes on one GPU: the tests that need CUDA, then the scoring
# benchmark's speed mode on a 35.7M-parameter DDPM at 32x32 (google/ddpm-cifar10-32's UNet
# configuration, random weights): images/s, the share of the GPU's peak FLOP/s, and each precision's
# rank agreement with fp32; and FAISS on the GPU (tests/test_gpu.py) where faiss-gpu is installed.
#   here, once:   bash benchmarks/gpu_wheels.sh           (wheels the GPU image lacks, into .whl/)
#   there:        device run, carry [".whl"], command: bash benchmarks/gpu_check.sh
#   on your own GPU machine: make gpu (faiss-gpu in .venv), then PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# faiss-gpu's wheel (135 MB) is over what the device tool carries (64 MiB), so there the FAISS test
# skips, saying so; device.txt records which FAISS build ran.
# Results land in $OUT (the device tool's folder) or gpu-check-out/; copy the table into RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch; print('torch', torch.__version__)"; \
  $PY -c "import faiss; print('faiss', faiss.__version__, 'GPUs:', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" \
  || echo "faiss: not installed"; } \
  2>&1 | tee "$OUT/device.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_probes.py tests/test_gpu.py tests/test_train.py 2>&1 | tee "$OUT/tests.log"
timeout 300 $PY benchmarks/scoring.py --speed-only --model random:cifar10 --device cuda --n 1024 \
  --batch-size 256 --no-write 2>&1 | tee "$OUT/scoring.md"
