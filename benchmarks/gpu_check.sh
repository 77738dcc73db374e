#!/usr/bin/env bash
# The GPU check (issue 38), under 10 minutes on one GPU: the tests that need CUDA, then
# benchmarks/gpu.py (the network's own limit against memclean's scoring, eager and compiled, by
# precision, at 64 and 256 px; `memclean score` end to end; precision on the evidence models).
#   here, once:   bash benchmarks/gpu_wheels.sh           (wheels the GPU image lacks, into .whl/)
#   there:        device run, carry [".whl"], command: bash benchmarks/gpu_check.sh
#   on your own GPU machine: PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
# Results land in $OUT (the device tool's folder) or gpu-check-out/: gpu.md holds the tables for RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  rm -rf /tmp/site  # a package left by an earlier run would win over the new one
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch; print('torch', torch.__version__)"; \
  $PY -c "import faiss; print('faiss', faiss.__version__, 'GPUs:', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" \
  || echo "faiss: not installed"; } 2>&1 | tee "$OUT/device.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu.py tests/test_probes.py tests/test_train.py 2>&1 \
  | tee "$OUT/tests.log"
timeout ${GPU_BENCH_S:-420} $PY benchmarks/gpu.py --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
