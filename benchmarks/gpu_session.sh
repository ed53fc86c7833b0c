#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (the device tool's `run`, in the repository root, $OUT set):
# install the project over the machine's preinstalled torch / triton / transformers, then the reduced
# report within a budget (default 420 s), RESULTS.md and the logs copied to $OUT after each part.
#   run: bash benchmarks/gpu_session.sh 420      (timeout_s ~ budget + 90, leaving device time for a rerun)
set -u
BUDGET=${1:-420}
OUT=${OUT:-/tmp/encdec_gpu_out}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python benchmarks/gpu_report.py --quick --budget "$BUDGET" --out "$OUT"
